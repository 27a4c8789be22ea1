"""Fault injection: SIGKILL ``predict``/``label`` processes at random moments, rerun, compare.

A trial starts ``python -m catena_mito <predict|label> ...`` on an output of its own, kills
the whole process group with SIGKILL at a seeded random moment, checks that every block
marked done for the run that owns the output holds its final data (DESIGN invariant 3;
markers under ``<record>/runs/<run id>/<phase>/done/``, label block data under
``.../blocks/data/``, and a ``complete.json`` only over a whole output, see
:mod:`catena_mito.blockwise.runs`), reruns the same command to the end and checks that the
output is byte-identical (every file of the output array, chunk by chunk, outside its
``.catena`` records) to a clean run's.

When to kill is a fraction ``f`` drawn uniformly from ``[-0.25, 1]`` against a clean run of
the same job, measured once per setup (``first``: seconds to its first done marker,
``total``: its duration). ``f < 0`` kills at ``(1 + f) * first`` seconds, during start-up;
``f >= 0`` waits for the trial's own first marker, then ``f * (total - first)`` more,
scaled by how much slower (or faster) the trial reached its first marker than the clean run did. So
most kills land while blocks are being written even on a loaded machine (a fixed delay
missed them when the tests ran beside others).

    .venv/bin/python bench/faults.py [--trials 20] [--kind predict,label] [--seed 0] [--keep DIR]

The test suite (tests/test_faults.py) imports this file and runs a few trials of each kind.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from catena_mito import storage  # noqa: E402

RS_TINY = {"channels": [2, 4]}
PATCH = [8, 16, 16]
#: predict: 4 x 4 x 4 = 64 blocks of one chunk each
PREDICT_SHAPE = (32, 64, 64)
#: label: 4 x 4 x 8 = 128 blocks of (16, 16, 16)
LABEL_SHAPE = (64, 64, 128)
LABEL_CHUNK = [16, 16, 16]


def child_env() -> dict[str, str]:
    """Environment of the runs: one BLAS/OpenMP thread (many threads on a loaded 2-core
    runner make tiny convolutions 20x slower) and no scheduler shard variables."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID", "CATENA_NUM_SHARDS", "SLURM_ARRAY_TASK_COUNT"):
        env.pop(name, None)
    return env


# --- inputs -------------------------------------------------------------------------------------


def make_inputs(root: Path) -> dict[str, str]:
    """A synthetic dataset, a tiny deterministic rs_unet checkpoint and a probability volume."""
    import torch

    from catena_mito.checkpoint import make_payload, save_checkpoint
    from catena_mito.models import build_model
    from catena_mito.synthetic import make_volume, write_synthetic_dataset

    root.mkdir(parents=True, exist_ok=True)
    dataset = write_synthetic_dataset(str(root / "data.zarr"), shape=PREDICT_SHAPE, seed=7, chunks=(8, 16, 16))
    torch.manual_seed(0)
    model = build_model("rs_unet", **RS_TINY)
    ckpt = str(root / "model.pth")
    save_checkpoint(ckpt, make_payload("rs_unet", RS_TINY, model, config={"patch_size": PATCH, "stride": PATCH}))
    # probabilities with real objects: the synthetic mitochondria, blurred by noise
    ids = make_volume(LABEL_SHAPE, seed=11)["mito_ids"]
    rng = np.random.default_rng(11)
    probs = np.clip((ids > 0) * 0.8 + rng.normal(0.1, 0.15, ids.shape), 0, 1).astype(np.float32)
    probs_url = str(root / "probs.zarr")
    arr = storage.create_array(probs_url, probs.shape, np.float32, LABEL_CHUNK,
                               attrs=storage.spatial_attrs((8, 8, 8)))
    arr[...] = probs
    return {"dataset": dataset, "ckpt": ckpt, "probs": probs_url}


def predict_config(inputs: dict[str, str], out: Path, **extra) -> dict:
    return {"model_path": inputs["ckpt"], "test_zarr_dirs": [inputs["dataset"]], "device": "cpu",
            "output_dir": str(out), "block_shape": [8, 16, 16], "output_chunks": [8, 16, 16],
            "output_dtype": "float32", "batch_size": 2, **extra}


def label_config(inputs: dict[str, str], out: Path, **extra) -> dict:
    return {"input_prediction_path": inputs["probs"], "output_instance_dir": str(out / "inst.zarr"),
            "chunk_size": LABEL_CHUNK, "thres_foreground": 0.5, "thres_small_instances": 20, **extra}


@dataclass
class Job:
    """One command and where its output and markers are."""

    kind: str  # predict | label
    config_path: str
    output_url: str  # the output array
    args: list[str] = field(default_factory=list)

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "catena_mito", self.kind, "--config", self.config_path, *self.args]


def make_job(kind: str, inputs: dict[str, str], out: Path, **extra) -> Job:
    out.mkdir(parents=True, exist_ok=True)
    if kind == "predict":
        cfg = predict_config(inputs, out, **extra)
        url = storage.join_url(str(out), "data.zarr", storage.prediction_path("mito"))
    elif kind == "label":
        cfg = label_config(inputs, out, **extra)
        url = storage.join_url(str(out / "inst.zarr"), "mito_instances")
    else:
        raise ValueError(kind)
    path = out / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Job(kind, str(path), url)


# --- running ------------------------------------------------------------------------------------


def start(job: Job, log_path: Path | None = None) -> subprocess.Popen:
    if log_path is None:
        return subprocess.Popen(job.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=child_env(), start_new_session=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(job.command, stdout=log, stderr=log, env=child_env(), start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def run_to_end(job: Job, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(job.command, capture_output=True, text=True, env=child_env(), timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{job.kind} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc


def record_dir(job: Job) -> Path:
    """The local record folder of a job's output (see :mod:`catena_mito.blockwise.runs`)."""
    if job.kind == "predict":
        return Path(job.output_url) / ".catena" / "predict"
    return Path(job.output_url).parent / ".catena" / "label" / Path(job.output_url).name


def run_dir(job: Job) -> Path | None:
    """``<record>/runs/<run id>`` of the run that owns the output now (None before any claim)."""
    claim = record_dir(job) / "run.json"
    try:
        run_id = json.loads(claim.read_text())["run_id"]
    except (FileNotFoundError, ValueError, KeyError):
        return None
    return record_dir(job) / "runs" / str(run_id)


def done_dirs(job: Job) -> list[Path]:
    """Local folders holding this job's done markers (every phase of every run recorded)."""
    return [p for p in (record_dir(job) / "runs").glob("*/*/done") if p.is_dir()]


def storage_markers(output_url: str, storage_options: dict | None = None):
    """A callable returning the predict blocks marked done at ``output_url`` (any URL) for
    the run that owns it (none before the first claim)."""
    from catena_mito.errors import PhaseError
    from catena_mito.predict import run_store

    store = run_store(output_url, storage_options)

    def done() -> set[int]:
        try:
            return store.current_markers("predict").done_indices()
        except PhaseError:  # no run recorded yet
            return set()

    return done


def count_markers(job: Job) -> int:
    return sum(len(list(d.glob("*.json"))) for d in done_dirs(job))


def timed_clean_run(job: Job, poll: float = 0.02) -> tuple[float, float]:
    """Run to the end; return ``(seconds to the first done marker, total seconds)``."""
    t0 = time.monotonic()
    proc = start(job)
    first = None
    while proc.poll() is None:
        if first is None and count_markers(job):
            first = time.monotonic() - t0
        time.sleep(poll)
    total = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"clean {job.kind} run failed with {proc.returncode}")
    return (first if first is not None else total / 2), total


def output_files(url: str) -> dict[str, bytes]:
    """Every file of an output array except the bookkeeping under ``.catena``."""
    root = Path(url)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".catena" not in p.relative_to(root).parts}


# --- the invariant after a kill ------------------------------------------------------------------


def check_markers(job: Job, reference: np.ndarray) -> tuple[int, list[str]]:
    """Every block marked done (for the run that owns the output) holds its data, and a
    run recorded complete holds all of it; returns ``(markers seen, problems)``."""
    problems: list[str] = []
    seen = 0
    run = run_dir(job)
    if run is None:
        return seen, problems
    complete = run / "complete.json"
    if complete.exists():
        seen += 1
        if not np.array_equal(storage.open_array(job.output_url)[...], reference):
            problems.append(f"{job.kind} complete.json written but the output differs")
    if job.kind == "predict":
        # window_sharing exchange: a windows block marked done has every piece it hands on
        from catena_mito.exchange import decode_piece

        for m in sorted((run / "windows" / "done").glob("*.json")):
            seen += 1
            info = json.loads(m.read_text())
            pieces = sorted((run / "windows" / "pieces" / str(info["block"])).glob("*.blosc"))
            if complete.exists():
                continue  # the pieces are removed once the run is complete
            if len(pieces) != info["pieces"]:
                problems.append(f"predict windows block {info['block']} marked done with "
                                f"{len(pieces)} of {info['pieces']} pieces")
            for piece in pieces:
                try:
                    decode_piece(piece.read_bytes())
                except Exception as e:  # noqa: BLE001
                    problems.append(f"predict windows piece {piece} marked done but unreadable: {e}")
        markers = sorted((run / "predict" / "done").glob("*.json"))
        if markers:
            out = storage.open_array(job.output_url)
        for m in markers:
            info = json.loads(m.read_text())
            sl = tuple(slice(o, o + s) for o, s in zip(info["write_offset"], info["write_shape"]))
            seen += 1
            if not np.array_equal(out[sl], reference[sl]):
                problems.append(f"predict block {info['block']} marked done without its data")
        return seen, problems
    for marker in (run / "blocks" / "done").glob("*.json"):
        seen += 1
        i = marker.stem
        data = run / "blocks" / "data" / f"{i}.npz"
        try:
            with np.load(io.BytesIO(data.read_bytes())) as npz:
                npz.files  # noqa: B018 - the archive must be readable
        except Exception as e:  # noqa: BLE001
            problems.append(f"label block {i} marked done but its data is unreadable: {e}")
    if (run / "merge" / "done" / "0.json").exists():
        seen += 1
        n_blocks = int(np.prod([-(-s // c) for s, c in zip(LABEL_SHAPE, LABEL_CHUNK)]))
        missing = [i for i in range(n_blocks) if not (run / "merge" / "maps" / f"{i}.npy").exists()]
        if missing:
            problems.append(f"label merge marked done without maps {missing[:5]}")
    relabel = sorted((run / "relabel" / "done").glob("*.json"))
    if relabel:
        from catena_mito.blockwise.geometry import BlockGrid

        out = storage.open_array(job.output_url)
        grid = BlockGrid(LABEL_SHAPE, LABEL_CHUNK)
        for marker in relabel:
            seen += 1
            sl = grid.block(int(marker.stem)).write_roi.to_slices()
            if not np.array_equal(out[sl], reference[sl]):
                problems.append(f"label relabel block {marker.stem} marked done without its data")
    return seen, problems


@dataclass
class Trial:
    kind: str
    delay: float
    exited_before_kill: bool
    markers_at_kill: int
    problems: list[str]
    identical: bool
    rerun_s: float


def _wait(proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)


def kill_trial(job: Job, fraction: float, first: float, total: float,
               reference_files: dict[str, bytes], reference: np.ndarray,
               rerun: Callable[[Job], Any] = run_to_end) -> Trial:
    """Start ``job``, kill it at the moment ``fraction`` names (module docstring), check."""
    t0 = time.monotonic()
    proc = start(job)
    if fraction < 0:
        _wait(proc, (1 + fraction) * first)
    else:
        while proc.poll() is None and not count_markers(job):
            time.sleep(0.005)
        # the trial's pace against the clean run's (either way: a run measured under more
        # load than this trial's would otherwise put the kill after its end)
        stretch = min(4.0, max(0.25, (time.monotonic() - t0) / max(first, 1e-3)))
        _wait(proc, fraction * (total - first) * stretch)
    delay = time.monotonic() - t0
    exited = proc.poll() is not None
    kill_group(proc)
    seen, problems = check_markers(job, reference)
    t0 = time.monotonic()
    rerun(job)
    rerun_s = time.monotonic() - t0
    identical = output_files(job.output_url) == reference_files
    if not identical:
        problems.append(f"{job.kind}: output after the rerun differs from the clean run")
    return Trial(job.kind, delay, exited, seen, problems, identical, rerun_s)


class Setup:
    """Inputs, a clean reference run and its timing for one kind of job."""

    def __init__(self, kind: str, root: Path, inputs: dict[str, str]):
        self.kind, self.root, self.inputs = kind, root, inputs
        ref_job = make_job(kind, inputs, root / f"{kind}-reference")
        self.first, self.total = timed_clean_run(ref_job)
        self.reference_files = output_files(ref_job.output_url)
        self.reference = storage.open_array(ref_job.output_url)[...]
        self.count = 0

    def delays(self, n: int, seed: int) -> list[float]:
        """``n`` kill moments, as fractions (see the module docstring)."""
        rng = random.Random(seed)
        return [rng.uniform(-0.25, 1.0) for _ in range(n)]

    def trial(self, fraction: float, rerun: Callable[[Job], Any] = run_to_end) -> Trial:
        self.count += 1
        job = make_job(self.kind, self.inputs, self.root / f"{self.kind}-trial-{self.count}")
        return kill_trial(job, fraction, self.first, self.total, self.reference_files,
                          self.reference, rerun)


def run_in_process(job: Job) -> None:
    """Rerun through ``catena_mito.cli.main`` in this process (saves the start-up imports)."""
    from catena_mito.cli import main

    try:
        main(job.command[3:])
    except SystemExit as e:
        if e.code:
            raise RuntimeError(f"{job.kind} rerun failed with exit code {e.code}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="trials per kind")
    parser.add_argument("--kind", default="predict,label")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None, help="work here and keep the files")
    args = parser.parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="catena-faults-"))
    failures = 0
    try:
        inputs = make_inputs(root / "inputs")
        for kind in args.kind.split(","):
            setup = Setup(kind, root, inputs)
            print(f"{kind}: clean run {setup.total:.2f} s, first marker at {setup.first:.2f} s, "
                  f"{len(setup.reference_files)} output files")
            for k, delay in enumerate(setup.delays(args.trials, args.seed)):
                t = setup.trial(delay)
                failures += bool(t.problems)
                status = "ok" if not t.problems else "FAIL " + "; ".join(t.problems)
                print(f"  trial {k:3d}: kill at {t.delay:5.2f} s, {t.markers_at_kill:4d} markers, "
                      f"rerun {t.rerun_s:5.2f} s, identical={t.identical}{' (had exited)' if t.exited_before_kill else ''}: {status}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("all trials passed" if not failures else f"{failures} trials FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
