"""Faults (issue 8): killed workers, a storage server that dies mid-run, concurrent duplicates.

* ``predict`` and ``label`` processes are SIGKILLed at seeded random moments (within the
  duration of a clean run, measured once), then rerun: no block is ever marked done (in
  ``<record>/runs/<run id>/<phase>/done/``) without its data, a ``complete.json`` only
  stands over a whole output, and the rerun's output is byte-identical to the clean run's
  (bench/faults.py holds the machinery and runs many more trials).
* A ``label --phase all`` SIGKILLed while it holds its lease is rerun at once, as a
  retried pod or a user would: the dead process's lease must not refuse it.
* ``train`` killed at a random moment resumes from ``last.pth`` with
  ``resume_checkpoint: auto`` and ends with exactly the weights of an uninterrupted run.
* The S3 server is SIGKILLed during a ``predict`` and restarted on the same data: the job
  either rides it out (bounded retries with backoff) or exits with one clear line; the rerun
  completes and matches.
* Two processes given the same shard at the same time are harmless (same bytes).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from catena_mito import storage

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("catena_bench_faults", ROOT / "bench" / "faults.py")
faults = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = faults  # dataclasses look their module up
_spec.loader.exec_module(faults)

PREDICT_TRIALS = 4
LABEL_TRIALS = 6


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    return faults.make_inputs(tmp_path_factory.mktemp("fault-inputs"))


@pytest.fixture(scope="module")
def predict_setup(inputs, tmp_path_factory):
    return faults.Setup("predict", tmp_path_factory.mktemp("fault-predict"), inputs)


@pytest.fixture(scope="module")
def label_setup(inputs, tmp_path_factory):
    return faults.Setup("label", tmp_path_factory.mktemp("fault-label"), inputs)


def _check(trials) -> None:
    problems = [p for t in trials for p in t.problems]
    assert not problems, problems
    assert all(t.identical for t in trials)
    # most kills must hit a running process that had marked blocks done (the kill moments
    # are timed from each trial's own first marker, so a loaded machine does not shift them)
    hits = [not t.exited_before_kill and t.markers_at_kill > 0 for t in trials]
    assert sum(hits) >= len(trials) // 2, trials


def test_predict_killed_at_random_moments(predict_setup):
    trials = [predict_setup.trial(d, rerun=faults.run_in_process) for d in predict_setup.delays(PREDICT_TRIALS, seed=8)]
    _check(trials)


def test_label_killed_at_random_moments(label_setup):
    trials = [label_setup.trial(d, rerun=faults.run_in_process) for d in label_setup.delays(LABEL_TRIALS, seed=8)]
    _check(trials)


def test_label_rerun_at_once_after_kill_is_not_refused_by_the_dead_lease(inputs, label_setup, tmp_path):
    """SIGKILL ``label --phase all`` while it holds ``runs/<id>/all/lease.json`` (after some
    blocks are marked), rerun the same command at once: it must resume, not report the
    killed process as "already running" until the lease goes stale."""
    job = faults.make_job("label", inputs, tmp_path / "out")
    proc = faults.start(job)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            run = faults.run_dir(job)
            if run is not None and (run / "all" / "lease.json").exists() and faults.count_markers(job) > 2:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "label finished before it could be killed"
    finally:
        faults.kill_group(proc)
    assert (faults.run_dir(job) / "all" / "lease.json").exists()
    faults.run_to_end(job)
    assert faults.output_files(job.output_url) == label_setup.reference_files


# --- concurrency --------------------------------------------------------------------------------


def _together(jobs, logs: Path, timeout=300) -> None:
    """Start ``jobs`` at once and wait for all; a failure shows what its process printed."""
    paths = [logs / f"{job.kind}-{k}.log" for k, job in enumerate(jobs)]
    procs = [faults.start(job, log_path=path) for job, path in zip(jobs, paths)]
    try:
        for p, path in zip(procs, paths):
            rc = p.wait(timeout=timeout)
            assert rc == 0, f"{' '.join(p.args[2:])} exited {rc}:\n{path.read_text()[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                faults.kill_group(p)


def test_two_processes_with_the_same_predict_shard_are_harmless(predict_setup, inputs, tmp_path):
    job = faults.make_job("predict", inputs, tmp_path / "out")
    _together([job, job], tmp_path)  # shard 0 of 1, twice at once
    assert faults.output_files(job.output_url) == predict_setup.reference_files


def test_two_processes_with_the_same_label_shard_are_harmless(label_setup, inputs, tmp_path):
    job = faults.make_job("label", inputs, tmp_path / "out")

    def phase(name, *extra):
        return faults.Job(job.kind, job.config_path, job.output_url, ["--phase", name, *extra])

    for index in (0, 1):
        shard = phase("blocks", "--shard-index", str(index), "--num-shards", "2")
        _together([shard, shard], tmp_path)
    faults.run_to_end(phase("merge"))
    for index in (0, 1):
        shard = phase("relabel", "--shard-index", str(index), "--num-shards", "2")
        _together([shard, shard], tmp_path)
    faults.run_to_end(phase("clean"))
    assert faults.output_files(job.output_url) == label_setup.reference_files


def test_the_shard_that_completes_a_run_sweeps_what_killed_writers_left(predict_setup, inputs, tmp_path):
    """A worker SIGKILLed mid-chunk leaves a temporary file beside the chunk (local file
    systems): the shard that completes the run removes it (its writer is dead) and keeps
    a live writer's; the output is then file for file the clean run's."""
    import os

    job = faults.make_job("predict", inputs, tmp_path / "out")
    faults.run_to_end(faults.Job(job.kind, job.config_path, job.output_url, ["--shard-index", "0", "--num-shards", "2"]))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    chunk_folder = Path(job.output_url) / "0" / "c" / "0" / "0"  # written by shard 0
    assert chunk_folder.is_dir()
    dead = chunk_folder / f".1.tmp-{storage._HOST}-{gone.pid}-0123abcd"
    live = chunk_folder / f".2.tmp-{storage._HOST}-{os.getpid()}-0123abcd"
    dead.write_bytes(b"half a chunk")
    live.write_bytes(b"being written")
    faults.run_to_end(faults.Job(job.kind, job.config_path, job.output_url, ["--shard-index", "1", "--num-shards", "2"]))
    assert (faults.run_dir(job) / "complete.json").exists()
    assert not dead.exists() and live.exists()
    live.unlink()
    assert faults.output_files(job.output_url) == predict_setup.reference_files


# --- the storage server dies ---------------------------------------------------------------------


@pytest.mark.s3
def test_s3_server_killed_and_restarted_mid_predict(predict_setup, inputs, tmp_path):
    """Own server (the session's must not die): SIGKILL it while predict writes, restart it on
    the same data and ports. The job survives (retries) or fails with one line; the rerun
    completes and matches the local reference exactly."""
    from conftest import start_weed, stop_weed

    server, weed = start_weed(tmp_path / "weed")
    try:
        bucket = server.make_bucket("faults")
        opts = server.storage_options
        dataset = f"s3://{bucket}/data.zarr"
        raw = storage.open_volume(storage.join_url(inputs["dataset"], storage.RAW_PATH))
        storage.create_array(storage.join_url(dataset, storage.RAW_PATH), raw.shape, raw.dtype, raw.chunks,
                             attrs=dict(raw.attrs), storage_options=opts)[...] = raw[...]
        out = f"s3://{bucket}/out"
        cfg = faults.predict_config(inputs, tmp_path, test_zarr_dirs=[dataset], output_dir=out,
                                    storage_options=opts)
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
        output_url = storage.join_url(out, "data.zarr", storage.prediction_path("mito"))
        job = faults.Job("predict", str(tmp_path / "job.yaml"), output_url)
        markers = faults.storage_markers(output_url, opts)

        log = tmp_path / "predict.log"
        proc = faults.start(job, log)
        try:
            deadline = time.monotonic() + 120
            while not markers() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None, "predict finished before the server could be killed"
            stop_weed(weed)
            time.sleep(1.0)
            server, weed = start_weed(tmp_path / "weed", ports=server.ports)
            rc = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                faults.kill_group(proc)
        err = log.read_text()
        if rc != 0:  # gave up: one clear line, no traceback
            assert "Traceback" not in err, err[-3000:]
            errors = [line for line in err.splitlines() if line.startswith("catena-mito:")]
            assert len(errors) == 1 and "s3://" in errors[0], err[-3000:]
        faults.run_to_end(job)
        result = storage.open_array(output_url, opts)[...]
        assert np.array_equal(result, predict_setup.reference)
        print(f"predict {'rode out' if rc == 0 else 'exited cleanly after'} the server restart")
    finally:
        stop_weed(weed)


# --- train ---------------------------------------------------------------------------------------


def _train_config(inputs, runs: Path, **kw) -> dict:
    return {"train_zarr_dirs": [inputs["dataset"]], "test_zarr_dirs": [inputs["dataset"]],
            "runs_dir": str(runs), "exp_name": "run", "model_type": "rs_unet", "model_params": faults.RS_TINY,
            "patch_size": [8, 16, 16], "stride": [8, 16, 16], "subsample_number": 8, "batch_size": 2,
            "steps_per_epoch": 2, "epochs": 6, "eval_interval": 3, "ckpt_interval": 100, "device": "cpu",
            "resume_checkpoint": "auto", "seed": 3, **kw}


def _train(config_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catena_mito", "train", "--config", str(config_path)],
                          capture_output=True, text=True, env=faults.child_env(), timeout=timeout)


def test_train_killed_resumes_from_last_checkpoint_with_auto(inputs, tmp_path):
    import random

    import torch

    from catena_mito.checkpoint import load_checkpoint

    clean_cfg = tmp_path / "clean.yaml"
    clean_cfg.write_text(yaml.safe_dump(_train_config(inputs, tmp_path / "clean")))
    t0 = time.monotonic()
    proc = _train(clean_cfg)
    total = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = load_checkpoint(str(tmp_path / "clean" / "run" / "last.pth"))

    # Kill at a random moment after the first checkpoint exists (before it, `auto` simply
    # starts afresh, which the rerun below would not tell apart from resuming).
    rng = random.Random(5)
    runs = tmp_path / "killed"
    cfg = tmp_path / "killed.yaml"
    last = runs / "run" / "last.pth"
    # A kill that lands after the last epoch's checkpoint (a loaded machine stretches the
    # random delay) tests no resume: try again from scratch with a shorter delay.
    for delay in (rng.uniform(0, 0.15 * total), 0.02 * total, 0.0):
        shutil.rmtree(runs, ignore_errors=True)
        cfg.write_text(yaml.safe_dump(_train_config(inputs, runs)))
        p = subprocess.Popen([sys.executable, "-m", "catena_mito", "train", "--config", str(cfg)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=faults.child_env(),
                             start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not last.exists() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(delay)
            running = p.poll() is None
        finally:
            faults.kill_group(p)
        resumed_from = load_checkpoint(str(last))["epoch"]
        if running and resumed_from < 6:
            break
    assert 1 <= resumed_from < 6, "no kill landed mid-training in 3 attempts"
    proc = _train(cfg)  # the same command, as a retried pod would run it
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming after epoch {resumed_from}" in proc.stderr
    final = load_checkpoint(str(last))
    assert final["epoch"] == reference["epoch"] == 6
    for name, tensor in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][name], tensor), name
    epochs = [json.loads(line)["epoch"] for line in (runs / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5, 6]  # no epoch lost or logged twice
