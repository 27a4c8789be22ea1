"""Model registry and backbones: shapes, skip geometry, encoder names, errors (tiny, CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from catena_mito.errors import ConfigError
from catena_mito.models import (
    MODEL_TYPES,
    build_model,
    check_patch_size,
    default_model_params,
    downsampling_factor,
    encoder_parameter_names,
    resolve_model_params,
)
from catena_mito.models.rs_unet import SkipAdd

# Tiny configurations: (model_type, params, input (z, y, x)).
TINY = {
    "monai_unet": {"channels": (4, 6, 8), "strides": (2, 2), "num_res_units": 1},
    "rs_unet": {"channels": (4, 6, 8)},
}
TINY_ANISO = {
    "monai_unet": {"channels": (4, 6, 8), "strides": ((1, 2, 2), 2), "num_res_units": 1},
    "rs_unet": {"channels": (4, 6, 8), "isotropic": False, "num_anisotropic_levels": 1},
}


def _forward(model: nn.Module, shape: tuple[int, int, int], batch: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, 1, *shape))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize(("params", "shape"), [(TINY, (8, 12, 16)), (TINY_ANISO, (4, 12, 8))])
def test_output_shape_equals_input_shape(model_type, params, shape):
    model = build_model(model_type, **params[model_type])
    out = _forward(model, shape)
    assert out.shape == (2, 2, *shape)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_out_channels_and_in_channels_are_configurable(model_type):
    model = build_model(model_type, **TINY[model_type], in_channels=2, out_channels=3)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 2, 4, 8, 8))
    assert out.shape == (1, 3, 4, 8, 8)


def test_downsampling_factors():
    assert downsampling_factor("rs_unet", TINY["rs_unet"]) == (4, 4, 4)
    assert downsampling_factor("rs_unet", TINY_ANISO["rs_unet"]) == (2, 4, 4)
    assert downsampling_factor("monai_unet", TINY_ANISO["monai_unet"]) == (2, 4, 4)
    assert downsampling_factor("rs_unet") == (16, 16, 16)
    assert downsampling_factor("monai_unet") == (16, 16, 16)
    # Anisotropic default: the first two poolings are in-plane only.
    assert downsampling_factor("rs_unet", {"isotropic": False}) == (4, 16, 16)


def test_rs_unet_skips_join_at_matching_resolution():
    """Every skip addition sees an encoder and a decoder feature of identical shape."""
    params = {"channels": (4, 6, 8, 10), "isotropic": False, "num_anisotropic_levels": 2}
    model = build_model("rs_unet", **params)
    joins: dict[str, tuple] = {}

    def hook(name):
        def record(module, args, output):
            up, skip = args
            joins[name] = (tuple(up.shape), tuple(skip.shape), tuple(output.shape))

        return record

    for name, module in model.named_modules():
        if isinstance(module, SkipAdd):
            module.register_forward_hook(hook(name))
    _forward(model, (8, 16, 16), batch=1)
    # Level i keeps z until it has pooled past the anisotropic levels: (1,2,2),(1,2,2),(2,2,2).
    expected = {
        "decoder.ups.0.join": (1, 4, 8, 16, 16),
        "decoder.ups.1.join": (1, 6, 8, 8, 8),
        "decoder.ups.2.join": (1, 8, 8, 4, 4),
    }
    assert {k: v[0] for k, v in joins.items()} == expected
    for up, skip, out in joins.values():
        assert up == skip == out


def test_rs_unet_kernels_follow_anisotropy():
    model = build_model("rs_unet", channels=(4, 6, 8), isotropic=False, num_anisotropic_levels=1)
    assert model.encoder.input_conv.conv.kernel_size == (1, 5, 5)
    assert model.encoder.blocks[0].conv1.kernel_size == (1, 3, 3)
    assert model.encoder.blocks[1].conv1.kernel_size == (3, 3, 3)
    assert model.encoder.pools[0].kernel_size == (1, 2, 2)
    assert model.encoder.pools[1].kernel_size == (2, 2, 2)
    assert model.decoder.ups[0].upconv.stride == (1, 2, 2)
    assert model.decoder.output_conv.kernel_size == (1, 5, 5)
    iso = build_model("rs_unet", channels=(4, 6, 8))
    assert all(p.kernel_size == (2, 2, 2) for p in iso.encoder.pools)
    assert iso.encoder.input_conv.conv.kernel_size == (5, 5, 5)


def test_monai_unet_skips_join_at_matching_resolution():
    from monai.networks.layers import SkipConnection

    model = build_model("monai_unet", **TINY_ANISO["monai_unet"])
    seen: dict[str, dict[str, tuple]] = {}

    def record(name, what):
        def hook(module, args, output):
            entry = seen.setdefault(name, {})
            entry[what] = tuple(output.shape)
            if what == "out":
                entry["x"] = tuple(args[0].shape)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, SkipConnection):
            module.register_forward_hook(record(name, "out"))
            module.submodule.register_forward_hook(record(name, "inner"))
    _forward(model, (4, 8, 8), batch=1)
    assert len(seen) == 2
    assert seen["model.1"]["x"] == (1, 4, 4, 4, 4)  # after the (1, 2, 2) stride
    for entry in seen.values():
        x, inner, out = entry["x"], entry["inner"], entry["out"]
        assert x[2:] == inner[2:] == out[2:]  # concatenation at one resolution
        assert out[1] == x[1] + inner[1]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patch_size_check_lists_working_sizes(model_type):
    check_patch_size(model_type, TINY[model_type], (8, 12, 16))
    with pytest.raises(ConfigError) as err:
        check_patch_size(model_type, TINY[model_type], (8, 10, 2))
    msg = str(err.value)
    assert "[8, 10, 2]" in msg and "[4, 4, 4]" in msg
    assert "y: 8 or 12" in msg and "x: 4 or 8" in msg
    assert "z:" not in msg


def test_patch_size_check_default_and_anisotropic():
    with pytest.raises(ConfigError, match=r"z: 96 or 112, y: 128 or 144"):
        check_patch_size("rs_unet", {}, (100, 130, 128))
    check_patch_size("rs_unet", {"isotropic": False}, (12, 64, 64))
    with pytest.raises(ConfigError, match="patch_size must be three integers"):
        check_patch_size("rs_unet", {}, (64, 64))


def test_rs_unet_forward_rejects_incompatible_shape():
    model = build_model("rs_unet", **TINY["rs_unet"])
    with pytest.raises(ConfigError, match="multiple of the down-sampling factor"):
        model(torch.randn(1, 1, 6, 8, 8))


def test_unknown_model_type_suggests_a_name():
    with pytest.raises(ConfigError, match=r"'rsunet'.*did you mean 'rs_unet'.*monai_unet, rs_unet"):
        build_model("rsunet")
    with pytest.raises(ConfigError, match="unknown model_type"):
        default_model_params("unet3d")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_unknown_param_key_is_named(model_type):
    with pytest.raises(ConfigError, match=r"'chanels'.*did you mean 'channels'"):
        build_model(model_type, chanels=(4, 8))


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"channels": (8,)}, "at least 2 widths"),
        ({"channels": (8, 0)}, "integers >= 1"),
        ({"norm": "batchnorm"}, "did you mean 'batch'"),
        ({"isotropic": True, "num_anisotropic_levels": 1}, "contradicts"),
        ({"num_anisotropic_levels": 9}, "between 0 and 5"),
        ({"io_kernel": (1, 4, 4)}, "odd"),
        ({"norm": "group", "num_groups": 8}, "must divide"),
    ],
)
def test_rs_unet_invalid_params(params, match):
    with pytest.raises(ConfigError, match=match):
        build_model("rs_unet", **params)


def test_monai_invalid_params():
    with pytest.raises(ConfigError, match="strides must have len"):
        build_model("monai_unet", channels=(4, 8, 16), strides=(2,))
    with pytest.raises(ConfigError, match="spatial_dims is fixed"):
        build_model("monai_unet", spatial_dims=2)


def test_defaults_are_complete_and_plain():
    rs = default_model_params("rs_unet")
    assert rs["channels"] == (28, 36, 48, 64, 80)
    assert rs["io_kernel"] == (5, 5, 5) and rs["num_anisotropic_levels"] == 0
    mo = default_model_params("monai_unet")
    assert mo["channels"] == (28, 36, 48, 64, 80) and mo["strides"] == (2, 2, 2, 2)
    # Catena's scripts: plain units (num_res_units=0), batch norm, dropout 0.1.
    assert mo["num_res_units"] == 0 and mo["norm"] == "batch" and mo["dropout"] == 0.1
    assert mo["norm_momentum"] == 0.1 and rs["norm_momentum"] == 0.1 and rs["variant"] == "fibsem"
    assert type(mo["act"]) is str  # not a MONAI enum: checkpoints load with weights_only
    # Resolved params rebuild the same architecture.
    for model_type in MODEL_TYPES:
        resolved = resolve_model_params(model_type, TINY[model_type])
        assert resolve_model_params(model_type, resolved) == resolved
        a = build_model(model_type, **TINY[model_type]).state_dict()
        b = build_model(model_type, **resolved).state_dict()
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_rs_unet_encoder_names_exact():
    model = build_model("rs_unet", channels=(4, 6, 8))
    names = encoder_parameter_names(model, "rs_unet")
    expected = {n for n, _ in model.encoder.named_parameters(prefix="encoder")}
    assert names == expected
    assert "encoder.input_conv.conv.weight" in names
    assert "encoder.blocks.2.conv_in.weight" in names  # bottleneck
    assert not any(n.startswith("decoder.") for n in names)


def test_monai_encoder_names_exact():
    model = build_model("monai_unet", channels=(4, 6, 8), strides=(2, 2), num_res_units=1)
    names = encoder_parameter_names(model, "monai_unet")
    # Level 0 down, level 1 down, bottom; up layers are model.2.* and model.1.submodule.2.*.
    expected = {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("model.0.", "model.1.submodule.0.", "model.1.submodule.1.submodule."))
    }
    assert names == expected
    assert "model.1.submodule.1.submodule.conv.unit0.conv.weight" in names
    assert not any(n.startswith(("model.2.", "model.1.submodule.2.")) for n in names)
    # Works for num_res_units=0 (plain Convolution layers) and deeper nets as well.
    deep = build_model("monai_unet", channels=(4, 6, 8, 10), strides=(2, 2, 2), num_res_units=0)
    deep_names = encoder_parameter_names(deep, "monai_unet")
    downs = ("model.0.", "model.1.submodule.0.", "model.1.submodule.1.submodule.0.")
    bottom = "model.1.submodule.1.submodule.1.submodule."
    assert deep_names == {n for n, _ in deep.named_parameters() if n.startswith((*downs, bottom))}
    assert bottom + "conv.weight" in deep_names


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_freezing_encoder_leaves_only_decoder_grads(model_type):
    model = build_model(model_type, **TINY[model_type])
    encoder = encoder_parameter_names(model, model_type)
    params = dict(model.named_parameters())
    assert encoder and encoder < set(params)
    for name in encoder:
        params[name].requires_grad_(False)
    model.train()
    model(torch.randn(2, 1, 8, 8, 8)).sum().backward()
    for name, p in params.items():
        if name in encoder:
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
    assert any(params[n].grad.abs().sum() > 0 for n in params if n not in encoder)


def test_default_parameter_counts(capsys):
    counts = {}
    for model_type in MODEL_TYPES:
        model = build_model(model_type)
        enc = encoder_parameter_names(model, model_type)
        total = sum(p.numel() for p in model.parameters())
        in_enc = sum(p.numel() for n, p in model.named_parameters() if n in enc)
        counts[model_type] = (total, in_enc)
        with capsys.disabled():
            print(f"\n{model_type}: {total:,} parameters ({in_enc:,} in the encoder)")
    assert counts["rs_unet"][0] > 10**6
    assert 600_000 < counts["monai_unet"][0] < 700_000  # Catena's 0.63 M (num_res_units=0)


# --- Xie et al.'s anisotropic RS-UNet, batch-norm momentum, old checkpoints ---------------


def test_rs_unet_xie_preset_follows_the_published_architecture():
    params = resolve_model_params("rs_unet", {"variant": "xie"})
    assert params["channels"] == (28, 36, 48, 64, 80) and params["norm_momentum"] == 0.01
    assert params["io_kernel"] == (1, 5, 5)
    assert downsampling_factor("rs_unet", {"variant": "xie"}) == (1, 16, 16)  # z never pooled
    check_patch_size("rs_unet", {"variant": "xie"}, (18, 160, 160))  # Xie's 18-slice window
    model = build_model("rs_unet", variant="xie", channels=(4, 6, 8))
    # Every module, encoder and decoder: a (1, 3, 3) conv, then two (3, 3, 3) convs.
    blocks = list(model.encoder.blocks) + list(model.decoder.blocks)
    for block in blocks:
        assert block.conv_in.kernel_size == (1, 3, 3)
        assert block.conv1.kernel_size == block.conv2.kernel_size == (3, 3, 3)
    assert [p.kernel_size for p in model.encoder.pools] == [(1, 2, 2), (1, 2, 2)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    assert bns and all(m.momentum == 0.01 for m in bns)
    # The embedding has no norm; the output embedding is followed by a 1x1x1 conv.
    assert isinstance(model.encoder.input_conv.norm, nn.Identity)
    assert model.decoder.output_conv.kernel_size == (1, 1, 1)
    out = _forward(model, (18, 16, 16), batch=1)
    assert out.shape == (1, 2, 18, 16, 16)
    # z pooling in deeper levels is possible for less anisotropic data.
    partly = resolve_model_params("rs_unet", {"variant": "xie", "channels": (4, 6, 8), "num_anisotropic_levels": 1})
    assert downsampling_factor("rs_unet", partly) == (2, 4, 4)
    with pytest.raises(ConfigError, match="variant"):
        resolve_model_params("rs_unet", {"variant": "xei"})
    with pytest.raises(ConfigError, match="isotropic=true contradicts variant 'xie'"):
        resolve_model_params("rs_unet", {"variant": "xie", "isotropic": True})


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_norm_momentum_is_configurable(model_type):
    model = build_model(model_type, **TINY[model_type], norm_momentum=0.02)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    assert bns and all(m.momentum == 0.02 for m in bns)
    with pytest.raises(ConfigError, match="norm_momentum"):
        resolve_model_params(model_type, {**TINY[model_type], "norm_momentum": 0})


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_checkpoints_from_before_the_new_params_rebuild_and_predict_the_same(model_type):
    """Stored params without ``variant``/``norm_momentum`` (older checkpoints) rebuild the
    same network: same tensor names and shapes, bit-identical output with the same weights."""
    from catena_mito.checkpoint import build_model_from_checkpoint, make_payload

    torch.manual_seed(0)
    extra = {"num_res_units": 2} if model_type == "monai_unet" else {}
    model = build_model(model_type, **{**TINY[model_type], **extra})
    payload = make_payload(model_type, {**TINY[model_type], **extra}, model)
    old = dict(payload["model_params"])
    old.pop("norm_momentum")
    old.pop("variant", None)
    payload["model_params"] = old
    rebuilt = build_model_from_checkpoint(payload)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    model.eval()
    rebuilt.eval()
    x = torch.randn(1, 1, 8, 12, 16)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
