"""The one block runner: plan → this shard's blocks → skip done → read ahead → compute →
write → mark, with run identity, completeness, progress and clean stop.

Every block-wise job is a thin user: it builds a :class:`RunSpec` (what determines the
output), claims the output (:meth:`RunStore.claim`), and hands each phase's blocks and a
:class:`BlockSteps` to :func:`run_phase`::

    all blocks of the phase (C order)
      │ select_shard(index % num_shards)        → this shard's blocks
      │ skip those marked done for THIS run id  (markers of other runs never count)
      ▼
    read(block)        worker threads, up to ``threads + 1`` blocks ahead (bounded)
    compute(block, x)  the calling thread (a model that threads itself), or the workers
    write(block, y)    worker threads, at most ``threads`` writes behind (bounded)
    mark done          after the write returned, in the same worker
      │ every few seconds: does this run still own the output? (else stop, see below)
      ▼
    shard record (finished / stopped / failed); complete.json when every phase is done

Memory is bounded by ``threads + 1`` blocks read ahead, one computing and ``threads``
writing. On SIGTERM the loop starts no new block, lets the writes in flight finish (and
mark), and raises :class:`~catena_mito.errors.Stopped`. An error stops new blocks, lets
those in flight finish, and is raised. If another run claims the output while this one
runs (``--overwrite`` elsewhere), this shard stops with an error and removes the new
owner's markers of the blocks it wrote since it last checked, so its writes can never
hide under the new run's markers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from catena_mito.blockwise import signals
from catena_mito.blockwise.geometry import Block, select_shard
from catena_mito.blockwise.heap import release_free_heap
from catena_mito.blockwise.progress import Progress
from catena_mito.blockwise.runs import RunSpec, RunStore
from catena_mito.errors import RunMismatchError, Stopped

log = logging.getLogger(__name__)

#: Seconds between checks that this run still owns its output.
VERIFY_SECONDS = 10.0


@dataclass
class BlockSteps:
    """What a phase does with one block.

    ``read(block)`` runs in worker threads ahead of ``compute``; ``compute(block, data)``
    runs in the calling thread, or in the workers with ``parallel=True`` (work that
    releases the GIL, e.g. cc3d and codecs); ``write(block, result)`` writes the block's
    output and may return extra fields for its done marker.
    """

    compute: Callable[[Block, Any], Any]
    write: Callable[[Block, Any], Mapping[str, Any] | None]
    read: Callable[[Block], Any] | None = None
    parallel: bool = False


@dataclass
class PhaseResult:
    phase: str
    blocks_total: int
    blocks_in_shard: int
    blocks_computed: int = 0
    blocks_skipped: int = 0


def run_phase(
    store: RunStore | None,
    spec: RunSpec | None,
    phase: str,
    blocks: Sequence[Block],
    steps: BlockSteps,
    *,
    shard_index: int = 0,
    num_shards: int = 1,
    overwrite: bool = False,
    threads: int = 1,
    desc: str | None = None,
    complete_info: Mapping[str, Any] | None = None,
    assignment: str = "round_robin",
) -> PhaseResult:
    """Run this shard's blocks of ``phase`` (see the module docstring).

    ``store``/``spec`` None: an in-memory gather (TIFF output): no markers, no resume.
    ``overwrite``: recompute this shard's blocks even when marked done.
    ``complete_info``: extra fields for ``complete.json`` if this shard completes the run.
    ``assignment``: how blocks are dealt to shards (:func:`~catena_mito.blockwise.geometry.select_shard`);
    recorded in the shard records, so status names the right owner of a missing block.
    """
    mine = select_shard(blocks, shard_index, num_shards, assignment)
    desc = desc or f"{phase} shard {shard_index}/{num_shards}"
    result = PhaseResult(phase, len(blocks), len(mine))
    if store is None or spec is None:
        todo = list(mine)
        markers = None
    else:
        markers = store.markers(spec.run_id, phase)
        done = markers.done_indices()
        if overwrite:
            markers.clear([b.index for b in mine if b.index in done])
            done = set()
        todo = [b for b in mine if b.index not in done]
        store.write_shard_record(spec.run_id, phase, shard_index, num_shards, "running",
                                 blocks=len(mine), todo=len(todo), assignment=assignment)
    result.blocks_skipped = len(mine) - len(todo)
    log.info("%s: %d blocks in this shard (%d of the whole phase), %d done already, %d to compute",
             desc, len(mine), len(blocks), result.blocks_skipped, len(todo))
    guard = _OwnerGuard(store, spec, phase)
    state = "failed"
    try:
        with signals.stoppable(), Progress(len(todo), desc) as bar:
            def finish(block: Block, output: Any) -> None:
                guard.writing(block.index)
                info = steps.write(block, output)
                if markers is not None:
                    markers.mark_done(block.index, {"shard": shard_index, "num_shards": num_shards,
                                                    **dict(info or {})})
                guard.wrote(block.index)

            if steps.parallel:
                computed = _run_parallel(todo, steps, finish, threads, bar, guard)
            else:
                computed = _run_pipeline(todo, steps, finish, threads, bar, guard)
            result.blocks_computed = computed
            guard.check(final=True)
        state = "finished"
    except Stopped:
        state = "stopped"
        raise
    finally:
        if store is not None and spec is not None:
            store.write_shard_record(spec.run_id, phase, shard_index, num_shards, state,
                                     blocks=len(mine), computed=result.blocks_computed, assignment=assignment)
    if store is not None and spec is not None:
        store.mark_complete_if_done(spec, complete_info)
    return result


class _OwnerGuard:
    """Checks now and then that the run still owns the output (see the module docstring)."""

    def __init__(self, store: RunStore | None, spec: RunSpec | None, phase: str):
        self.store, self.spec, self.phase = store, spec, phase
        self.in_flight: set[int] = set()
        self.written: list[int] = []
        self.lock = threading.Lock()
        self.last = time.monotonic()

    def writing(self, index: int) -> None:
        with self.lock:
            self.in_flight.add(index)

    def wrote(self, index: int) -> None:
        with self.lock:
            self.in_flight.discard(index)
            self.written.append(index)

    def check(self, final: bool = False) -> None:
        if self.store is None or self.spec is None:
            return
        if not final and time.monotonic() - self.last < VERIFY_SECONDS:
            return
        self.last = time.monotonic()
        with self.lock:
            seen = len(self.written)  # writes that finished before this look at the claim
        owner = self.store.verify_owner(self.spec.run_id)
        if owner is None:
            with self.lock:
                del self.written[:seen]
            return
        new_id = owner.get("run_id")
        with self.lock:
            suspects = sorted(set(self.written) | self.in_flight)
        if new_id:  # our writes since the last check may have landed over the new run's blocks
            self.store.markers(str(new_id), self.phase).clear(suspects)
        raise RunMismatchError(
            f"{self.store.shown} was claimed by run {new_id or '(none: its record was removed)'} while "
            f"this shard of run {self.spec.run_id} ran; stopped (the blocks this shard wrote since are "
            "not marked done for either run)")


def _raise_stop_if_requested(count: int) -> None:
    if signals.requested():
        log.warning("stopping on SIGTERM after %d blocks of this shard; a rerun resumes", count)
        raise Stopped("stopped by SIGTERM; the blocks written are marked done, a rerun resumes")


def _run_pipeline(todo: Sequence[Block], steps: BlockSteps, finish: Callable[[Block, Any], None],
                  threads: int, bar: Progress, guard: _OwnerGuard) -> int:
    """Reads ahead and writes behind in worker threads; compute in this thread."""
    threads = max(1, threads)
    computed = 0
    with ThreadPoolExecutor(threads, thread_name_prefix="catena-io") as pool:
        reads: deque[tuple[Block, Future | None]] = deque()
        writes: deque[Future] = deque()
        upcoming = iter(todo)

        def top_up() -> None:
            while len(reads) < threads + 1:
                block = next(upcoming, None)
                if block is None:
                    return
                reads.append((block, pool.submit(steps.read, block) if steps.read else None))

        def drain(limit: int) -> None:
            nonlocal computed
            while len(writes) > limit:
                writes.popleft().result()
                computed += 1
                bar.update()

        try:
            top_up()
            while reads:
                _raise_stop_if_requested(computed)
                block, future = reads.popleft()
                data = future.result() if future is not None else None
                top_up()
                release_free_heap()  # what the previous blocks freed (see blockwise.heap)
                output = steps.compute(block, data)
                writes.append(pool.submit(finish, block, output))
                drain(threads)
                guard.check()
            drain(0)
        except BaseException:
            for _, future in reads:
                if future is not None:
                    future.cancel()
            for future in writes:  # let writes in flight finish: each marks its own block
                with contextlib.suppress(BaseException):  # the first error is the one raised
                    future.result()
            raise
    return computed


def _run_parallel(todo: Sequence[Block], steps: BlockSteps, finish: Callable[[Block, Any], None],
                  threads: int, bar: Progress, guard: _OwnerGuard) -> int:
    """Read, compute and write each block in a worker; at most ``threads`` in flight."""
    def one(block: Block) -> None:
        data = steps.read(block) if steps.read else None
        finish(block, steps.compute(block, data))
        del data
        release_free_heap()  # see blockwise.heap

    if threads <= 1:
        for count, block in enumerate(todo):
            _raise_stop_if_requested(count)
            one(block)
            bar.update()
            guard.check()
        return len(todo)
    computed = 0
    error: BaseException | None = None
    with ThreadPoolExecutor(threads, thread_name_prefix="catena-block") as pool:
        pending: set[Future] = set()
        upcoming = iter(todo)
        while True:
            while error is None and not signals.requested() and len(pending) < threads:
                block = next(upcoming, None)
                if block is None:
                    break
                pending.add(pool.submit(one, block))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    future.result()
                    computed += 1
                    bar.update()
                except BaseException as e:  # noqa: BLE001 - raised once those in flight finish
                    error = error or e
            if error is None:
                try:
                    guard.check()
                except BaseException as e:  # noqa: BLE001
                    error = e
    if error is not None:
        raise error
    if computed < len(todo):
        _raise_stop_if_requested(computed)
    return computed
