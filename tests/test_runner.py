"""The block runner and run records, with steps whose results are known exactly."""

from __future__ import annotations

import logging
import threading
import uuid

import numpy as np
import pytest

from catena_mito import storage
from catena_mito.blockwise import runner as runner_module
from catena_mito.blockwise import signals
from catena_mito.blockwise.geometry import BlockGrid
from catena_mito.blockwise.runner import BlockSteps, run_phase
from catena_mito.blockwise.runs import RunSpec, RunStore
from catena_mito.errors import RunMismatchError, Stopped

GRID = BlockGrid((8, 8, 8), (2, 4, 4))  # 16 blocks


def _store() -> RunStore:
    return RunStore(f"memory://runner-{uuid.uuid4().hex}/out/.catena/test")


def _spec(setting: int = 1) -> RunSpec:
    return RunSpec("test", {"settings": {"x": setting}}, (("work", GRID.num_blocks),))


class Volume:
    """An output written block by block, with a record of who wrote what."""

    def __init__(self) -> None:
        self.data = np.zeros(GRID.volume_shape, np.int64)
        self.lock = threading.Lock()

    def steps(self, parallel: bool, fail_at: int | None = None, hook=None) -> BlockSteps:
        def compute(block, data):
            if fail_at is not None and block.index == fail_at:
                raise ValueError(f"block {block.index} failed")
            return np.full(block.write_roi.shape, block.index + 1, np.int64)

        def write(block, values):
            with self.lock:
                self.data[block.write_roi.to_slices()] = values
            if hook:
                hook(block)

        return BlockSteps(read=lambda b: b.index, compute=compute, write=write, parallel=parallel)

    def expected_block(self, index: int) -> bool:
        block = GRID.block(index)
        return bool((self.data[block.write_roi.to_slices()] == index + 1).all())


@pytest.mark.parametrize("parallel", [False, True])
def test_shards_cover_every_block_once_and_complete_the_run(parallel):
    store, spec, vol = _store(), _spec(), Volume()
    store.claim(spec, overwrite=False)
    computed = [run_phase(store, spec, "work", GRID.blocks(), vol.steps(parallel), shard_index=k, num_shards=3,
                          threads=3).blocks_computed for k in range(3)]
    assert sum(computed) == GRID.num_blocks
    assert all(vol.expected_block(i) for i in range(GRID.num_blocks))
    assert store.read_complete(spec.run_id) is not None
    again = run_phase(store, spec, "work", GRID.blocks(), vol.steps(parallel), threads=3)
    assert again.blocks_computed == 0 and again.blocks_skipped == GRID.num_blocks
    over = run_phase(store, spec, "work", GRID.blocks(), vol.steps(parallel), threads=3, overwrite=True,
                     shard_index=1, num_shards=2)
    assert over.blocks_computed == GRID.num_blocks // 2


@pytest.mark.parametrize("parallel", [False, True])
def test_an_error_marks_only_blocks_whose_data_was_written(parallel):
    store, spec, vol = _store(), _spec(), Volume()
    store.claim(spec, overwrite=False)
    with pytest.raises(ValueError, match="block 5 failed"):
        run_phase(store, spec, "work", GRID.blocks(), vol.steps(parallel, fail_at=5), threads=2)
    done = store.markers(spec.run_id, "work").done_indices()
    assert 5 not in done and done
    assert all(vol.expected_block(i) for i in done)
    [record] = store.shard_records(spec.run_id, "work")
    assert record["state"] == "failed"
    assert store.read_complete(spec.run_id) is None


@pytest.mark.parametrize("parallel", [False, True])
def test_a_stop_request_finishes_the_blocks_in_flight_and_raises_stopped(parallel):
    store, spec, vol = _store(), _spec(), Volume()
    store.claim(spec, overwrite=False)

    def hook(block):
        if block.index == 3:
            signals._requested.set()

    try:
        with pytest.raises(Stopped):
            run_phase(store, spec, "work", GRID.blocks(), vol.steps(parallel, hook=hook), threads=2)
    finally:
        signals.reset()
    done = store.markers(spec.run_id, "work").done_indices()
    assert 3 in done and len(done) < GRID.num_blocks
    assert all(vol.expected_block(i) for i in done)
    assert store.shard_records(spec.run_id, "work")[0]["state"] == "stopped"
    resumed = run_phase(store, spec, "work", GRID.blocks(), vol.steps(parallel), threads=2)
    assert resumed.blocks_skipped == len(done)
    assert all(vol.expected_block(i) for i in range(GRID.num_blocks))


def test_a_run_that_loses_its_claim_stops_and_unmarks_what_it_wrote(monkeypatch):
    monkeypatch.setattr(runner_module, "VERIFY_SECONDS", 0.0)
    store, old, new, vol = _store(), _spec(1), _spec(2), Volume()
    store.claim(old, overwrite=False)
    new_markers = store.markers(new.run_id, "work")

    def hook(block):
        if block.index == 4:  # another run has marked every block done (its markers first, so
            for i in range(GRID.num_blocks):  # the old run cannot see the claim before them) ...
                new_markers.mark_done(i)
            store.claim(new, overwrite=True)  # ... and takes the output over (--overwrite elsewhere)

    with pytest.raises(RunMismatchError, match=f"claimed by run {new.run_id} while this shard of run {old.run_id}"):
        run_phase(store, old, "work", GRID.blocks(), vol.steps(False, hook=hook), threads=1)
    assert 4 not in new_markers.done_indices()  # the old run's write there no longer counts
    assert store.read_claim()["run_id"] == new.run_id


def test_claims_refuse_other_runs_and_name_the_change():
    store = _store()
    assert store.claim(_spec(1), overwrite=False) is True
    assert store.claim(_spec(1), overwrite=False) is False  # the same run joins
    with pytest.raises(RunMismatchError, match=r"settings\.x: 1 -> 2; rerun with --overwrite"):
        store.claim(_spec(2), overwrite=False)
    store.markers(_spec(1).run_id, "work").mark_done(0)
    assert store.claim(_spec(2), overwrite=True) is True
    assert not storage.exists(store.run_url(_spec(1).run_id))  # the replaced run's records are gone


def test_progress_without_a_tty_is_plain_lines(monkeypatch, caplog):
    monkeypatch.setenv("CATENA_PROGRESS_INTERVAL", "0")
    store, spec, vol = _store(), _spec(), Volume()
    store.claim(spec, overwrite=False)
    with caplog.at_level(logging.INFO, logger="catena_mito"):
        run_phase(store, spec, "work", GRID.blocks(), vol.steps(False), threads=1, desc="work shard 0/1")
    lines = [r.getMessage() for r in caplog.records if r.name == "catena_mito.progress"]
    assert lines and lines[-1].startswith("work shard 0/1: 16/16 blocks (100.0%)")
    assert any("ETA" in line for line in lines[:-1])
    assert all("\r" not in line for line in lines)


def test_a_replaced_raw_volume_makes_its_prediction_stale(tmp_path):
    from catena_mito.blockwise.runs import array_identity, describe_inputs, stale_inputs

    raw_url = str(tmp_path / "d.zarr/volumes/raw")
    storage.create_array(raw_url, (4, 4, 4), np.uint8, (4, 4, 4), attrs={"resolution": [8, 8, 8]})
    ident = array_identity(storage.open_array(raw_url), raw_url)
    claim = {"description": {"inputs": describe_inputs({"raw": (raw_url, ident)})}}
    assert stale_inputs(claim, None) == []
    storage.create_array(raw_url, (4, 4, 5), np.uint8, (4, 4, 4), overwrite=True, attrs={"resolution": [8, 8, 8]})
    [problem] = stale_inputs(claim, None)
    assert "raw" in problem and "shape: [4,4,4] -> [4,4,5]" in problem


def test_a_lease_of_a_dead_process_is_taken_over_and_a_live_one_refused(monkeypatch, tmp_path):
    import os
    import socket
    import time

    from catena_mito.blockwise import runs
    from catena_mito.errors import PhaseError

    monkeypatch.setattr(runs, "LEASE_STALE_SECONDS", 3.0)
    monkeypatch.setattr(runs, "LEASE_HEARTBEAT_SECONDS", 0.2)
    store = RunStore(str(tmp_path / "rec"))
    url = store.run_url("r", "merge", "lease.json")
    dead = subprocess_pid_that_exited()
    storage.write_json(url, {"token": "x", "host": socket.gethostname(), "pid": dead, "heartbeat": time.time()})
    t0 = time.monotonic()
    with runs.Lease(store, "r", "merge", "the merge"):
        assert storage.read_json(url)["pid"] == os.getpid()
    assert time.monotonic() - t0 < 2.5  # at once: its process is gone
    assert not storage.exists(url)  # released

    stop = threading.Event()

    def live_owner() -> None:  # another node's process, heartbeating
        while not stop.is_set():
            storage.write_json(url, {"token": "y", "host": "other-node", "pid": 1, "heartbeat": time.time()})
            time.sleep(0.1)

    owner = threading.Thread(target=live_owner)
    owner.start()
    try:
        time.sleep(0.2)
        with pytest.raises(PhaseError, match="already running in another process \\(other-node pid 1"), \
                runs.Lease(store, "r", "merge", "the merge"):
            pass
    finally:
        stop.set()
        owner.join()
    with runs.Lease(store, "r", "merge", "the merge"):  # its heartbeat stopped: stale after 3 s
        pass


def subprocess_pid_that_exited() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_inputs_known_by_content_do_not_depend_on_their_url_spelling(tmp_path):
    from catena_mito.blockwise.runs import describe_inputs

    def spec(model_url: str, raw_url: str) -> RunSpec:
        inputs = describe_inputs({"model": (model_url, {"kind": "checkpoint", "sha256": "sha256:ab"}),
                                  "raw": (raw_url, {"kind": "foreign", "shape": [1, 1, 1]})})
        return RunSpec("t", {"inputs": inputs}, (("p", 1),))

    base = spec(str(tmp_path / "m.pth"), str(tmp_path / "d.zarr"))
    assert spec(str(tmp_path / "copy" / "m.pth"), str(tmp_path / "d.zarr")).run_id == base.run_id
    assert spec(str(tmp_path / "m.pth"), str(tmp_path / "x" / ".." / "d.zarr") + "/").run_id == base.run_id
    assert spec(str(tmp_path / "m.pth"), str(tmp_path / "other.zarr")).run_id != base.run_id
    assert spec("s3://b/m.pth", "s3://b//d.zarr/").run_id == spec("s3://c/m.pth", "s3://b/d.zarr").run_id


def test_free_heap_pages_go_back_to_the_system_between_blocks():
    """blockwise.heap: after a block's large arrays are freed, their pages leave the RSS
    (glibc keeps them otherwise, once its mmap threshold has risen past their size).

    In a fresh interpreter: what earlier tests left in this process's heap decides where
    new arrays land, and with them whether glibc trims on its own."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    script = """
import numpy as np
from catena_mito.blockwise import heap
assert heap._malloc_trim() is not None

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

big = np.ones(16 * 2**20 // 8)  # freed: raises the mmap threshold to 16 MiB...
del big
arrays = [np.ones(2**20) for _ in range(48)]  # ...so these 8 MiB arrays come from the heap
top = np.ones(2**15)  # above them: their free pages are not at the heap's top, which glibc trims
del arrays
before = rss()
heap.release_free_heap()
print(before, rss())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    assert after < before - 128 * 2**20  # most of their 384 MiB handed back
