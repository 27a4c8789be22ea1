"""``rs_unet``: a residual symmetric U-Net for 3D EM (Lee et al. 2017; Xie et al. 2025).

Two variants (``model_params.variant``), both built by this module:

``fibsem`` (default; every checkpoint written before variants existed is one)
    Catena's adaptation for isotropic FIB-SEM: (3, 3, 3) convs and (2, 2, 2) pooling at
    every level, a (5, 5, 5) input/output conv, batch-norm momentum 0.1. With
    ``isotropic: false`` the first ``num_anisotropic_levels`` levels use (1, 3, 3) convs
    and (1, 2, 2) pooling (kept so that such checkpoints load and predict as before).
``xie``
    Xie et al.'s anisotropic RS-UNet for serial-section EM, after Lee et al. 2017: a
    (1, 5, 5) input embedding (conv + ELU, no norm), then in *every* module one (1, 3, 3)
    conv (its output is the residual skip) and two (3, 3, 3) convs; in-plane (1, 2, 2)
    pooling at every level, so z is never pooled and an 18-slice window works; widths
    28-36-48-64-80; a (1, 5, 5) output embedding (conv + ELU) and a 1×1×1 conv to the
    logits; batch-norm momentum 0.01. ``num_anisotropic_levels`` below the number of
    poolings pools z (2, 2, 2) in the deeper levels (less anisotropic data).

``norm_momentum`` sets the batch-norm momentum of either variant (training only; it
never changes a prediction).

Tensors are ``(N, C, Z, Y, X)``; every kernel, pooling factor and patch size below is
given in voxels in (z, y, x) order. The output has the input's spatial shape (``"same"``
padding everywhere) and ``out_channels`` logit channels.

Layout for ``channels=(c0, c1, ..., c_{L-1})`` (L levels, L - 1 poolings)::

    input ─ encoder.input_conv (io_kernel, c0) ───────────────────────────┐
            encoder.blocks.0   (res block, c0) ──── skip 0 ──► (+) decoder.ups.0 ─ decoder.blocks.0 ─ decoder.output_conv ─ logits
            encoder.pools.0    (max-pool)                        ▲ transposed conv c1→c0
            encoder.blocks.1   (res block, c1) ──── skip 1 ──► (+) decoder.ups.1 ─ decoder.blocks.1
            ...                                                  ▲
            encoder.blocks.L-1 (bottleneck, c_{L-1}) ────────────┘

* **Residual block** (``ResidualBlock``): a conv whose output is the skip, then
  norm → ELU → conv → norm → ELU → conv, add the skip, norm, ELU.
* **Down-sampling** by max-pooling, **up-sampling** by a transposed conv whose kernel equals
  its stride (so it exactly inverts the pooling shape).
* **Skips are added**, not concatenated: the encoder feature of level ``i`` is summed with the
  up-sampled decoder feature at the same resolution and the same width ``c_i``
  (``decoder.ups.i.join``), which keeps the decoder as narrow as the encoder.
* **Anisotropy**: levels ``i < num_anisotropic_levels`` use ``(1, 3, 3)`` convs and the
  pooling after them is ``(1, 2, 2)``; deeper levels use ``(3, 3, 3)`` convs and
  ``(2, 2, 2)`` pooling. Isotropic FIB-SEM (``isotropic=True``) uses 0 anisotropic levels.

**Encoder** (what ``freeze_encoder`` freezes): every parameter under ``encoder.``, i.e. the
input conv, the down-path residual blocks *and* the bottleneck block (``encoder.blocks.L-1``).
The decoder (``decoder.``) holds the transposed convs, the post-join norms, the up-path
residual blocks and the output conv.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from catena_mito.errors import ConfigError
from catena_mito.models._params import (
    as_int,
    as_int_tuple,
    as_zyx,
    did_you_mean,
    reject_unknown_keys,
)

MODEL_TYPE = "rs_unet"
NORMS = ("batch", "instance", "group")

#: Raw defaults. ``None`` means "derived from ``isotropic``" and is resolved by
#: :func:`resolve_params` (so a stored checkpoint never contains a ``None`` here).
_RAW_DEFAULTS: dict[str, Any] = {
    "variant": "fibsem",
    "in_channels": 1,
    "out_channels": 2,
    "channels": (28, 36, 48, 64, 80),
    "isotropic": None,
    "num_anisotropic_levels": None,
    "io_kernel": None,
    "norm": "batch",
    "num_groups": 4,
    "norm_momentum": None,
}

VARIANTS = ("fibsem", "xie")
#: Batch-norm momentum per variant (PyTorch's default for fibsem; Xie et al. and Catena's
#: RS-UNet use 0.01).
_DEFAULT_MOMENTUM = {"fibsem": 0.1, "xie": 0.01}

#: With ``isotropic=False`` and no explicit ``num_anisotropic_levels``: serial-section data
#: is typically 4–8× coarser in z; after two in-plane-only poolings the voxels are within
#: 2× of isotropic, so deeper levels can pool z as well.
_DEFAULT_ANISOTROPIC_LEVELS = 2


def resolve_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``params`` and fill in every default; the result is complete and plain.

    Raises:
        ConfigError: unknown key, wrong type/value, or contradictory anisotropy settings.
    """
    reject_unknown_keys(MODEL_TYPE, params, _RAW_DEFAULTS)
    p = {**_RAW_DEFAULTS, **params}
    variant = p["variant"]
    if variant not in VARIANTS:
        raise ConfigError(
            f"model_params.variant must be one of {', '.join(VARIANTS)}, got {variant!r}{did_you_mean(str(variant), VARIANTS)}"
        )
    if variant == "xie":
        return _resolve_xie(p)
    in_channels = as_int("in_channels", p["in_channels"], minimum=1)
    out_channels = as_int("out_channels", p["out_channels"], minimum=1)
    channels = as_int_tuple("channels", p["channels"])
    if len(channels) < 2:
        raise ConfigError(
            f"model_params.channels must list at least 2 widths (one per level), got {p['channels']!r}"
        )
    levels = len(channels)

    isotropic, n_aniso = p["isotropic"], p["num_anisotropic_levels"]
    if isotropic is not None and not isinstance(isotropic, bool):
        raise ConfigError(f"model_params.isotropic must be true or false, got {isotropic!r}")
    if n_aniso is not None:
        n_aniso = as_int("num_anisotropic_levels", n_aniso, minimum=0)
        if n_aniso > levels:
            raise ConfigError(
                f"model_params.num_anisotropic_levels must be between 0 and {levels} "
                f"(the number of levels in channels={channels}), got {n_aniso}"
            )
    if isotropic is None:
        isotropic = not n_aniso
    if n_aniso is None:
        n_aniso = 0 if isotropic else min(_DEFAULT_ANISOTROPIC_LEVELS, levels - 1)
    if isotropic and n_aniso > 0:
        raise ConfigError(
            f"model_params.isotropic=true contradicts num_anisotropic_levels={n_aniso}; "
            "set isotropic: false for anisotropic data"
        )
    if not isotropic and n_aniso == 0:
        raise ConfigError(
            "model_params.isotropic=false needs num_anisotropic_levels >= 1 (got 0); "
            "use isotropic: true for isotropic data"
        )

    io_kernel = p["io_kernel"]
    io_kernel = ((5, 5, 5) if isotropic else (1, 5, 5)) if io_kernel is None else as_zyx("io_kernel", io_kernel)
    if any(k % 2 == 0 for k in io_kernel):
        raise ConfigError(
            f"model_params.io_kernel must be odd on every axis for 'same' padding, got {io_kernel}"
        )

    norm = p["norm"]
    if norm not in NORMS:
        raise ConfigError(
            f"model_params.norm must be one of {', '.join(NORMS)}, got {norm!r}{did_you_mean(str(norm), NORMS)}"
        )
    num_groups = as_int("num_groups", p["num_groups"], minimum=1)
    if norm == "group":
        bad = [c for c in channels if c % num_groups]
        if bad:
            raise ConfigError(
                f"model_params.num_groups={num_groups} must divide every width in channels={channels} "
                f"for norm 'group' (does not divide {bad})"
            )
    return {
        "variant": "fibsem",
        "in_channels": in_channels,
        "out_channels": out_channels,
        "channels": channels,
        "isotropic": isotropic,
        "num_anisotropic_levels": n_aniso,
        "io_kernel": io_kernel,
        "norm": str(norm),
        "num_groups": num_groups,
        "norm_momentum": _momentum(p["norm_momentum"], "fibsem"),
    }


def _momentum(value: Any, variant: str) -> float:
    if value is None:
        return _DEFAULT_MOMENTUM[variant]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"model_params.norm_momentum must be a number in (0, 1], got {value!r}")
    return float(value)


def _check_norm(norm: Any, num_groups: int, channels: tuple[int, ...]) -> None:
    if norm not in NORMS:
        raise ConfigError(
            f"model_params.norm must be one of {', '.join(NORMS)}, got {norm!r}{did_you_mean(str(norm), NORMS)}"
        )
    if norm == "group":
        bad = [c for c in channels if c % num_groups]
        if bad:
            raise ConfigError(
                f"model_params.num_groups={num_groups} must divide every width in channels={channels} "
                f"for norm 'group' (does not divide {bad})"
            )


def _resolve_xie(p: Mapping[str, Any]) -> dict[str, Any]:
    """Xie et al.'s anisotropic preset (see the module docstring)."""
    channels = as_int_tuple("channels", p["channels"])
    if len(channels) < 2:
        raise ConfigError(
            f"model_params.channels must list at least 2 widths (one per level), got {p['channels']!r}"
        )
    if p["isotropic"] not in (None, False):
        raise ConfigError("model_params.isotropic=true contradicts variant 'xie' (anisotropic); use variant: fibsem")
    pools = len(channels) - 1
    n_aniso = p["num_anisotropic_levels"]
    n_aniso = pools if n_aniso is None else as_int("num_anisotropic_levels", n_aniso, minimum=1)
    if n_aniso > pools:
        raise ConfigError(
            f"model_params.num_anisotropic_levels for variant 'xie' counts in-plane poolings: "
            f"between 1 and {pools} (len(channels) - 1), got {n_aniso}"
        )
    io_kernel = (1, 5, 5) if p["io_kernel"] is None else as_zyx("io_kernel", p["io_kernel"])
    if any(k % 2 == 0 for k in io_kernel):
        raise ConfigError(f"model_params.io_kernel must be odd on every axis for 'same' padding, got {io_kernel}")
    norm = p["norm"]
    num_groups = as_int("num_groups", p["num_groups"], minimum=1)
    _check_norm(norm, num_groups, channels)
    return {
        "variant": "xie",
        "in_channels": as_int("in_channels", p["in_channels"], minimum=1),
        "out_channels": as_int("out_channels", p["out_channels"], minimum=1),
        "channels": channels,
        "isotropic": False,
        "num_anisotropic_levels": n_aniso,
        "io_kernel": io_kernel,
        "norm": str(norm),
        "num_groups": num_groups,
        "norm_momentum": _momentum(p["norm_momentum"], "xie"),
    }


def default_params() -> dict[str, Any]:
    """The complete default hyper-parameters (isotropic, widths 28-36-48-64-80)."""
    return resolve_params({})


def module_kernels(params: Mapping[str, Any], level: int) -> tuple[tuple[int, int, int], tuple[int, int, int] | None]:
    """``(kernel, kernel_in)`` of the residual modules of ``level``: the kernel of the two
    inner convs and of the first conv (None: the same)."""
    if params.get("variant") == "xie":
        return (3, 3, 3), (1, 3, 3)
    return ((1, 3, 3) if level < params["num_anisotropic_levels"] else (3, 3, 3)), None


def pool_factors(params: Mapping[str, Any]) -> list[tuple[int, int, int]]:
    """The (z, y, x) max-pool factor after each level except the bottleneck."""
    levels = len(params["channels"])
    n_aniso = params["num_anisotropic_levels"]
    return [(1, 2, 2) if i < n_aniso else (2, 2, 2) for i in range(levels - 1)]


def downsampling_factor(params: Mapping[str, Any]) -> tuple[int, int, int]:
    """Total (z, y, x) down-sampling; every patch axis must be a multiple of it."""
    total = [1, 1, 1]
    for factor in pool_factors(params):
        total = [t * f for t, f in zip(total, factor, strict=True)]
    return (total[0], total[1], total[2])


def _norm(kind: str, channels: int, num_groups: int, momentum: float = 0.1) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels, momentum=momentum)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.GroupNorm(num_groups, channels)


def _conv(cin: int, cout: int, kernel: tuple[int, int, int], *, bias: bool) -> nn.Conv3d:
    # Odd kernels with k // 2 padding keep the shape ("same"), so skips line up exactly.
    return nn.Conv3d(cin, cout, kernel, padding=tuple(k // 2 for k in kernel), bias=bias)


class ResidualBlock(nn.Module):
    """conv (its output is the skip) → [norm, ELU, conv] × 2 → add skip → norm → ELU.

    ``kernel_in`` is the first conv's kernel (default: ``kernel``); Xie's modules use
    (1, 3, 3) there and (3, 3, 3) for the other two.
    """

    def __init__(
        self, cin: int, cout: int, kernel: tuple[int, int, int], norm: str, num_groups: int,
        momentum: float = 0.1, kernel_in: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        # Every conv is followed by a norm, which would cancel a bias, so none has one.
        self.conv_in = _conv(cin, cout, kernel_in or kernel, bias=False)
        self.norm1 = _norm(norm, cout, num_groups, momentum)
        self.conv1 = _conv(cout, cout, kernel, bias=False)
        self.norm2 = _norm(norm, cout, num_groups, momentum)
        self.conv2 = _conv(cout, cout, kernel, bias=False)
        self.norm_out = _norm(norm, cout, num_groups, momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.conv_in(x)
        h = self.conv1(F.elu(self.norm1(skip)))
        h = self.conv2(F.elu(self.norm2(h)))
        return F.elu(self.norm_out(h + skip))


class InputBlock(nn.Module):
    """The wide-kernel input conv (``io_kernel``), then norm and ELU.

    ``norm=None`` (Xie/Lee's embedding): conv with a bias, then ELU, no norm.
    """

    def __init__(
        self, cin: int, cout: int, kernel: tuple[int, int, int], norm: str | None, num_groups: int,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.conv = _conv(cin, cout, kernel, bias=norm is None)
        self.norm = _norm(norm, cout, num_groups, momentum) if norm is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(self.norm(self.conv(x)))


class SkipAdd(nn.Module):
    """Adds the encoder feature to the up-sampled decoder feature of the same level.

    A module (not a bare ``+``) so that tests and debugging hooks can see both operands.
    """

    def forward(self, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if up.shape != skip.shape:
            # Unreachable for patch sizes that pass check_patch_size; say so if it happens.
            raise ConfigError(
                f"rs_unet skip mismatch: decoder {tuple(up.shape)} vs encoder {tuple(skip.shape)} "
                "(N, C, Z, Y, X); the patch size is not a multiple of the down-sampling factor"
            )
        return up + skip


class UpBlock(nn.Module):
    """Transposed conv (kernel = stride = pool factor) to the shallower width, add, norm, ELU."""

    def __init__(
        self, cin: int, cout: int, factor: tuple[int, int, int], norm: str, num_groups: int,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.upconv = nn.ConvTranspose3d(cin, cout, factor, stride=factor, bias=False)
        self.join = SkipAdd()
        self.norm = _norm(norm, cout, num_groups, momentum)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return F.elu(self.norm(self.join(self.upconv(x), skip)))


class Encoder(nn.Module):
    """Input conv, one residual block per level, max-pool between levels.

    ``blocks[-1]`` is the bottleneck (deepest level); it counts as encoder.
    """

    def __init__(self, p: Mapping[str, Any]) -> None:
        super().__init__()
        channels = p["channels"]
        norm, groups, momentum = p["norm"], p["num_groups"], p.get("norm_momentum", 0.1)
        xie = p.get("variant") == "xie"
        self.input_conv = InputBlock(
            p["in_channels"], channels[0], p["io_kernel"], None if xie else norm, groups, momentum
        )
        self.blocks = nn.ModuleList()
        for level, width in enumerate(channels):
            kernel, kernel_in = module_kernels(p, level)
            cin = channels[level - 1] if level else channels[0]
            self.blocks.append(ResidualBlock(cin, width, kernel, norm, groups, momentum, kernel_in))
        self.pools = nn.ModuleList(nn.MaxPool3d(f, stride=f) for f in pool_factors(p))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return the bottleneck feature and the per-level skips (shallowest first)."""
        x = self.input_conv(x)
        skips = []
        for block, pool in zip(self.blocks[:-1], self.pools, strict=True):
            x = block(x)
            skips.append(x)
            x = pool(x)
        return self.blocks[-1](x), skips


class Decoder(nn.Module):
    """Per level (deepest first): up-sample, add the skip, residual block; then output conv.

    ``ups[i]`` and ``blocks[i]`` work at the resolution of encoder level ``i``.
    """

    def __init__(self, p: Mapping[str, Any]) -> None:
        super().__init__()
        channels = p["channels"]
        norm, groups, momentum = p["norm"], p["num_groups"], p.get("norm_momentum", 0.1)
        factors = pool_factors(p)
        self.ups = nn.ModuleList(
            UpBlock(channels[i + 1], channels[i], factors[i], norm, groups, momentum)
            for i in range(len(channels) - 1)
        )
        self.blocks = nn.ModuleList()
        for i in range(len(channels) - 1):
            kernel, kernel_in = module_kernels(p, i)
            self.blocks.append(ResidualBlock(channels[i], channels[i], kernel, norm, groups, momentum, kernel_in))
        kernel = p["io_kernel"]
        padding = tuple(k // 2 for k in kernel)
        if p.get("variant") == "xie":
            # Lee/Xie: an output embedding (conv + ELU, no norm), then a 1x1x1 conv to logits.
            self.output_embed: nn.Module | None = nn.Conv3d(channels[0], channels[0], kernel, padding=padding)
            self.output_conv = nn.Conv3d(channels[0], p["out_channels"], 1)
        else:
            self.output_embed = None
            self.output_conv = nn.Conv3d(channels[0], p["out_channels"], kernel, padding=padding)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for level in reversed(range(len(skips))):
            x = self.blocks[level](self.ups[level](x, skips[level]))
        if self.output_embed is not None:
            x = F.elu(self.output_embed(x))
        return self.output_conv(x)


class RSUNet(nn.Module):
    """Residual symmetric U-Net: ``(N, in_channels, Z, Y, X) → (N, out_channels, Z, Y, X)`` logits.

    Build it through ``catena_mito.models.build_model("rs_unet", **params)``, which validates
    ``params``; :attr:`params` holds the complete, resolved hyper-parameters.
    """

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.params = resolve_params(params)
        self.factor = downsampling_factor(self.params)
        self.encoder = Encoder(self.params)
        self.decoder = Decoder(self.params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or any(s % f for s, f in zip(x.shape[2:], self.factor, strict=True)):
            raise ConfigError(
                f"rs_unet input of shape {tuple(x.shape)} (N, C, Z, Y, X) must be 5-D with every "
                f"spatial axis a multiple of the down-sampling factor {self.factor} (z, y, x)"
            )
        bottom, skips = self.encoder(x)
        return self.decoder(bottom, skips)


def build(params: Mapping[str, Any]) -> RSUNet:
    """Build an :class:`RSUNet` from (possibly partial) hyper-parameters."""
    return RSUNet(**params)


def encoder_parameter_names(model: nn.Module) -> set[str]:
    """Names of the encoder parameters: everything under ``encoder.`` (bottleneck included)."""
    return {name for name, _ in model.named_parameters() if name.startswith("encoder.")}
