"""Clean stop: SIGTERM to a predict or label process that is PID 1 of its own PID
namespace (as in a container without an init) stops it within seconds, exit 143, no block
marked done without its data, and a rerun gives the bytes of a clean run. Also: progress
without a TTY is plain timestamped lines, no carriage returns."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_predict import MODEL_PARAMS, deterministic_model, make_raw, write_dataset

from catena_mito import storage

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare for a PID namespace"
)


def _env() -> dict:
    env = dict(os.environ, CATENA_PROGRESS_INTERVAL="0.2")  # same threads as this process: bitwise equal
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _as_pid1(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, "-m", "catena_mito", *args],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _child(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    """The host PID of the process unshare forked (PID 1 inside the namespace)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except FileNotFoundError:
            kids = []
        if kids:
            return int(kids[0])
        time.sleep(0.02)
    raise AssertionError("unshare did not fork")


def _wait_for_markers(folder: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(folder.glob("**/done/*.json")):
            return
        time.sleep(0.05)
    raise AssertionError(f"no done marker appeared (exit {proc.poll()}): {proc.stderr.read() if proc.poll() is not None else ''}")


def _stop(proc: subprocess.Popen) -> tuple[int, float, str]:
    child = _child(proc)
    nspid = [line for line in Path(f"/proc/{child}/status").read_text().splitlines() if line.startswith("NSpid:")]
    assert nspid[0].split()[-1] == "1", nspid  # PID 1 of its namespace
    t0 = time.monotonic()
    os.kill(child, signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, time.monotonic() - t0, err


def _check_markers_hold_data(output: Path, reference: np.ndarray) -> int:
    import json

    seen = 0
    for marker in output.glob(".catena/predict/runs/*/predict/done/*.json"):
        info = json.loads(marker.read_text())
        sl = tuple(slice(o, o + s) for o, s in zip(info["write_offset"], info["write_shape"]))
        assert np.array_equal(storage.open_array(str(output))[sl], reference[sl]), marker
        seen += 1
    return seen


@pytest.mark.slow
def test_sigterm_stops_predict_as_pid1_and_a_rerun_is_identical(tmp_path):
    import torch

    from catena_mito.checkpoint import make_payload, save_checkpoint

    model = deterministic_model()
    ckpt = str(tmp_path / "m.pth")
    save_checkpoint(ckpt, make_payload("monai_unet", MODEL_PARAMS, model, epoch=1,
                                       config={"patch_size": [8, 16, 16], "stride": [4, 8, 8]}))
    del torch
    write_dataset(str(tmp_path / "a.zarr"), make_raw((16, 48, 48)))
    write_dataset(str(tmp_path / "b.zarr"), make_raw((16, 48, 48)))

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"model_path": ckpt, "test_zarr_dirs": [str(tmp_path / f"{name}.zarr")],
                                        "device": "cpu", "block_shape": [8, 16, 16], "output_chunks": [8, 16, 16],
                                        "output_dtype": "float32"}))
        return path

    from catena_mito.config import PredictConfig, load_config
    from catena_mito.predict import predict

    predict(load_config(PredictConfig, str(config("b"))))
    reference = storage.open_array(str(tmp_path / "b.zarr/volumes/predictions/mito"))[...]
    out = tmp_path / "a.zarr/volumes/predictions/mito"
    proc = _as_pid1(["predict", "--config", str(config("a"))])
    # predict --phase all (window_sharing exchange) runs each block's windows and blend in
    # one pass: a SIGTERM lands in the model's work of some block
    _wait_for_markers(out / ".catena", proc)
    code, seconds, err = _stop(proc)
    assert code == 143, err
    assert seconds < 5.0, f"took {seconds:.1f} s to stop"
    assert "SIGTERM" in err and "Traceback" not in err
    assert "\r" not in err and "blocks (" in err  # plain progress lines, no bar
    done = len(list(out.glob(".catena/predict/runs/*/predict/done/*.json")))
    assert 0 < done < 2 * 3 * 3, "stopped before the end, with some blocks done"
    assert _check_markers_hold_data(out, reference) == done  # every block marked done holds its data
    for phase in ("windows", "predict"):
        states = [yaml.safe_load(p.read_text())["state"] for p in out.glob(f".catena/predict/runs/*/{phase}/shards/*.json")]
        assert states == ["stopped"], phase
    summary = predict(load_config(PredictConfig, str(config("a"))))
    assert summary["outputs"][0]["blocks_skipped"] == done  # resumed
    np.testing.assert_array_equal(storage.open_array(str(out))[...], reference)


@pytest.mark.slow
def test_sigterm_stops_label_as_pid1_and_a_rerun_is_identical(tmp_path):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    values = gaussian_filter(rng.random((64, 96, 96), dtype=np.float32), 1.5)
    values = (values - values.min()) / (values.max() - values.min())
    pred = str(tmp_path / "in.zarr/p")
    storage.create_array(pred, values.shape, values.dtype, (8, 8, 8))[...] = values

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"input_prediction_path": pred, "output_instance_dir": str(tmp_path / f"{name}.zarr"),
                                        "chunk_size": [8, 8, 8], "thres_small_instances": 3}))
        return path

    from catena_mito.config import LabelConfig, load_config
    from catena_mito.label import label

    label(load_config(LabelConfig, str(config("ref"))))
    reference = storage.open_array(str(tmp_path / "ref.zarr/mito_instances"))[...]
    proc = _as_pid1(["label", "--config", str(config("out"))])
    _wait_for_markers(tmp_path / "out.zarr/.catena", proc)
    code, seconds, err = _stop(proc)
    assert code == 143, err
    assert seconds < 5.0, f"took {seconds:.1f} s to stop"
    for marker in (tmp_path / "out.zarr").glob(".catena/label/*/runs/*/blocks/done/*.json"):
        assert (marker.parent.parent / "data" / f"{marker.stem}.npz").exists()
    label(load_config(LabelConfig, str(config("out"))))
    np.testing.assert_array_equal(storage.open_array(str(tmp_path / "out.zarr/mito_instances"))[...], reference)
