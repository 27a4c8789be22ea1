"""``catena-mito label``: probabilities → globally numbered mitochondria instances.

Threshold, connected components and small-instance removal, computed block by block and
stitched exactly, so the output equals one connected-components pass over the whole
binarised volume, with the same ids, for any block shape and any number of shards
(DESIGN invariant 1). Three phases (see :mod:`catena_mito.stitch` for the method)::

    blocks   (sharded)  per block of ``chunk_size``: foreground = probability > threshold,
                        provisional connected components, their sizes, first voxels and
                        the block's six boundary planes  →  .catena/.../blocks/data/<i>.npz
    merge    (1 proc.)  union-find over the labels that touch across block faces, edges
                        and corners; global sizes; objects smaller than
                        ``thres_small_instances`` removed; final ids 1..K in order of each
                        object's first voxel (C order)  →  .catena/.../merge/maps/<i>.npy
    relabel  (sharded)  per output block: recompute the block's provisional labels (the
                        same deterministic cc3d call, cheaper than storing and re-reading a
                        label volume) and map them to final ids  →  the output array
    clean    (1 proc.)  after relabel: remove the intermediate files, keep a record

``--phase all`` runs the four in one process. The merge state is small files, never a
volume: per block a few KB (label counts, first voxels, boundary planes) and a lookup table.

Where things go (``W = <output_instance_dir>/.catena/label/<output_filename>``)::

    <output_instance_dir>/<output_filename>     the output (Zarr array), or
    <output_instance_dir>/<output_filename>.tif the output (TIFF, single-process gather)
    W/config.yaml                               the resolved config (secrets redacted)
    W/plan.json                                 the settings the blocks were computed with
    W/blocks/data/<i>.npz, W/blocks/done/<i>.json   per-block results and done markers
    W/merge/maps/<i>.npy,  W/merge/done/0.json      per-block lookup tables, merge marker
    W/relabel/done/<i>.json                     relabel markers (one per output block)
    W/complete.json                             written by ``clean``: the run's summary

Every phase is resumable: a block is marked done only after its data is written, a rerun
skips done blocks, and ``--overwrite`` recomputes. A phase refuses to continue from one
computed with different settings (naming the field) unless ``--overwrite``.

``overlap`` is accepted for compatibility with Catena and has no effect: the stitching is
exact without any overlap between blocks. ``scale_factors`` resample the final labels by
nearest neighbour: the output has ``round(shape * factor)`` voxels per axis and output
voxel ``o`` takes input voxel ``min(floor((o + 0.5) / factor), shape - 1)``, a formula of
the global coordinate only, so it does not depend on blocks. The (scaled) output is cut
into its own grid of ``chunk_size`` blocks, one writer per chunk; output chunks are
``chunk_size`` in every case. Axis order (z, y, x); sizes in voxels, resolutions in nm.
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from catena_mito import storage
from catena_mito.config import LabelConfig, save_resolved_config
from catena_mito.errors import CatenaError, ConfigError, DataError, ShardError, StorageError
from catena_mito.blockwise.geometry import Block, BlockGrid, Roi, check_shard, select_shard
from catena_mito.blockwise.markers import DoneMarkers
from catena_mito.stitch import BlockResult, boundary_pairs, forward_offsets, global_table

log = logging.getLogger(__name__)

PHASES = ("all", "blocks", "merge", "relabel", "clean")
TIFF_SUFFIXES = (".tif", ".tiff")
#: Environment variable that sets the most bytes a TIFF output may gather in memory.
TIFF_LIMIT_ENV = "CATENA_TIFF_MAX_BYTES"
#: Without that variable, a TIFF output may use this fraction of the available memory.
TIFF_MEMORY_FRACTION = 0.5


class PhaseError(CatenaError):
    """A phase was started before the phase it needs had completed."""


class OutputTooLargeError(ConfigError):
    """``output_format: tiff`` was asked for a volume that does not fit in memory."""


# --- the foreground -------------------------------------------------------------------------


def foreground(values: np.ndarray, threshold: float, where: str = "input") -> np.ndarray:
    """``values > threshold`` evaluated exactly, for probabilities of any supported dtype.

    * float inputs compare in their own precision against the largest value of that dtype
      not above ``threshold``, which for every representable value gives the same answer
      as comparing in exact arithmetic (and as ``values.astype(float64) > threshold``);
    * uint8 inputs are probabilities ``value / 255``: ``value / 255 > threshold`` exactly,
      i.e. ``value > floor(255 * threshold)`` with the threshold's exact binary value;
    * bool inputs are probabilities 0 and 1.

    NaN or infinite probabilities are a :class:`DataError` naming ``where``.
    """
    dt = values.dtype
    if dt == np.bool_:
        return values.copy() if threshold < 1 else np.zeros(values.shape, bool)
    if dt == np.uint8:
        cutoff = math.floor(Fraction(threshold) * 255)
        return values > np.uint8(min(cutoff, 255))
    if np.issubdtype(dt, np.floating):
        if not np.isfinite(values).all():
            bad = "NaN" if np.isnan(values).any() else "infinite"
            raise DataError(f"{where}: {bad} probabilities (expected values in [0, 1])")
        t = dt.type(threshold)
        if float(t) > threshold:  # rounded up: step down one value so that v > t == v > threshold
            t = np.nextafter(t, dt.type(-np.inf))
        return values > t
    raise DataError(
        f"{where}: dtype {dt} is not a probability volume (expected float, uint8 read as "
        "value/255, or bool)"
    )


def connected_components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Provisional labels ``1..n`` of a binary block (deterministic), and ``n``."""
    if not mask.any():  # skip cc3d on empty blocks, the common case in sparse volumes
        return np.zeros(mask.shape, np.uint8), 0
    if min(mask.shape) == 1:
        # cc3d 4.1 under-allocates its union-find for 26-connected blocks one voxel thick
        # ("Label 2 cannot be mapped to union-find array of length 2"), as the last block
        # is when the volume is one voxel longer than a multiple of chunk_size; such thin
        # blocks are cheap, so scipy labels them (deterministically, like cc3d)
        from scipy import ndimage

        rank = {6: 1, 18: 2, 26: 3}[connectivity]
        labels, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, rank))
        return labels.astype(np.uint32, copy=False), int(n)
    import cc3d

    labels, n = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)
    return labels, int(n)


# --- the input --------------------------------------------------------------------------------


class _Input:
    """The probability volume, a Zarr array (read block-wise) or a TIFF (read whole)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any]):
        self.url = url
        self.shown = storage.redact_url(url)
        if url.lower().rstrip("/").endswith(TIFF_SUFFIXES):
            data, meta = storage.read_tiff(url, storage_options)
            self._data: Any = data
            self.resolution = tuple(float(r) for r in meta["resolution"]) if "resolution" in meta else None
            self.offset = tuple(float(o) for o in meta.get("offset", (0.0, 0.0, 0.0)))
        else:
            self._data = storage.open_volume(url, storage_options)
            self.resolution, self.offset = storage.read_spatial(self._data)
        shape = tuple(int(s) for s in self._data.shape)
        if len(shape) != 3:
            raise DataError(
                f"input_prediction_path {self.shown!r} has {len(shape)} dimensions {list(shape)}, "
                "expected 3 (z, y, x)"
            )
        if 0 in shape:
            raise DataError(f"input_prediction_path {self.shown!r} is empty (shape {list(shape)})")
        self.shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        self.dtype = np.dtype(self._data.dtype)
        foreground(np.zeros(1, self.dtype), 0.5, f"input_prediction_path {self.shown!r}")  # dtype check

    def foreground(self, roi: Roi, threshold: float) -> np.ndarray:
        try:
            values = np.asarray(self._data[roi.to_slices()])
        except CatenaError:
            raise
        except Exception as e:
            raise StorageError(f"cannot read {self.shown!r} at {_roi_text(roi)}: {e}") from e
        return foreground(values, threshold, f"input_prediction_path {self.shown!r} at {_roi_text(roi)}")


def _roi_text(roi: Roi) -> str:
    return "[" + ", ".join(f"{b}:{e}" for b, e in zip(roi.begin, roi.end)) + "]"


# --- where things go --------------------------------------------------------------------------


@dataclass
class _Layout:
    """The URLs of one label task (see the module docstring)."""

    config: LabelConfig
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = self.config
        self.tiff = c.output_format == "tiff"
        name = c.output_filename
        if self.tiff and not name.lower().endswith(TIFF_SUFFIXES):
            self.output_url = storage.join_url(c.output_instance_dir, name + ".tif")
        else:
            self.output_url = storage.join_url(c.output_instance_dir, name)
        self.task = f"label/{name.strip('/')}"
        self.work_url = storage.join_url(c.output_instance_dir, ".catena", self.task)
        self.blocks_key = ""
        self.blocks_done = DoneMarkers(c.output_instance_dir, f"{self.task}/blocks", self.options)
        task = self.task
        self.merge_done = DoneMarkers(c.output_instance_dir, f"{task}/merge", self.options)
        self.relabel_done = DoneMarkers(c.output_instance_dir, f"{task}/relabel", self.options)

    def set_blocks_key(self, key: str) -> None:
        """Block results live under a key of their settings, so changed settings (a new
        threshold, say) never meet stale results, even from shards run at other times."""
        self.blocks_key = key
        self.blocks_done = DoneMarkers(
            self.config.output_instance_dir, f"{self.task}/blocks/{key}", self.options
        )

    def url(self, *parts: str) -> str:
        return storage.join_url(self.work_url, *parts)

    def block_data(self, i: int) -> str:
        return self.url("blocks", self.blocks_key, "data", f"{i}.npz")

    def block_map(self, i: int) -> str:
        return self.url("merge", "maps", f"{i}.npy")


def _params(config: LabelConfig, inp: _Input, phase: str) -> dict[str, Any]:
    """The settings a phase's results depend on (a later phase checks they still hold)."""
    p: dict[str, Any] = {
        "input_prediction_path": storage.redact_url(config.input_prediction_path),
        "input_shape": list(inp.shape),
        "input_dtype": str(inp.dtype),
        "chunk_size": list(config.chunk_size),
        "thres_foreground": float(config.thres_foreground),
        "connectivity": int(config.connectivity),
    }
    if phase != "blocks":
        p.update({
            "thres_small_instances": int(config.thres_small_instances),
            "remove_small_mode": config.remove_small_mode,
            "scale_factors": [float(f) for f in config.scale_factors],
            "output_format": config.output_format,
        })
    return p


def _key(params: Mapping[str, Any]) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def _check_params(recorded: Mapping[str, Any], current: Mapping[str, Any], what: str, fix: str) -> None:
    diffs = [f"{k}={recorded.get(k)!r} (now {v!r})" for k, v in current.items() if recorded.get(k) != v]
    if diffs:
        raise ConfigError(f"{what} was computed with different settings: {'; '.join(diffs)}; {fix}")


# --- geometry of the output -------------------------------------------------------------------


def output_shape(shape: Sequence[int], scale_factors: Sequence[float]) -> tuple[int, int, int]:
    """``round(shape * factor)`` per axis (halves round up), at least 1 (voxels, z y x)."""
    return tuple(max(1, math.floor(s * f + 0.5)) for s, f in zip(shape, scale_factors))  # type: ignore[return-value]


def source_indices(begin: int, end: int, factor: float, size: int) -> np.ndarray:
    """Input voxel of each output voxel ``begin..end-1`` along one axis (nearest neighbour).

    ``floor((o + 0.5) / factor)`` clipped to ``[0, size)``: the input voxel whose extent
    holds the output voxel's centre, computed from the global coordinate only.
    """
    o = np.arange(begin, end, dtype=np.float64)
    return np.minimum(np.floor((o + 0.5) / factor).astype(np.int64), size - 1)


def tiff_memory_limit() -> int:
    """Most bytes a TIFF output may gather: ``$CATENA_TIFF_MAX_BYTES`` or half the free memory."""
    raw = os.environ.get(TIFF_LIMIT_ENV, "").strip()
    if raw:
        try:
            return int(float(raw))
        except ValueError as e:
            raise ConfigError(f"environment variable {TIFF_LIMIT_ENV}={raw!r} is not a number of bytes") from e
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:  # psutil is optional: fall back on sysconf (Linux, macOS)
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(available * TIFF_MEMORY_FRACTION)


def _check_tiff_fits(shape: Sequence[int], dtype: Any, url: str) -> None:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    limit = tiff_memory_limit()
    if nbytes > limit:
        raise OutputTooLargeError(
            f"output_format 'tiff' gathers the whole output {storage.redact_url(url)!r} in memory: "
            f"shape {list(shape)} {np.dtype(dtype)} needs {nbytes / 2**30:.2f} GiB, more than the "
            f"limit of {limit / 2**30:.2f} GiB (half the available memory, or ${TIFF_LIMIT_ENV}); "
            "use output_format: zarr"
        )


def _final_dtype(num_objects: int) -> np.dtype:
    return np.dtype(np.uint32) if num_objects <= np.iinfo(np.uint32).max else np.dtype(np.uint64)


# --- running blocks -------------------------------------------------------------------------


#: Threads for small-file reads and writes in the merge (latency-bound on object stores).
SMALL_FILE_THREADS = 16


def default_threads() -> int:
    """Threads per process: block I/O and decompression overlap with compute."""
    return max(1, min(8, os.cpu_count() or 1))


def _run_parallel(
    fn: Callable[[Any], Any], items: Sequence[Any], threads: int, desc: str, unit: str = "block"
) -> list[Any]:
    """``[fn(item) ...]`` on a thread pool with at most ``threads`` items in flight
    (memory stays bounded by a few blocks), with a progress bar; the first error is raised
    once the running items finish, and no further items start."""
    from tqdm import tqdm

    results: list[Any] = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not items,
               mininterval=0.5 if sys.stderr.isatty() else 10.0, file=sys.stderr)
    try:
        if threads <= 1:
            for k, item in enumerate(items):
                results[k] = fn(item)
                bar.update()
            return results
        with ThreadPoolExecutor(threads) as pool:
            pending: dict[Future, int] = {}
            nxt = 0
            error: BaseException | None = None
            while pending or (nxt < len(items) and error is None):
                while error is None and nxt < len(items) and len(pending) < threads:
                    pending[pool.submit(fn, items[nxt])] = nxt
                    nxt += 1
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    k = pending.pop(f)
                    try:
                        results[k] = f.result()
                    except BaseException as e:  # re-raised after the others finish
                        error = error or e
                    bar.update()
            if error is not None:
                raise error
        return results
    finally:
        bar.close()


def _ordered_prefetch(fn: Callable[[Any], Any], items: Sequence[Any], threads: int, window: int = 32) -> Iterable[Any]:
    """Yield ``fn(item)`` in order, computing up to ``window`` ahead on a thread pool."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        queue: list[Future] = []
        nxt = 0
        for _ in range(len(items)):
            while nxt < len(items) and len(queue) < window:
                queue.append(pool.submit(fn, items[nxt]))
                nxt += 1
            yield queue.pop(0).result()


def _wait_for(missing: Callable[[], list[str]], timeout: float, what: str, fix: str) -> None:
    """Poll ``missing()`` until it is empty, for up to ``timeout`` seconds."""
    deadline = time.monotonic() + max(0.0, timeout)
    logged = False
    while True:
        gone = missing()
        if not gone:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            shown = ", ".join(gone[:10]) + (f" and {len(gone) - 10} more" if len(gone) > 10 else "")
            waited = f" after waiting {timeout:g} s" if timeout > 0 else ""
            raise PhaseError(f"{what} is not complete{waited}: missing {shown}; {fix}")
        if not logged:
            log.info("waiting up to %g s for %s (%d missing)", timeout, what, len(gone))
            logged = True
        time.sleep(min(left, 1.0))  # one listing a second is cheap, even on S3


# --- the task -------------------------------------------------------------------------------


@dataclass
class LabelSummary:
    """What a call to :func:`label` did."""

    phase: str
    output_url: str
    blocks_computed: int = 0
    blocks_skipped: int = 0
    num_objects: int | None = None
    num_removed: int | None = None
    dtype: str | None = None
    shape: tuple[int, int, int] | None = None


class _LabelTask:
    def __init__(self, config: LabelConfig, threads: int):
        self.config = config
        self.options = dict(config.storage_options)
        self.layout = _Layout(config, self.options)
        self.threads = threads
        self.input = _Input(config.input_prediction_path, self.options)
        self.layout.set_blocks_key(_key(_params(config, self.input, "blocks")))
        self.grid = BlockGrid(self.input.shape, config.chunk_size)
        self.out_shape = output_shape(self.input.shape, config.scale_factors)
        self.scaled = tuple(self.out_shape) != tuple(self.input.shape)
        self.out_grid = BlockGrid(self.out_shape, config.chunk_size)
        self.summary = LabelSummary("", storage.redact_url(self.layout.output_url))
        if self.layout.tiff:  # refuse before any work (the final dtype is at least uint32)
            _check_tiff_fits(self.out_shape, np.uint32, self.layout.output_url)

    # -- bookkeeping --------------------------------------------------------------------

    def save_config(self) -> None:
        save_resolved_config(self.config, self.layout.url("config.yaml"), self.options)

    def complete_record(self) -> dict | None:
        url = self.layout.url("complete.json")
        return storage.read_json(url, self.options) if storage.exists(url, self.options) else None

    def already_complete(self, overwrite: bool) -> bool:
        """True when a cleaned, completed run with these settings exists (nothing to do)."""
        record = self.complete_record()
        if record is None:
            return False
        if overwrite:
            storage.remove(self.layout.url("complete.json"), self.options)
            return False
        _check_params(record.get("params", {}), _params(self.config, self.input, "merge"),
                      f"the output {self.summary.output_url!r}", "rerun with --overwrite to recompute it")
        log.info("%s is complete (%s objects); nothing to do (--overwrite recomputes)",
                 self.summary.output_url, record.get("num_objects"))
        self.summary.num_objects = record.get("num_objects")
        self.summary.dtype = record.get("dtype")
        return True

    # -- blocks ---------------------------------------------------------------------------

    def run_blocks(self, shard_index: int, num_shards: int, overwrite: bool) -> None:
        lay, opts = self.layout, self.options
        # plan.json: the settings of the latest blocks run, for clearer errors in merge
        storage.write_json(lay.url("plan.json"), _params(self.config, self.input, "blocks"), opts)
        mine = select_shard(self.grid.blocks(), shard_index, num_shards)
        done = set() if overwrite else lay.blocks_done.done_indices()
        todo = [b for b in mine if b.index not in done]
        self.summary.blocks_skipped += len(mine) - len(todo)
        if todo:
            # a recomputed block makes any earlier merge stale
            lay.merge_done.clear()
            if overwrite:
                lay.blocks_done.clear([b.index for b in todo])
        log.info("label blocks: shard %d/%d, %d blocks (%d already done)",
                 shard_index, num_shards, len(mine), len(mine) - len(todo))
        _run_parallel(self._one_block, todo, self.threads, f"label blocks {shard_index}/{num_shards}")
        self.summary.blocks_computed += len(todo)

    def _one_block(self, block: Block) -> None:
        mask = self.input.foreground(block.write_roi, self.config.thres_foreground)
        labels, n = connected_components(mask, self.config.connectivity)
        result = BlockResult.from_labels(labels, n, block.write_roi.offset, self.input.shape)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **result.to_npz_dict())
        storage.write_bytes(self.layout.block_data(block.index), buffer.getvalue(), self.options)
        self.layout.blocks_done.mark_done(block.index, {"labels": n})  # only after the data

    def _load_block(self, index: int) -> BlockResult:
        data = storage.read_bytes(self.layout.block_data(index), self.options)
        with np.load(io.BytesIO(data)) as npz:
            result = BlockResult.from_npz_dict(npz)
        expected = self.grid.block(index).write_roi
        if result.offset != expected.offset or result.shape != expected.shape:
            raise DataError(
                f"{storage.redact_url(self.layout.block_data(index))!r} describes block "
                f"{result.offset}+{result.shape}, expected {expected.offset}+{expected.shape}; "
                "rerun --phase blocks with --overwrite"
            )
        return result

    # -- merge ----------------------------------------------------------------------------

    def run_merge(self, overwrite: bool, wait_timeout: float) -> None:
        lay, opts = self.layout, self.options
        current = _params(self.config, self.input, "merge")
        if not overwrite and lay.merge_done.is_done(0):
            info = lay.merge_done.read(0)
            _check_params(info.get("params", {}), current, "the label merge",
                          "rerun --phase merge with --overwrite")
            log.info("label merge: already done (%d objects)", info["num_objects"])
            self._set_merge_summary(info)
            return
        indices = range(self.grid.num_blocks)

        try:
            _wait_for(lambda: [f"block {i}" for i in lay.blocks_done.missing(indices)], wait_timeout,
                      f"the label blocks phase at {storage.redact_url(lay.work_url)!r}",
                      "run `catena-mito label --phase blocks` for every shard first")
        except PhaseError:
            if storage.exists(lay.url("plan.json"), opts):  # say which setting differs, if one does
                _check_params(storage.read_json(lay.url("plan.json"), opts),
                              _params(self.config, self.input, "blocks"), "the latest label blocks phase",
                              "run --phase blocks with this config first")
            raise

        lay.merge_done.clear()
        sizes, firsts, pairs = [], [], []
        offsets = [0]
        upper_cache: OrderedDict[int, BlockResult] = OrderedDict()
        _, gy, gx = self.grid.grid_shape
        reach = gy * gx + gx + 1  # the earliest block a forward neighbour can be behind
        offsets_d = forward_offsets(self.config.connectivity)
        for result in _ordered_prefetch(self._load_block, list(indices), SMALL_FILE_THREADS):
            i = len(sizes)
            block = self.grid.block(i)
            sizes.append(result.sizes)
            firsts.append(result.first)
            offsets.append(offsets[-1] + result.num_labels)
            if result.num_labels:
                for d in offsets_d:
                    prev_pos = tuple(p - c for p, c in zip(block.grid_position, d))
                    prev = self.grid.block_at(prev_pos)
                    if prev is None:
                        continue
                    a = upper_cache.get(prev.index)
                    if a is None or a.num_labels == 0:
                        continue
                    local = boundary_pairs(a, result, d, self.config.connectivity)
                    if len(local):
                        local[:, 0] += offsets[prev.index] - 1
                        local[:, 1] += offsets[i] - 1
                        pairs.append(local)
            # keep only what later blocks need: the upper planes of the last ``reach`` blocks
            result.lower = (None, None, None)  # type: ignore[assignment]
            upper_cache[i] = result
            while upper_cache and next(iter(upper_cache)) < i - reach:
                upper_cache.popitem(last=False)
        table = global_table(sizes, firsts, pairs, self.config.thres_small_instances)
        dtype = _final_dtype(table.num_objects)
        log.info("label merge: %d provisional labels, %d equivalences, %d objects kept, %d removed "
                 "(< %d voxels)", int(table.offsets[-1]), sum(len(p) for p in pairs),
                 table.num_objects, table.num_removed, self.config.thres_small_instances)

        def write_map(i: int) -> None:
            buffer = io.BytesIO()
            np.save(buffer, table.block_mapping(i, dtype))
            storage.write_bytes(lay.block_map(i), buffer.getvalue(), opts)

        _run_parallel(write_map, list(indices), SMALL_FILE_THREADS, "label merge: writing maps")
        if not lay.tiff:
            self._create_output(dtype, overwrite)
        lay.relabel_done.clear()  # earlier relabel results used other tables
        info = {"params": current, "num_objects": table.num_objects, "num_removed": table.num_removed,
                "dtype": str(dtype), "output_shape": list(self.out_shape)}
        lay.merge_done.mark_done(0, info)
        self._set_merge_summary(info)

    def _set_merge_summary(self, info: Mapping[str, Any]) -> None:
        self.summary.num_objects = int(info["num_objects"])
        self.summary.num_removed = int(info.get("num_removed", 0))
        self.summary.dtype = str(info["dtype"])
        self.summary.shape = tuple(self.out_shape)  # type: ignore[assignment]

    def _output_attrs(self) -> dict[str, Any]:
        res = self.input.resolution or (1.0, 1.0, 1.0)
        # an output voxel spans 1/factor input voxels; the corner (offset) stays put
        scaled = [r / f for r, f in zip(res, self.config.scale_factors)]
        return {**storage.spatial_attrs(scaled, self.input.offset), "catena_label": {
            "source": storage.redact_url(self.config.input_prediction_path),
            "thres_foreground": self.config.thres_foreground,
            "thres_small_instances": self.config.thres_small_instances,
            "connectivity": self.config.connectivity,
            "scale_factors": list(self.config.scale_factors),
        }}

    def check_existing_output(self) -> None:
        """Refuse an existing, incompatible output before any work (merge would, later)."""
        lay = self.layout
        if lay.tiff or not storage.array_exists(lay.output_url, self.options):
            return
        out = storage.open_array(lay.output_url, self.options)
        problems = []
        if tuple(out.shape) != tuple(self.out_shape):
            problems.append(f"shape {list(out.shape)} != {list(self.out_shape)}")
        if tuple(out.chunks) != tuple(self.config.chunk_size):
            problems.append(f"chunks {list(out.chunks)} != {list(self.config.chunk_size)}")
        if out.dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
            problems.append(f"dtype {out.dtype} is not uint32/uint64")
        if problems:
            raise StorageError(
                f"output {self.summary.output_url!r} exists and is incompatible ({'; '.join(problems)}); "
                "remove it or rerun with --overwrite"
            )

    def _create_output(self, dtype: np.dtype, overwrite: bool) -> None:
        # created here, by the one merge process, so relabel shards only ever open it
        storage.create_array(self.layout.output_url, self.out_shape, dtype, self.config.chunk_size,
                             overwrite=overwrite, attrs=self._output_attrs(), storage_options=self.options)

    # -- relabel --------------------------------------------------------------------------

    def run_relabel(self, shard_index: int, num_shards: int, overwrite: bool, wait_timeout: float) -> None:
        lay = self.layout
        if lay.tiff and num_shards != 1:
            raise ShardError(f"output_format 'tiff' is written by one process: relabel needs "
                             f"--num-shards 1, got {num_shards} (use output_format: zarr to shard)")
        _wait_for(
            lambda: [] if lay.merge_done.is_done(0) else ["the merge marker"],
            wait_timeout, f"the label merge at {storage.redact_url(lay.work_url)!r}",
            "run `catena-mito label --phase merge` first",
        )
        info = lay.merge_done.read(0)
        _check_params(info.get("params", {}), _params(self.config, self.input, "merge"),
                      "the label merge", "rerun --phase merge with --overwrite")
        self._set_merge_summary(info)
        dtype = np.dtype(info["dtype"])
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        if lay.tiff:
            self._relabel_tiff(dtype, overwrite)
            return
        out = storage.open_array(lay.output_url, self.options, mode="r+")
        if tuple(out.shape) != tuple(self.out_shape) or out.dtype != dtype:
            raise StorageError(f"output {self.summary.output_url!r} is {list(out.shape)} {out.dtype}, "
                               f"expected {list(self.out_shape)} {dtype}; rerun --phase merge with --overwrite")
        mine = select_shard(self.out_grid.blocks(), shard_index, num_shards)
        done = set() if overwrite else lay.relabel_done.done_indices()
        todo = [b for b in mine if b.index not in done]
        self.summary.blocks_skipped += len(mine) - len(todo)
        if overwrite and todo:
            lay.relabel_done.clear([b.index for b in todo])

        def one(block: Block) -> None:
            data = self._relabel_block(block.write_roi, dtype)
            out[block.write_roi.to_slices()] = data
            lay.relabel_done.mark_done(block.index)  # only after the data

        log.info("label relabel: shard %d/%d, %d blocks (%d already done)",
                 shard_index, num_shards, len(mine), len(mine) - len(todo))
        _run_parallel(one, todo, self.threads, f"label relabel {shard_index}/{num_shards}")
        self.summary.blocks_computed += len(todo)

    def _relabel_tiff(self, dtype: np.dtype, overwrite: bool) -> None:
        lay = self.layout
        if not overwrite and lay.relabel_done.is_done(0) and storage.exists(lay.output_url, self.options):
            log.info("label relabel: %s already written", self.summary.output_url)
            return
        _check_tiff_fits(self.out_shape, dtype, lay.output_url)
        volume = np.zeros(self.out_shape, dtype)

        def one(block: Block) -> None:
            volume[block.write_roi.to_slices()] = self._relabel_block(block.write_roi, dtype)

        _run_parallel(one, self.out_grid.blocks(), self.threads, "label relabel (tiff)")
        attrs = self._output_attrs()
        storage.write_tiff(lay.output_url, volume, attrs["resolution"], attrs["offset"], self.options)
        lay.relabel_done.mark_done(0)
        self.summary.blocks_computed += self.out_grid.num_blocks

    def _map(self, index: int) -> np.ndarray:
        table = self._maps.get(index)
        if table is None:
            data = storage.read_bytes(self.layout.block_map(index), self.options)
            table = np.load(io.BytesIO(data))
            self._maps[index] = table
            while len(self._maps) > 64:  # the tables of recent blocks (scaled outputs reuse them)
                self._maps.popitem(last=False)
        return table

    def _source_labels(self, block: Block, table: np.ndarray) -> np.ndarray:
        """Block ``block``'s provisional labels, recomputed exactly as in the blocks phase."""
        mask = self.input.foreground(block.write_roi, self.config.thres_foreground)
        labels, n = connected_components(mask, self.config.connectivity)
        if n != len(table) - 1:
            raise DataError(
                f"input_prediction_path {self.input.shown!r} changed since the blocks phase: "
                f"block {block.index} now has {n} components, {len(table) - 1} before; "
                "rerun every phase with --overwrite"
            )
        return labels

    def _relabel_block(self, roi: Roi, dtype: np.dtype) -> np.ndarray:
        """Final labels of the output region ``roi`` (output voxels, z y x)."""
        if not self.scaled:
            block = self.grid.block_at([b // c for b, c in zip(roi.begin, self.config.chunk_size)])
            assert block is not None and block.write_roi == roi
            table = self._map(block.index)
            if not table.any():  # no kept object here: skip reading the input
                return np.zeros(roi.shape, dtype)
            return table[self._source_labels(block, table)]
        src = [source_indices(b, e, f, s) for b, e, f, s in
               zip(roi.begin, roi.end, self.config.scale_factors, self.input.shape)]
        out = np.zeros(roi.shape, dtype)
        first_pos = [int(ix[0]) // c for ix, c in zip(src, self.config.chunk_size)]
        last_pos = [int(ix[-1]) // c for ix, c in zip(src, self.config.chunk_size)]
        for gz in range(first_pos[0], last_pos[0] + 1):
            for gy in range(first_pos[1], last_pos[1] + 1):
                for gx in range(first_pos[2], last_pos[2] + 1):
                    block = self.grid.block_at((gz, gy, gx))
                    table = self._map(block.index)
                    if not table.any():
                        continue
                    b0, b1 = block.write_roi.begin, block.write_roi.end
                    # source indices are sorted: each block holds one contiguous run of them
                    runs = [slice(int(np.searchsorted(ix, lo)), int(np.searchsorted(ix, hi)))
                            for ix, lo, hi in zip(src, b0, b1)]
                    if any(r.stop <= r.start for r in runs):
                        continue
                    labels = self._source_labels(block, table)
                    sub = labels[np.ix_(*(ix[r] - lo for ix, r, lo in zip(src, runs, b0)))]
                    out[tuple(runs)] = table[sub]
        return out

    # -- clean ----------------------------------------------------------------------------

    def run_clean(self) -> None:
        lay, opts = self.layout, self.options
        if not lay.merge_done.is_done(0):
            raise PhaseError(f"the label merge at {storage.redact_url(lay.work_url)!r} is not complete; "
                             "nothing to clean (run the merge and relabel phases first)")
        info = lay.merge_done.read(0)
        _check_params(info.get("params", {}), _params(self.config, self.input, "merge"),
                      "the label merge", "rerun --phase merge with --overwrite")
        expected = [0] if lay.tiff else list(range(self.out_grid.num_blocks))
        missing = lay.relabel_done.missing(expected)
        if missing:
            raise PhaseError(f"the label relabel phase is not complete: {len(missing)} of "
                             f"{len(expected)} blocks missing (first: {missing[:5]}); run it first")
        record = {"params": info["params"], "num_objects": info["num_objects"],
                  "num_removed": info.get("num_removed"), "dtype": info["dtype"],
                  "output": storage.redact_url(lay.output_url), "output_shape": list(self.out_shape),
                  "time": time.time()}
        storage.write_json(lay.url("complete.json"), record, opts)  # first, so a crash below is harmless
        for part in ("blocks", "merge", "relabel", "plan.json"):
            storage.remove(lay.url(part), opts)
        self._set_merge_summary(info)
        log.info("label: cleaned the intermediate files under %s", storage.redact_url(lay.work_url))


def label(
    config: LabelConfig,
    phase: str = "all",
    shard_index: int = 0,
    num_shards: int = 1,
    overwrite: bool = False,
    wait_timeout: float = 0.0,
    *,
    num_threads: int | None = None,
) -> LabelSummary:
    """Run ``phase`` of the label task of ``config`` (see the module docstring).

    ``all`` runs blocks, merge, relabel and clean in this process (one shard only);
    ``blocks`` and ``relabel`` process shard ``shard_index`` of ``num_shards``; ``merge``
    and ``clean`` are single-process. ``wait_timeout`` (seconds): merge polls for every
    block's done marker and relabel for the merge marker for up to this long; with 0 a
    missing previous phase is an immediate :class:`PhaseError`. ``overwrite`` recomputes
    what is marked done and replaces an incompatible output. ``num_threads`` (default: the
    CPU count, at most 8) overlaps block I/O with compute.
    """
    if phase not in PHASES:
        raise ConfigError(f"phase: expected one of {', '.join(PHASES)}, got {phase!r}")
    check_shard(shard_index, num_shards)
    if phase == "all" and num_shards != 1:
        raise ShardError(
            f"--phase all runs every block in one process: --num-shards must be 1, got {num_shards} "
            "(shard --phase blocks and --phase relabel instead)"
        )
    if phase in ("merge", "clean"):  # one process: a shard count from the environment is moot
        shard_index, num_shards = 0, 1
    threads = num_threads or default_threads()
    task = _LabelTask(config, threads)
    task.summary.phase = phase
    task.save_config()
    if task.already_complete(overwrite):
        return task.summary
    if not overwrite and phase in ("all", "blocks", "merge"):
        task.check_existing_output()
    started = time.perf_counter()
    if phase in ("all", "blocks"):
        task.run_blocks(shard_index, num_shards, overwrite)
    if phase in ("all", "merge"):
        task.run_merge(overwrite, wait_timeout)
    if phase in ("all", "relabel"):
        task.run_relabel(shard_index, num_shards, overwrite, wait_timeout)
    if phase in ("all", "clean"):
        task.run_clean()
    log.info("label %s: done in %.1f s (%s)", phase, time.perf_counter() - started, task.summary.output_url)
    return task.summary
