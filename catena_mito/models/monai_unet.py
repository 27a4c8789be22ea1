"""``monai_unet``: MONAI's residual U-Net (``monai.networks.nets.UNet``, 3D), as Catena used it.

Tensors are ``(N, C, Z, Y, X)``; kernel sizes and strides are in voxels, (z, y, x) order
when given per axis. Defaults follow the original Catena training scripts:
``channels=(28, 36, 48, 64, 80)``, ``strides=(2, 2, 2, 2)``, ``num_res_units=0`` (Catena's
scripts: plain conv-norm-activation units, 0.63 M parameters; ``num_res_units=2``, MONAI's
residual units, has 1.32 M), ``norm="batch"``, ``dropout=0.1``, ``out_channels=2``; every
other keyword of ``UNet.__init__`` (except ``spatial_dims``, always 3) keeps MONAI's
default and can be overridden through ``model_params``. ``norm_momentum`` (not a MONAI
keyword; default 0.1, PyTorch's) is the batch-norm momentum, passed as
``norm=("batch", {"momentum": m})``; it changes training only, never a prediction.

Checkpoints written before ``num_res_units`` defaulted to 0 store ``num_res_units=2``
explicitly (checkpoints hold the complete hyper-parameters), so they rebuild unchanged.

MONAI builds the network recursively as ``model.model``::

    Sequential(0: down_0, 1: SkipConnection(submodule=Sequential(
                   0: down_1, 1: SkipConnection(submodule=... bottom ...), 2: up_1)), 2: up_0)

so a parameter name is a path of ``1.submodule.`` steps (one per level) followed by ``0.``
(the level's down layer), ``2.`` (its up layer) or nothing (the innermost ``submodule`` is
the bottom layer). **Encoder** = the down layers of every level *plus* the bottom layer
(bottleneck), matching ``rs_unet``; the decoder is every up layer.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from functools import cache
from typing import Any

from torch import nn

from catena_mito.errors import ConfigError
from catena_mito.models._params import (
    as_int,
    as_int_tuple,
    as_zyx,
    plain,
    reject_unknown_keys,
)

MODEL_TYPE = "monai_unet"

#: Catena's choices; they override MONAI's own defaults (instance norm, no dropout, ...).
CATENA_DEFAULTS: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 2,
    "channels": (28, 36, 48, 64, 80),
    "strides": (2, 2, 2, 2),
    "num_res_units": 0,
    "norm": "batch",
    "dropout": 0.1,
}


@cache
def _monai_defaults() -> dict[str, Any]:
    """Every ``UNet`` keyword and its default, Catena's choices applied (``spatial_dims`` fixed)."""
    from monai.networks.nets import UNet

    defaults: dict[str, Any] = {}
    for name, param in inspect.signature(UNet.__init__).parameters.items():
        if name in ("self", "spatial_dims") or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        defaults[name] = None if param.default is inspect.Parameter.empty else param.default
    defaults.update(CATENA_DEFAULTS)
    defaults["norm_momentum"] = 0.1
    return defaults


def resolve_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``params`` and fill in every default; the result is complete and plain.

    Only what MONAI would reject with an assertion or a late shape error is checked here
    (widths, strides per level); the rest is passed through to ``UNet``.

    Raises:
        ConfigError: unknown key or invalid widths/strides.
    """
    defaults = _monai_defaults()
    if "spatial_dims" in params:
        raise ConfigError("model_params.spatial_dims is fixed to 3 for monai_unet; remove it")
    reject_unknown_keys(MODEL_TYPE, params, defaults)
    p = {**defaults, **params}
    p["in_channels"] = as_int("in_channels", p["in_channels"], minimum=1)
    p["out_channels"] = as_int("out_channels", p["out_channels"], minimum=1)
    p["channels"] = as_int_tuple("channels", p["channels"])
    if len(p["channels"]) < 2:
        raise ConfigError(
            f"model_params.channels must list at least 2 widths, got {params.get('channels')!r}"
        )
    strides = p["strides"]
    if isinstance(strides, (str, bytes)) or not hasattr(strides, "__len__"):
        raise ConfigError(f"model_params.strides must be a sequence, got {strides!r}")
    if len(strides) != len(p["channels"]) - 1:
        raise ConfigError(
            f"model_params.strides must have len(channels) - 1 = {len(p['channels']) - 1} entries "
            f"(one per down-sampling), got {strides!r} for channels={p['channels']}"
        )
    p["strides"] = tuple(as_zyx("strides", s) if not isinstance(s, int) else as_int("strides", s, minimum=1) for s in strides)
    p["num_res_units"] = as_int("num_res_units", p["num_res_units"], minimum=0)
    momentum = p["norm_momentum"]
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 < momentum <= 1:
        raise ConfigError(f"model_params.norm_momentum must be a number in (0, 1], got {momentum!r}")
    p["norm_momentum"] = float(momentum)
    return plain(p)


def default_params() -> dict[str, Any]:
    """The complete default hyper-parameters (Catena's choices on top of MONAI's)."""
    return resolve_params({})


def downsampling_factor(params: Mapping[str, Any]) -> tuple[int, int, int]:
    """Total (z, y, x) down-sampling: the product of the strides per axis."""
    total = [1, 1, 1]
    for stride in params["strides"]:
        factor = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        total = [t * f for t, f in zip(total, factor, strict=True)]
    return (total[0], total[1], total[2])


def build(params: Mapping[str, Any]) -> nn.Module:
    """Build MONAI's 3D ``UNet`` from (possibly partial) hyper-parameters."""
    from monai.networks.nets import UNet

    resolved = resolve_params(params)
    momentum = resolved.pop("norm_momentum")
    norm = resolved["norm"]
    if isinstance(norm, str) and norm.lower() == "batch":
        resolved["norm"] = ("batch", {"momentum": momentum})
    elif momentum != 0.1:
        raise ConfigError(f"model_params.norm_momentum applies to norm 'batch' only, got norm {norm!r}")
    return UNet(spatial_dims=3, **resolved)


def encoder_parameter_names(model: nn.Module) -> set[str]:
    """Names of the down-layer and bottom-layer parameters of a MONAI ``UNet``.

    Walks ``model.model`` level by level rather than matching name patterns, so it stays
    exact for any depth and any ``num_res_units``.
    """
    from monai.networks.layers import SkipConnection

    node = getattr(model, "model", None)
    if not isinstance(node, nn.Sequential):
        raise ConfigError(
            f"expected a MONAI UNet with a 'model' Sequential, got {type(model).__name__}"
        )
    names: set[str] = set()
    prefix = "model."
    while True:
        # A level is Sequential(down, SkipConnection(inner), up).
        down, skip = node[0], node[1]
        names.update(prefix + "0." + n for n, _ in down.named_parameters())
        if not isinstance(skip, SkipConnection):
            raise ConfigError(f"unexpected MONAI UNet structure at {prefix}1: {type(skip).__name__}")
        prefix += "1.submodule."
        inner = skip.submodule
        if isinstance(inner, nn.Sequential) and len(inner) == 3 and isinstance(inner[1], SkipConnection):
            node = inner
            continue
        # Innermost submodule: the bottom layer (bottleneck).
        names.update(prefix + n for n, _ in inner.named_parameters())
        return names
