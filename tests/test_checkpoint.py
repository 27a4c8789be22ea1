"""Checkpoints: round trips, weights_only refusal, corrupt files, atomic writes, RNG state."""

from __future__ import annotations

import os
import pickle
import random
import uuid

import fsspec
import numpy as np
import pytest
import torch

from catena_mito import checkpoint as ckpt_mod
from catena_mito.checkpoint import (
    build_model_from_checkpoint,
    capture_rng_state,
    load_checkpoint,
    load_weights_into,
    make_payload,
    restore_rng_state,
    save_checkpoint,
)
from catena_mito.errors import CheckpointError, StorageError
from catena_mito.models import build_model

TINY = {"channels": (4, 6, 8)}


class _RunsCode:
    """A pickle payload that would create a file if it were ever unpickled unsafely."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _trained_payload(**kwargs):
    torch.manual_seed(1)
    model = build_model("rs_unet", **TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    model(torch.randn(2, 1, 4, 4, 4)).mean().backward()
    opt.step()
    sched.step()
    payload = make_payload(
        "rs_unet", TINY, model, opt, sched, epoch=3, best_metric=np.float64(0.75),
        config={"exp_name": "t", "patch_size": [4, 4, 4]}, **kwargs,
    )
    return model, payload


@pytest.fixture
def memory_url():
    url = f"memory://ckpt-{uuid.uuid4().hex}/run/model.pth"
    yield url
    fs = fsspec.filesystem("memory")
    root = url.split("/")[2]
    if fs.exists(f"/{root}"):
        fs.rm(f"/{root}", recursive=True)


@pytest.mark.parametrize("where", ["local", "file_url", "memory"])
def test_round_trip(tmp_path, memory_url, where):
    url = {
        "local": str(tmp_path / "nested" / "dir" / "model.pth"),
        "file_url": f"file://{tmp_path}/model.pth",
        "memory": memory_url,
    }[where]
    model, payload = _trained_payload()
    save_checkpoint(url, payload)
    loaded = load_checkpoint(url)
    assert loaded["model_type"] == "rs_unet"
    assert loaded["model_params"]["channels"] == (4, 6, 8)
    assert loaded["model_params"]["io_kernel"] == (5, 5, 5)  # defaults resolved
    assert loaded["epoch"] == 3 and loaded["best_metric"] == 0.75
    assert type(loaded["best_metric"]) is float
    assert loaded["format_version"] == 1 and loaded["config"]["exp_name"] == "t"
    assert loaded["optimizer"]["param_groups"][0]["lr"] == payload["optimizer"]["param_groups"][0]["lr"]
    assert loaded["scheduler"]["last_epoch"] == 1

    rebuilt = build_model_from_checkpoint(loaded).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))
    opt = torch.optim.AdamW(rebuilt.parameters(), lr=1e-3)
    opt.load_state_dict(loaded["optimizer"])  # resumable


def test_monai_round_trip(tmp_path):
    params = {"channels": (4, 6, 8), "strides": (2, 2), "num_res_units": 1}
    model = build_model("monai_unet", **params)
    url = str(tmp_path / "m.pth")
    save_checkpoint(url, make_payload("monai_unet", params, model))
    loaded = load_checkpoint(url)
    assert loaded["model_params"]["act"] == "PRELU"
    rebuilt = build_model_from_checkpoint(loaded)
    for k, v in model.state_dict().items():
        assert torch.equal(v, rebuilt.state_dict()[k])


def test_overwrite_replaces_atomically(tmp_path):
    url = str(tmp_path / "model.pth")
    _, first = _trained_payload()
    save_checkpoint(url, first)
    first["epoch"] = 9
    save_checkpoint(url, first)
    assert load_checkpoint(url)["epoch"] == 9
    assert os.listdir(tmp_path) == ["model.pth"]


@pytest.mark.parametrize("how", ["torch_save", "plain_pickle"])
def test_code_in_pickle_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    evil = {"model_type": "rs_unet", "state_dict": {}, "x": _RunsCode(str(marker))}
    path = tmp_path / "evil.pth"
    if how == "torch_save":
        torch.save(evil, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(evil, fh)
    with pytest.raises(CheckpointError, match="contains code or Python objects that weights_only"):
        load_checkpoint(str(path))
    assert not marker.exists()


def test_numpy_objects_are_refused_at_save_with_the_key(tmp_path):
    model = build_model("rs_unet", **TINY)
    payload = make_payload("rs_unet", TINY, model, config={"lr": np.float32(1e-3)})
    with pytest.raises(CheckpointError, match=r"payload\['config'\]\['lr'\] has type numpy.float32"):
        save_checkpoint(str(tmp_path / "m.pth"), payload)
    assert not list(tmp_path.iterdir())


def test_missing_file_names_the_url(tmp_path, memory_url):
    for url in (str(tmp_path / "nope.pth"), memory_url):
        with pytest.raises(CheckpointError, match=f"checkpoint not found: {url}"):
            load_checkpoint(url)


@pytest.mark.parametrize("cut", [0, 10, 0.5, -1])
def test_truncated_file_is_reported(tmp_path, cut):
    _, payload = _trained_payload()
    good = tmp_path / "good.pth"
    save_checkpoint(str(good), payload)
    data = good.read_bytes()
    n = cut if isinstance(cut, int) and cut >= 0 else (int(len(data) * cut) if cut > 0 else len(data) - 100)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="(truncated or corrupt|is empty)") as err:
        load_checkpoint(str(bad))
    assert "\n" not in str(err.value)


def test_garbage_file_is_reported(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(str(bad))


def test_missing_keys_and_unknown_model_type(tmp_path):
    model = build_model("rs_unet", **TINY)
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    with pytest.raises(CheckpointError, match="missing required keys: .*bare model state_dict"):
        load_checkpoint(str(bare))

    payload = make_payload("rs_unet", TINY, model)
    del payload["model_params"]
    with pytest.raises(CheckpointError, match="missing required keys: model_params"):
        save_checkpoint(str(tmp_path / "x.pth"), payload)
    torch.save(payload, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="missing required keys: model_params"):
        load_checkpoint(str(tmp_path / "x.pth"))

    payload = make_payload("rs_unet", TINY, model)
    payload["model_type"] = "vnet"
    torch.save(payload, tmp_path / "y.pth")
    with pytest.raises(CheckpointError, match=r"unknown model_type 'vnet'.*monai_unet, rs_unet"):
        load_checkpoint(str(tmp_path / "y.pth"))


def test_newer_format_version_is_refused(tmp_path):
    payload = make_payload("rs_unet", TINY, build_model("rs_unet", **TINY))
    payload["format_version"] = 2
    torch.save(payload, tmp_path / "v2.pth")
    with pytest.raises(CheckpointError, match="format_version 2"):
        load_checkpoint(str(tmp_path / "v2.pth"))


def test_build_from_checkpoint_with_wrong_weights_names_keys():
    model = build_model("rs_unet", **TINY)
    payload = make_payload("rs_unet", TINY, model)
    payload["state_dict"] = dict(payload["state_dict"])
    payload["state_dict"]["extra.weight"] = torch.zeros(1)
    del payload["state_dict"]["decoder.output_conv.bias"]
    with pytest.raises(CheckpointError) as err:
        build_model_from_checkpoint(payload)
    msg = str(err.value)
    assert "missing in checkpoint: decoder.output_conv.bias" in msg
    assert "unexpected in checkpoint: extra.weight" in msg

    payload = make_payload("rs_unet", TINY, model)
    payload["model_params"] = {**payload["model_params"], "depth": 3}
    with pytest.raises(CheckpointError, match="'depth'"):
        build_model_from_checkpoint(payload)


def test_load_weights_into_refuses_other_architectures():
    source = make_payload("rs_unet", TINY, build_model("rs_unet", **TINY))
    wider = build_model("rs_unet", channels=(4, 6, 12))
    with pytest.raises(CheckpointError, match=r"shape mismatch: encoder\.blocks\.2"):
        load_weights_into(wider, source)
    # Not even strict=False loads mismatched shapes, or a model with nothing in common.
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_weights_into(wider, source, strict=False)
    monai = build_model("monai_unet", channels=(4, 6, 8), strides=(2, 2))
    with pytest.raises(CheckpointError, match="no tensor name of the model"):
        load_weights_into(monai, source, strict=False)
    with pytest.raises(CheckpointError, match=r"missing in checkpoint: model\.0"):
        load_weights_into(monai, source)


def test_load_weights_into_strict_false_reports_what_it_skipped(caplog):
    model = build_model("rs_unet", **TINY)
    source = make_payload("rs_unet", TINY, model)
    source["state_dict"] = {
        k: v for k, v in source["state_dict"].items() if not k.startswith("decoder.output_conv")
    }
    target = build_model("rs_unet", **TINY, out_channels=3)
    before = target.decoder.output_conv.weight.clone()
    report = load_weights_into(target, source, strict=False)
    assert set(report.missing) == {"decoder.output_conv.weight", "decoder.output_conv.bias"}
    assert torch.equal(target.decoder.output_conv.weight, before)
    assert torch.equal(target.encoder.input_conv.conv.weight, model.encoder.input_conv.conv.weight)
    assert "partial weight load" in caplog.text


def test_killed_write_leaves_no_partial_file_local(tmp_path, monkeypatch):
    url = str(tmp_path / "model.pth")
    _, payload = _trained_payload()
    save_checkpoint(url, payload)
    good = (tmp_path / "model.pth").read_bytes()

    def crash(fh, data):
        fh.write(data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod, "_copy_to", crash)
    payload["epoch"] = 42
    with pytest.raises(StorageError, match="simulated"):
        save_checkpoint(url, payload)
    assert os.listdir(tmp_path) == ["model.pth"]  # temp file removed
    assert (tmp_path / "model.pth").read_bytes() == good  # old checkpoint intact

    fresh = str(tmp_path / "sub" / "new.pth")
    with pytest.raises(StorageError, match="simulated"):
        save_checkpoint(fresh, payload)
    assert os.listdir(tmp_path / "sub") == []


def test_killed_write_leaves_no_partial_file_memory(memory_url, monkeypatch):
    _, payload = _trained_payload()

    def crash(fh, data):
        fh.write(data[: len(data) // 2])
        raise OSError("connection reset (simulated)")

    monkeypatch.setattr(ckpt_mod, "_copy_to", crash)
    with pytest.raises(StorageError, match="simulated"):
        save_checkpoint(memory_url, payload)
    fs = fsspec.filesystem("memory")
    parent = memory_url.split("://", 1)[1].rsplit("/", 1)[0]
    assert not fs.exists(memory_url) and (not fs.exists(parent) or fs.ls(parent) == [])


def _draws():
    return (
        torch.rand(5).tolist(),
        np.random.rand(5).tolist(),
        float(np.random.normal()),
        [random.random() for _ in range(5)],
        random.gauss(0, 1),
    )


def test_rng_round_trip_through_checkpoint(tmp_path):
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(99)
    np.random.normal()  # leave a cached gaussian in numpy's state
    random.gauss(0, 1)  # ... and in python's
    state = capture_rng_state()
    expected = _draws()
    _, payload = _trained_payload(rng=state)
    url = str(tmp_path / "rng.pth")
    save_checkpoint(url, payload)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    assert _draws() != expected
    restore_rng_state(load_checkpoint(url)["rng"])
    assert _draws() == expected


def test_malformed_rng_state():
    with pytest.raises(CheckpointError, match="rng state is malformed"):
        restore_rng_state({"torch": torch.get_rng_state()})
