"""Model registry: ``build_model(model_type, **model_params)`` for every backbone.

All models map ``(N, in_channels, Z, Y, X)`` float input to ``(N, out_channels, Z, Y, X)``
logits with the same spatial shape; by default ``out_channels=2`` (background,
foreground) and channel 1 of the softmax is the mitochondria probability.

=============  ==========================================  ===============================
model_type     module                                       encoder (``freeze_encoder``)
=============  ==========================================  ===============================
``monai_unet`` :mod:`catena_mito.models.monai_unet`          down layers + bottom layer
``rs_unet``    :mod:`catena_mito.models.rs_unet`             ``encoder.*`` (incl. bottleneck)
=============  ==========================================  ===============================

One training loop serves both: it needs only :func:`build_model`,
:func:`resolve_model_params` (the complete hyper-parameters stored in a checkpoint),
:func:`encoder_parameter_names` and :func:`check_patch_size`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from catena_mito.errors import ConfigError
from catena_mito.models import monai_unet, rs_unet
from catena_mito.models._params import did_you_mean

MODEL_TYPES = ("monai_unet", "rs_unet")

__all__ = [
    "MODEL_TYPES",
    "build_model",
    "check_patch_size",
    "default_model_params",
    "downsampling_factor",
    "encoder_parameter_names",
    "resolve_model_params",
]


@dataclass(frozen=True)
class _Backbone:
    resolve: Callable[[Mapping[str, Any]], dict[str, Any]]
    build: Callable[[Mapping[str, Any]], nn.Module]
    encoder_names: Callable[[nn.Module], set[str]]
    factor: Callable[[Mapping[str, Any]], tuple[int, int, int]]


_REGISTRY: dict[str, _Backbone] = {
    "monai_unet": _Backbone(
        monai_unet.resolve_params,
        monai_unet.build,
        monai_unet.encoder_parameter_names,
        monai_unet.downsampling_factor,
    ),
    "rs_unet": _Backbone(
        rs_unet.resolve_params,
        rs_unet.build,
        rs_unet.encoder_parameter_names,
        rs_unet.downsampling_factor,
    ),
}


def _backbone(model_type: str) -> _Backbone:
    try:
        return _REGISTRY[model_type]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown model_type {model_type!r}{did_you_mean(str(model_type), MODEL_TYPES)}; "
            f"expected one of: {', '.join(MODEL_TYPES)}"
        ) from None


def resolve_model_params(model_type: str, model_params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate ``model_params`` and return the complete hyper-parameters (defaults filled in).

    The result holds only plain Python types, so it can be stored in a checkpoint loaded
    with ``weights_only=True``, and ``build_model(model_type, **result)`` rebuilds the model.

    Raises:
        ConfigError: unknown ``model_type``, unknown key (named), or invalid value.
    """
    return _backbone(model_type).resolve(dict(model_params or {}))


def default_model_params(model_type: str) -> dict[str, Any]:
    """The complete default hyper-parameters of ``model_type``."""
    return resolve_model_params(model_type, {})


def build_model(model_type: str, **model_params: Any) -> nn.Module:
    """Build the backbone ``model_type`` with ``model_params`` overriding its defaults.

    Raises:
        ConfigError: unknown ``model_type`` or ``model_params`` key, or invalid value.
    """
    backbone = _backbone(model_type)
    return backbone.build(backbone.resolve(model_params))


def encoder_parameter_names(model: nn.Module, model_type: str) -> set[str]:
    """Exact ``named_parameters()`` names of the encoder (down path and bottleneck).

    Used by ``freeze_encoder``: set ``requires_grad=False`` on exactly these.
    """
    return _backbone(model_type).encoder_names(model)


def downsampling_factor(model_type: str, model_params: Mapping[str, Any] | None = None) -> tuple[int, int, int]:
    """Total (z, y, x) down-sampling factor of the model, in voxels."""
    backbone = _backbone(model_type)
    return backbone.factor(backbone.resolve(dict(model_params or {})))


def _nearest_multiples(size: int, factor: int) -> tuple[int, int]:
    """The two multiples of ``factor`` (>= factor) closest to a ``size`` that is not one."""
    below = (size // factor) * factor
    if below < factor:
        return factor, 2 * factor
    return below, below + factor


def check_patch_size(model_type: str, model_params: Mapping[str, Any] | None, patch_size: Sequence[int]) -> None:
    """Refuse a (z, y, x) patch size (voxels) that the model cannot process shape-preservingly.

    Every axis must be a positive multiple of the model's total down-sampling factor on that
    axis, or the skips would join features of different shapes.

    Raises:
        ConfigError: naming the patch size, the factor and the two nearest working sizes
        per axis that fails.
    """
    factor = downsampling_factor(model_type, model_params)
    try:
        patch = tuple(int(s) for s in patch_size)
        valid_type = all(not isinstance(s, bool) and int(s) == s for s in patch_size)
    except (TypeError, ValueError):
        patch, valid_type = (), False
    if not valid_type or len(patch) != 3:
        raise ConfigError(f"patch_size must be three integers (z, y, x), got {patch_size!r}")
    problems = []
    for axis, size, f in zip("zyx", patch, factor, strict=True):
        if size < f or size % f:
            lo, hi = _nearest_multiples(size, f)
            problems.append(f"{axis}: {lo} or {hi}")
    if problems:
        raise ConfigError(
            f"patch_size {list(patch)} (z, y, x) does not fit model_type {model_type!r}: every axis "
            f"must be a positive multiple of the down-sampling factor {list(factor)}; "
            f"nearest working sizes: {', '.join(problems)}"
        )
