"""export-model: TorchScript (and ONNX) that predict the checkpoint's probabilities, a model
card, predict running an exported model, and the refusals."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from catena_mito import storage
from catena_mito.checkpoint import (
    build_model_from_checkpoint,
    load_checkpoint,
    make_payload,
    save_checkpoint,
)
from catena_mito.config import PredictConfig, config_from_dict
from catena_mito.errors import CheckpointError, ConfigError
from catena_mito.model_export import (
    CARD_NAME,
    export_model,
    is_torchscript,
    load_model_source,
)
from catena_mito.models import build_model
from catena_mito.targets import probabilities

PATCH = [8, 16, 16]
TINY = {"monai_unet": {"channels": (4, 8), "strides": (2,), "num_res_units": 1}, "rs_unet": {"channels": (2, 4)}}
TRAIN_CFG = {"patch_size": PATCH, "stride": [4, 8, 8], "clahe": True, "original_res": [8.0, 4.0, 4.0],
             "target_res": [8.0, 8.0, 8.0], "label_type": "mito",
             "train_zarr_dirs": ["s3://lab/fib1.zarr"], "test_zarr_dirs": ["s3://lab/fib2.zarr"]}


def _checkpoint(tmp_path, model_type: str) -> str:
    torch.manual_seed(0)
    model = build_model(model_type, **TINY[model_type])
    with torch.no_grad():  # batch-norm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.05, 0.2)
    run = tmp_path / "run"
    url = str(run / "best.pth")
    save_checkpoint(url, make_payload(model_type, TINY[model_type], model, epoch=4, best_metric=0.71, config=TRAIN_CFG))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"epoch": 2, "train_loss": 0.5, "val_iou": 0.6, "val_dice": 0.7},
        {"epoch": 4, "train_loss": 0.4, "val_iou": 0.71, "val_dice": 0.8},
        {"epoch": 6, "train_loss": 0.3, "val_iou": 0.75, "val_dice": 0.85},  # after this checkpoint
    ]) + "\n")
    return url


@pytest.mark.parametrize("model_type", ["monai_unet", "rs_unet"])
def test_torchscript_gives_the_checkpoints_probabilities_bitwise(tmp_path, model_type):
    ckpt_url = _checkpoint(tmp_path, model_type)
    out = str(tmp_path / "export")
    card = export_model(ckpt_url, out)
    assert card["verification"]["torchscript"] == 0.0
    scripted = torch.jit.load(str(tmp_path / "export" / "model.pt"))
    reference = build_model_from_checkpoint(load_checkpoint(ckpt_url)).eval()
    # Another batch size and patch than the trace saw: the graph holds for any.
    x = torch.rand((3, 1, 16, 16, 32), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(probabilities(scripted(x), ["foreground"]), probabilities(reference(x), ["foreground"]))
    on_disk = json.loads((tmp_path / "export" / CARD_NAME).read_text())
    assert on_disk == json.loads(json.dumps(card))
    assert on_disk["model_type"] == model_type and on_disk["targets"] == ["foreground"]
    assert on_disk["input"]["patch_size"] == PATCH and on_disk["resolution_nm"]["training"] == [8.0, 8.0, 8.0]
    assert on_disk["preprocessing"]["clahe"] is True
    assert on_disk["training_data"] == ["s3://lab/fib1.zarr"] and on_disk["validation_data"] == ["s3://lab/fib2.zarr"]
    assert on_disk["validation_metrics"]["best_val_iou"] == 0.71
    assert on_disk["validation_metrics"]["at_epoch"] == {"epoch": 4, "val_iou": 0.71, "val_dice": 0.8}
    assert "# " + model_type in (tmp_path / "export" / "README.md").read_text()


def _write_raw(url: str) -> str:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (12, 40, 36), dtype=np.uint8)
    storage.create_array(storage.join_url(url, storage.RAW_PATH), raw.shape, raw.dtype, (6, 16, 16),
                         attrs=storage.spatial_attrs((8.0, 4.0, 4.0)))[...] = raw
    return url


@pytest.mark.slow
def test_predict_runs_an_exported_model_like_its_checkpoint(tmp_path):
    from catena_mito.predict import output_urls, predict

    ckpt_url = _checkpoint(tmp_path, "monai_unet")
    export_model(ckpt_url, str(tmp_path / "export"))
    data = _write_raw(str(tmp_path / "vol.zarr"))
    results = []
    for name, model_path in (("ckpt", ckpt_url), ("ts", str(tmp_path / "export" / "model.pt"))):
        config = config_from_dict(PredictConfig, {
            "model_path": model_path, "test_zarr_dirs": [data], "device": "cpu", "clahe": False,
            "block_shape": [8, 16, 16], "output_chunks": [8, 16, 16], "output_dtype": "float32",
            "output_dir": str(tmp_path / name)})
        predict(config)  # patch, stride and target_res come from the card as from the checkpoint
        arr = storage.open_array(output_urls(config)[0])
        assert list(arr.attrs["resolution"]) == [8.0, 8.0, 8.0]
        results.append(arr[...])
    np.testing.assert_array_equal(results[0], results[1])


def test_onnx_export_matches_within_tolerance(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    card = export_model(_checkpoint(tmp_path, "monai_unet"), str(tmp_path / "export"), onnx=True)
    assert card["verification"]["onnx"] <= 1e-4
    assert (tmp_path / "export" / "model.onnx").stat().st_size > 0


def test_refusals_write_nothing(tmp_path, monkeypatch):
    ckpt_url = _checkpoint(tmp_path, "monai_unet")
    out = tmp_path / "export"
    export_model(ckpt_url, str(out))
    with pytest.raises(ConfigError, match="--overwrite"):
        export_model(ckpt_url, str(out))
    # TorchScript that is not ours: refused by predict's loader with one line.
    plain = torch.jit.trace(torch.nn.Conv3d(1, 2, 1), torch.zeros(1, 1, 2, 2, 2))
    buffer = io.BytesIO()
    torch.jit.save(plain, buffer)
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(buffer.getvalue())
    assert is_torchscript(foreign.read_bytes()) and not is_torchscript((tmp_path / "run" / "best.pth").read_bytes())
    with pytest.raises(CheckpointError, match="without a catena-mito model card"):
        load_model_source(str(foreign))
    # An export that would not reproduce the checkpoint is refused before any file exists.
    import catena_mito.model_export as me

    monkeypatch.setattr(me, "TORCHSCRIPT_TOLERANCE", -1.0)
    with pytest.raises(CheckpointError, match="differs from the checkpoint"):
        export_model(ckpt_url, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
    # ONNX without the package names the install.
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)
    monkeypatch.setattr(me, "TORCHSCRIPT_TOLERANCE", 1e-6)
    with pytest.raises(ConfigError, match="pip install onnx"):
        export_model(ckpt_url, str(tmp_path / "no_onnx"), onnx=True)
    assert not (tmp_path / "no_onnx").exists()


def test_cli_export_model(tmp_path, capsys):
    from catena_mito.cli import main

    main(["export-model", _checkpoint(tmp_path, "monai_unet"), str(tmp_path / "e")])
    assert "TorchScript 0" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["README.md", "model.pt", "model_card.json"]
