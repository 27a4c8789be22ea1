"""Fine-tuning weights (``model_loc``) from other layouts: bare state dicts, other tools'
checkpoints, name prefixes, strict and partial loads with their report."""

from __future__ import annotations

import logging

import pytest
import torch

from catena_mito.checkpoint import (
    find_state_dict,
    load_pretrained,
    load_weights_into,
    make_payload,
    save_checkpoint,
)
from catena_mito.config import TrainConfig, config_from_dict
from catena_mito.errors import CheckpointError, ConfigError
from catena_mito.models import build_model

TINY = {"channels": (2, 4)}


def _source():
    torch.manual_seed(0)
    return build_model("rs_unet", **TINY)


@pytest.mark.parametrize(
    "wrap,layout,renamed",
    [
        (lambda sd: sd, "bare state dict", None),
        (lambda sd: {"model": sd, "epoch": 3}, "model", None),
        (lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {}}, "model_state_dict", None),
        (lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}}, "state_dict", "module."),  # DDP
        (lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}}, "state_dict", "model."),  # Lightning
        (lambda sd: {"model": {"state_dict": sd}}, "model.state_dict", None),
    ],
)
def test_other_layouts_load_exactly(wrap, layout, renamed):
    source = _source()
    target = build_model("rs_unet", **TINY)
    report = load_weights_into(target, wrap(source.state_dict()))
    assert (report.layout, report.renamed, report.missing, report.unexpected) == (layout, renamed, [], [])
    assert len(report.loaded) == len(source.state_dict())
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name


def test_no_state_dict_names_the_keys():
    with pytest.raises(CheckpointError, match=r"no state dict \(top-level keys: 'epoch', 'weights'\)"):
        find_state_dict({"epoch": 1, "weights": [1, 2]})


def test_strict_by_default_partial_with_a_report(tmp_path, caplog):
    source = _source().state_dict()
    partial = {k: v for k, v in source.items() if not k.startswith("decoder.output_conv")}
    partial["aux_head.weight"] = torch.zeros(3)
    url = str(tmp_path / "foreign.pt")
    torch.save({"network_weights": partial}, url)  # nnU-Net's layout
    target = build_model("rs_unet", **TINY)
    with pytest.raises(CheckpointError, match=r"model_loc: .*foreign\.pt.*missing in checkpoint: decoder\.output_conv.*model_loc_strict: false"):
        load_pretrained(target, url, model_type="rs_unet")
    before = target.decoder.output_conv.weight.clone()
    with caplog.at_level(logging.INFO, logger="catena_mito"):
        report = load_pretrained(target, url, model_type="rs_unet", strict=False)
    assert set(report.missing) == {"decoder.output_conv.weight", "decoder.output_conv.bias"}
    assert report.unexpected == ["aux_head.weight"] and report.layout == "network_weights"
    assert torch.equal(target.decoder.output_conv.weight, before)
    assert torch.equal(target.encoder.input_conv.conv.weight, source["encoder.input_conv.conv.weight"])
    block = [r.getMessage() for r in caplog.records if "tensors loaded" in r.getMessage() and r.levelno == logging.INFO][-1]
    assert f"{len(report.loaded)} tensors loaded, 2 missing, 1 unexpected" in block
    assert "missing (keep their initial values): decoder.output_conv" in block and "unexpected (ignored): aux_head.weight" in block


def test_catena_checkpoint_keeps_its_checks(tmp_path):
    url = str(tmp_path / "ours.pth")
    save_checkpoint(url, make_payload("rs_unet", TINY, _source()))
    report = load_pretrained(build_model("rs_unet", **TINY), url, model_type="rs_unet")
    assert report.layout == "state_dict" and not report.missing
    with pytest.raises(CheckpointError, match="holds a 'rs_unet' model but model_type is 'monai_unet'"):
        load_pretrained(build_model("monai_unet", channels=(2, 4), strides=(2,)), url, model_type="monai_unet")


def test_model_loc_strict_needs_model_loc():
    base = {"train_zarr_dirs": ["d.zarr"]}
    assert config_from_dict(TrainConfig, {**base, "model_loc": "m.pth", "model_loc_strict": False}).model_loc_strict is False
    with pytest.raises(ConfigError, match="model_loc_strict: false needs model_loc"):
        config_from_dict(TrainConfig, {**base, "model_loc_strict": False})
