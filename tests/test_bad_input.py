"""Bad input catalogue (issue 8): every case through the CLI's ``main``.

Each case must give exactly ONE line on stderr (``catena-mito: error: ...``) that names the
field or path and the problem, a non-zero exit (2 for configuration, 1 for runtime), no
traceback, and leave nothing behind that looks complete: no done markers, no
``complete.json``, no output array, no ``last.pth``.

The cases run in-process through :func:`catena_mito.cli.main` (what the ``catena-mito``
entry point calls), with stdout/stderr captured; a few run as real subprocesses to check the
whole path, including ``--debug``. One tiny synthetic dataset and one tiny checkpoint are
shared by the module.
"""

from __future__ import annotations

import os
import pickle
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from catena_mito import storage

SHAPE = (16, 32, 32)
PATCH = [8, 16, 16]
RS_TINY = {"channels": [2, 4]}


# --- shared inputs ------------------------------------------------------------------------------


class Evil:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, proof: str):
        self.proof = proof

    def __reduce__(self):
        return (os.system, (f"touch {self.proof}",))


@dataclass
class World:
    root: Path
    dataset: str  # a good dataset (raw + labels)
    probs: str  # a good float32 probability array
    ckpt: str  # a good rs_unet checkpoint
    bad: dict[str, str] = field(default_factory=dict)  # bad inputs by name
    proof: str = ""  # created if the malicious checkpoint's code ever runs


def _array(url: str, data: np.ndarray, chunks=None) -> str:
    chunks = chunks or tuple(max(1, min(s, 16)) for s in data.shape) or ()
    arr = storage.create_array(url, data.shape, data.dtype, chunks,
                               attrs=storage.spatial_attrs((8, 8, 8)) if data.ndim == 3 else None)
    if data.size:
        arr[...] = data
    return url


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    import torch

    from catena_mito.checkpoint import make_payload, save_checkpoint
    from catena_mito.models import build_model
    from catena_mito.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("bad-input")
    dataset = write_synthetic_dataset(str(root / "good.zarr"), shape=SHAPE, seed=3, chunks=(8, 16, 16))
    rng = np.random.default_rng(0)
    probs = _array(str(root / "probs.zarr"), rng.random(SHAPE, dtype=np.float32), (8, 16, 16))
    torch.manual_seed(0)
    model = build_model("rs_unet", **RS_TINY)
    ckpt = str(root / "model.pth")
    save_checkpoint(ckpt, make_payload("rs_unet", RS_TINY, model, config={"patch_size": PATCH, "stride": PATCH}))
    w = World(root, dataset, probs, ckpt, proof=str(root / "PWNED"))
    data = Path(ckpt).read_bytes()
    b = w.bad
    # checkpoints
    (root / "truncated.pth").write_bytes(data[: len(data) // 2])
    b["truncated"] = str(root / "truncated.pth")
    (root / "corrupt.pth").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    b["corrupt"] = str(root / "corrupt.pth")
    b["evil"] = str(root / "evil.pth")
    torch.save({"model_type": "rs_unet", "state_dict": Evil(w.proof)}, b["evil"])
    b["evil_pickle"] = str(root / "evil.pkl")
    Path(b["evil_pickle"]).write_bytes(pickle.dumps(Evil(w.proof)))
    b["not_a_checkpoint"] = str(root / "weights.pth")
    torch.save(model.state_dict(), b["not_a_checkpoint"])
    # datasets
    storage.open_group(str(root / "noraw.zarr"), mode="w")
    b["noraw"] = str(root / "noraw.zarr")
    for name, arr in {
        "raw2d": np.zeros((32, 32), np.uint8),
        "raw4d": np.zeros((2, 16, 32, 32), np.uint8),
        "rawempty": np.zeros((0, 32, 32), np.uint8),
        "rawsmall": np.zeros((4, 8, 8), np.uint8),
        "rawcomplex": np.zeros(SHAPE, np.complex64),
    }.items():
        b[name] = str(root / f"{name}.zarr")
        _array(storage.join_url(b[name], storage.RAW_PATH), arr)
    b["mismatch"] = write_synthetic_dataset(str(root / "mismatch.zarr"), shape=SHAPE, seed=4, chunks=(8, 16, 16))
    storage.create_array(storage.join_url(b["mismatch"], storage.LABEL_PATHS["mito"]), (16, 32, 16),
                         np.uint32, (8, 16, 16), overwrite=True)
    # probabilities
    nan = rng.random(SHAPE, dtype=np.float32)
    nan[9, 20, 20] = np.nan
    b["nan"] = _array(str(root / "nan.zarr"), nan, (8, 16, 16))
    inf = rng.random(SHAPE, dtype=np.float32)
    inf[3, 4, 5] = np.inf
    b["inf"] = _array(str(root / "inf.zarr"), inf, (8, 16, 16))
    b["int16"] = _array(str(root / "int16.zarr"), np.zeros(SHAPE, np.int16), (8, 16, 16))
    b["probs2d"] = _array(str(root / "probs2d.zarr"), np.zeros((32, 32), np.float32))
    # a regular file where a directory is expected
    (root / "a_file").write_text("not a directory\n")
    b["file"] = str(root / "a_file")
    return w


# --- running the CLI ------------------------------------------------------------------------------


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_main(args: list[str], capsys) -> Result:
    """``catena-mito ARGS`` in-process, as the entry point runs it."""
    from catena_mito.cli import main

    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def write_config(path: Path, data: Any) -> str:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


FAST_S3 = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}


# --- the cases ----------------------------------------------------------------------------------
#
# A case builds (command, config or raw YAML, extra args) from the world and a fresh output
# folder ``out``; ``expect`` are substrings of the one error line (all must appear).


@dataclass
class Case:
    id: str
    build: Callable[[World, Path], tuple[str, Any, list[str]]]
    code: int
    expect: tuple[str, ...]
    needs_s3: bool = False
    env: dict[str, str] = field(default_factory=dict)
    #: a data error found while reading blocks (NaN in one block of a terabyte volume can't
    #: be found before the work starts): the other blocks' markers are allowed, but no
    #: output array and no ``complete.json``
    partial_ok: bool = False


def predict_cfg(w: World, out: Path, **kw) -> dict:
    cfg = {"model_path": w.ckpt, "test_zarr_dirs": [w.dataset], "device": "cpu",
           "output_dir": str(out), "block_shape": [8, 16, 16], "output_chunks": [8, 16, 16]}
    cfg.update(kw)
    return cfg


def label_cfg(w: World, out: Path, **kw) -> dict:
    cfg = {"input_prediction_path": w.probs, "output_instance_dir": str(out / "inst.zarr"),
           "chunk_size": [8, 16, 16], "thres_small_instances": 2}
    cfg.update(kw)
    return cfg


def train_cfg(w: World, out: Path, **kw) -> dict:
    cfg = {"train_zarr_dirs": [w.dataset], "runs_dir": str(out / "runs"), "exp_name": "bad",
           "model_type": "rs_unet", "model_params": RS_TINY, "patch_size": PATCH, "stride": PATCH,
           "epochs": 1, "batch_size": 1, "steps_per_epoch": 1, "device": "cpu"}
    cfg.update(kw)
    return cfg


def P(**kw):  # noqa: N802 - a short name for the table below
    return lambda w, out: ("predict", predict_cfg(w, out, **{k: v(w) if callable(v) else v for k, v in kw.items()}), [])


def L(**kw):  # noqa: N802
    return lambda w, out: ("label", label_cfg(w, out, **{k: v(w) if callable(v) else v for k, v in kw.items()}), [])


def T(**kw):  # noqa: N802
    return lambda w, out: ("train", train_cfg(w, out, **{k: v(w) if callable(v) else v for k, v in kw.items()}), [])


def with_args(build, *args):
    def inner(w, out):
        cmd, cfg, extra = build(w, out)
        return cmd, cfg, [*extra, *args]
    return inner


def raw_text(cmd: str, text: str):
    return lambda w, out: (cmd, text, [])


def bad(name: str):
    return lambda w: w.bad[name]


def s3_url(path: str):
    return lambda w: path


CASES = [
    # --- config -------------------------------------------------------------------------------
    Case("config-unknown-key", P(modle_type="rs_unet"), 2, ("unknown key 'modle_type'", "did you mean 'model_type'")),
    Case("config-wrong-type", L(thres_foreground="high"), 2, ("thres_foreground", "'high'")),
    Case("config-wrong-type-list", P(test_zarr_dirs="not-a-list"), 2, ("test_zarr_dirs",)),
    Case("config-out-of-range-threshold", L(thres_foreground=1.5), 2, ("thres_foreground", "1.5")),
    Case("config-out-of-range-epochs", T(epochs=0), 2, ("epochs", "greater than 0")),
    Case("config-negative-chunk", L(chunk_size=[8, -16, 16]), 2, ("chunk_size", "-16")),
    Case("config-triple-length", P(patch_size=[8, 16]), 2, ("patch_size", "3 values")),
    Case("config-stride-gt-patch", P(patch_size=PATCH, stride=[8, 32, 16]), 2, ("stride", "patch_size")),
    Case("config-block-not-multiple-of-chunks", P(block_shape=[8, 24, 16]), 2, ("block_shape", "output chunk shape")),
    Case("config-label-type-typo", P(label_type="mitochondria"), 2, ("label_type", "'mito'", "'neuron'")),
    Case("config-model-type-typo", T(model_type="unet3d"), 2, ("model_type", "unet3d")),
    Case("config-empty-file", raw_text("predict", ""), 2, ("is empty",)),
    Case("config-yaml-syntax", raw_text("label", "input_prediction_path: [a, b\nthres: 1\n"), 2, ("YAML syntax error at line",)),
    Case("config-not-a-mapping", raw_text("train", "- a\n- b\n"), 2, ("expected a mapping",)),
    Case("config-missing-field", raw_text("predict", "test_zarr_dirs: [x.zarr]\n"), 2, ("model_path", "required")),
    Case("config-missing-file", lambda w, out: ("predict", None, []), 2, ("does not exist",)),
    Case("config-bad-set", with_args(P(), "--set", "block_shape"), 2, ("--set 'block_shape'", "key=value")),
    # --- data ---------------------------------------------------------------------------------
    Case("data-missing-raw", P(test_zarr_dirs=lambda w: [w.bad["noraw"]]), 1, ("noraw.zarr/volumes/raw", "does not exist")),
    Case("data-missing-dataset", P(test_zarr_dirs=lambda w: [str(w.root / "nowhere.zarr")]), 1, ("nowhere.zarr",)),
    Case("data-raw-2d", P(test_zarr_dirs=lambda w: [w.bad["raw2d"]]), 1, ("raw2d.zarr/volumes/raw", "2 dimensions", "expected 3")),
    Case("data-raw-4d", P(test_zarr_dirs=lambda w: [w.bad["raw4d"]]), 1, ("raw4d.zarr/volumes/raw", "4 dimensions")),
    Case("data-raw-empty", P(test_zarr_dirs=lambda w: [w.bad["rawempty"]]), 1, ("rawempty.zarr/volumes/raw", "empty")),
    Case("data-raw-unsupported-dtype", P(test_zarr_dirs=lambda w: [w.bad["rawcomplex"]]), 1, ("rawcomplex.zarr", "complex64")),
    Case("data-smaller-than-patch", P(test_zarr_dirs=lambda w: [w.bad["rawsmall"]]), 1, ("rawsmall.zarr", "patch")),
    Case("data-train-smaller-than-patch", T(patch_size=[32, 32, 32], stride=[32, 32, 32]), 1, ("patch",)),
    Case("data-labels-shape-mismatch", T(train_zarr_dirs=lambda w: [w.bad["mismatch"]]), 1, ("mismatch.zarr", "mito_ids", "[16, 32, 16]")),
    Case("data-probs-nan", L(input_prediction_path=bad("nan")), 1, ("nan.zarr", "[8:16, 16:32, 16:32]", "NaN"), partial_ok=True),
    Case("data-probs-inf", L(input_prediction_path=bad("inf")), 1, ("inf.zarr", "[0:8, 0:16, 0:16]", "infinite"), partial_ok=True),
    Case("data-probs-int16", L(input_prediction_path=bad("int16")), 1, ("int16.zarr", "int16")),
    Case("data-probs-2d", L(input_prediction_path=bad("probs2d")), 1, ("probs2d.zarr", "2 dimensions")),
    # --- checkpoints --------------------------------------------------------------------------
    Case("ckpt-missing", P(model_path=lambda w: str(w.root / "missing.pth")), 1, ("missing.pth", "not found")),
    Case("ckpt-truncated", P(model_path=bad("truncated")), 1, ("truncated.pth", "truncated or corrupt")),
    Case("ckpt-corrupt", P(model_path=bad("corrupt")), 1, ("corrupt.pth", "truncated or corrupt")),
    Case("ckpt-wrong-model-type", P(model_type="monai_unet"), 1, ("model_type 'monai_unet'", "'rs_unet'")),
    Case("ckpt-code-torch-save", P(model_path=bad("evil")), 1, ("evil.pth", "weights_only", "not loaded")),
    Case("ckpt-code-raw-pickle", P(model_path=bad("evil_pickle")), 1, ("evil.pkl", "weights_only", "not loaded")),
    Case("ckpt-bare-state-dict", P(model_path=bad("not_a_checkpoint")), 1, ("weights.pth", "bare model state_dict")),
    Case("ckpt-resume-missing", T(resume_checkpoint=lambda w: str(w.root / "gone" / "last.pth")), 1, ("gone/last.pth", "not found")),
    Case("ckpt-model-loc-wrong-type", T(model_type="monai_unet", model_params={}, patch_size=16, stride=16, model_loc=lambda w: w.ckpt), 1, ("model_loc", "'rs_unet'", "'monai_unet'")),
    # --- storage ------------------------------------------------------------------------------
    Case("storage-unknown-scheme", P(test_zarr_dirs=["foo://bucket/data.zarr"]), 1, ("foo://bucket/data.zarr", "unsupported URL scheme 'foo'")),
    Case("storage-unknown-scheme-output", L(output_instance_dir="gs3://b/out.zarr"), 1, ("gs3://b/out.zarr", "unsupported URL scheme")),
    Case("storage-output-under-a-file", P(output_dir=lambda w: w.bad["file"] + "/out"), 1, ("a_file/out",)),
    Case("storage-label-output-under-a-file", L(output_instance_dir=lambda w: w.bad["file"] + "/inst.zarr"), 1, ("a_file/inst.zarr",)),
    Case("storage-output-unwritable-proc", L(output_instance_dir="/proc/catena-test/inst.zarr"), 1, ("/proc/catena-test",)),
    Case("storage-missing-bucket", L(input_prediction_path="s3://no-such-bucket-catena/p.zarr",
                                     storage_options=lambda w: {**w.s3.storage_options, **FAST_S3}),
         1, ("s3://no-such-bucket-catena/p.zarr",), needs_s3=True),
    Case("storage-wrong-credentials", L(input_prediction_path=lambda w: w.s3_probs,
                                        storage_options=lambda w: {**w.s3.storage_options, "secret": "wrong-secret", **FAST_S3}),
         1, ("s3://",), needs_s3=True),
    Case("storage-unreachable-endpoint", L(input_prediction_path="s3://bucket/p.zarr",
                                           storage_options=lambda w: {"key": "k", "secret": "s", **FAST_S3,
                                                                      "endpoint_url": f"http://127.0.0.1:{closed_port()}"}),
         1, ("s3://bucket/p.zarr", "Could not connect")),
    # --- sharding -----------------------------------------------------------------------------
    Case("shard-index-ge-count", with_args(P(), "--shard-index", "2", "--num-shards", "2"), 2, ("shard_index", "[0, 2)", "2")),
    Case("shard-index-negative", with_args(L(), "--phase", "blocks", "--shard-index", "-1", "--num-shards", "2"), 2, ("shard_index", "-1")),
    Case("shard-count-zero", with_args(P(), "--num-shards", "0"), 2, ("num_shards", ">= 1", "0")),
    Case("shard-env-not-int", P(), 2, ("JOB_COMPLETION_INDEX", "'one'"), env={"JOB_COMPLETION_INDEX": "one"}),
    Case("shard-env-out-of-range", with_args(L(), "--phase", "blocks"), 2, ("shard_index", "JOB_COMPLETION_INDEX"),
         env={"JOB_COMPLETION_INDEX": "5", "CATENA_NUM_SHARDS": "3"}),
    Case("shard-label-all-with-shards", with_args(L(), "--num-shards", "2"), 2, ("--phase all", "--num-shards")),
]


_PROGRESS = re.compile(r"\|\s*\d+/\d+ \[|^\s*\S.*:\s+\d+%\|")
_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING) ")


def error_lines(err: str) -> list[str]:
    """stderr without progress-bar updates and log lines: what is left must be the error."""
    return [part for part in re.split(r"[\r\n]", err)
            if part.strip() and not _PROGRESS.search(part) and not _LOG.match(part)]


def _complete_looking(out: Path) -> list[str]:
    """Files under ``out`` that would make an output look (partly) complete."""
    found = []
    for p in out.rglob("*"):
        rel = str(p.relative_to(out))
        finished = p.name in ("complete.json", "last.pth", "best.pth")
        marker = p.suffix == ".json" and p.parent.name == "done"
        output_array = p.name in ("zarr.json", ".zarray") and ("predictions" in rel or "inst.zarr" in rel)
        if finished or marker or output_array:
            found.append(rel)
    return found


@pytest.fixture(scope="module")
def s3_world(world, s3_server):
    bucket = s3_server.make_bucket("badinput")
    world.s3 = s3_server
    world.s3_probs = f"s3://{bucket}/probs.zarr"
    storage.create_array(world.s3_probs, SHAPE, np.float32, (8, 16, 16), storage_options=s3_server.storage_options)
    return world


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world, tmp_path, capsys, monkeypatch, request):
    if case.needs_s3:
        request.getfixturevalue("s3_world")
    for name in ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID", "CATENA_NUM_SHARDS", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    out.mkdir()
    cmd, cfg, extra = case.build(world, out)
    config_path = str(tmp_path / "missing.yaml") if cfg is None else write_config(tmp_path / "job.yaml", cfg)
    result = run_main([cmd, "--config", config_path, *extra], capsys)

    lines = error_lines(result.err)
    assert result.code == case.code, (result.code, result.err)
    assert "Traceback" not in result.err, result.err
    assert len(lines) == 1, result.err
    assert lines[0].startswith("catena-mito: error: "), lines[0]
    for text in case.expect:
        assert text in lines[0], (text, lines[0])
    left = _complete_looking(out)
    if case.partial_ok:
        left = [p for p in left if not p.endswith(".json") or "/done/" not in p]
    assert not left, left
    assert not os.path.exists(world.proof), "a malicious checkpoint ran code"


def test_existing_incompatible_output_is_refused_and_left_alone(world, tmp_path, capsys):
    out = tmp_path / "out"
    target = storage.join_url(str(out), "good.zarr", storage.prediction_path("mito"))
    arr = storage.create_array(target, (3, 3, 3), np.float32, (3, 3, 3))
    arr[...] = 7
    before = sorted(str(p) for p in out.rglob("*"))
    config = write_config(tmp_path / "job.yaml", predict_cfg(world, out))
    result = run_main(["predict", "--config", config], capsys)
    lines = error_lines(result.err)
    assert result.code == 1 and len(lines) == 1, result.err
    assert "exists and is incompatible" in lines[0] and "--overwrite" in lines[0]
    assert "shape [3, 3, 3]" in lines[0]
    after = storage.open_array(target)
    assert after.shape == (3, 3, 3) and (after[...] == 7).all()
    assert sorted(str(p) for p in out.rglob("*")) == before  # nothing added, nothing removed


def test_existing_incompatible_label_output_is_refused(world, tmp_path, capsys):
    out = tmp_path / "out"
    target = storage.join_url(str(out / "inst.zarr"), "mito_instances")
    storage.create_array(target, (3, 3, 3), np.uint8, (3, 3, 3))[...] = 5
    config = write_config(tmp_path / "job.yaml", label_cfg(world, out))
    result = run_main(["label", "--config", config], capsys)
    lines = error_lines(result.err)
    assert result.code == 1 and len(lines) == 1, result.err
    assert "exists and is incompatible" in lines[0]
    assert (storage.open_array(target)[...] == 5).all()
    assert not list(out.rglob("complete.json")) and not list(out.rglob("done"))  # refused before any block


def test_catalogue_size():
    assert len(CASES) + 2 >= 30


# --- through a real process ---------------------------------------------------------------------


def _subprocess(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "catena_mito", *args], capture_output=True, text=True,
                          env=env, timeout=120, **kw)


def test_subprocess_one_line_and_debug_traceback(world, tmp_path):
    config = write_config(tmp_path / "job.yaml", label_cfg(world, tmp_path / "out", input_prediction_path=world.bad["nan"]))
    proc = _subprocess(["label", "--config", config])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1
    errors = [line for line in lines if line.startswith("catena-mito:")]
    assert len(errors) == 1 and "NaN" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    # with --debug the traceback is shown instead
    proc = _subprocess(["--debug", "label", "--config", config])
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "DataError" in proc.stderr


def test_subprocess_malicious_checkpoint_is_refused(world, tmp_path):
    config = write_config(tmp_path / "job.yaml", predict_cfg(world, tmp_path / "out", model_path=world.bad["evil"]))
    proc = _subprocess(["predict", "--config", config])
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert "weights_only" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(world.proof)
    assert not (tmp_path / "out").exists()


def test_subprocess_unreachable_endpoint_is_one_line(tmp_path):
    """No "Exception ignored" tracebacks from abandoned s3fs coroutines after the error."""
    config = write_config(tmp_path / "job.yaml", {
        "input_prediction_path": "s3://bucket/p.zarr", "output_instance_dir": str(tmp_path / "out.zarr"),
        "storage_options": {"key": "k", "secret": "s", "endpoint_url": f"http://127.0.0.1:{closed_port()}", **FAST_S3}})
    proc = _subprocess(["label", "--config", config])
    assert proc.returncode == 1
    assert error_lines(proc.stderr) == [proc.stderr.strip()], proc.stderr
    assert "s3://bucket/p.zarr" in proc.stderr and "Traceback" not in proc.stderr
