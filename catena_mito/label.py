"""``catena-mito label``: probabilities → globally numbered mitochondria instances.

Threshold, connected components and small-instance removal, computed block by block and
stitched exactly, so the output equals one connected-components pass over the whole
binarised volume, with the same ids, for any block shape and any number of shards
(DESIGN invariant 1). Three phases (see :mod:`catena_mito.stitch` for the method)::

    blocks   (sharded)  per block of ``chunk_size``: foreground = probability > threshold,
                        provisional connected components, their sizes, first voxels and
                        the block's six boundary planes  →  W/runs/<id>/blocks/data/<i>.npz
    merge    (1 proc.)  union-find over the labels that touch across block faces, edges
                        and corners; global sizes; objects smaller than
                        ``thres_small_instances`` removed; final ids 1..K in order of each
                        object's first voxel (C order)  →  W/runs/<id>/merge/maps/<i>.npy
    relabel  (sharded)  per output block: recompute the block's provisional labels (the
                        same deterministic cc3d call, cheaper than storing and re-reading a
                        label volume) and map them to final ids  →  the output array
    clean    (1 proc.)  after relabel: remove the intermediate files, keep the records

``--phase all`` runs the four in one process. The merge state is small files, never a
volume: per block a few KB (label counts, first voxels, boundary planes) and a lookup table.
Every phase runs through the one block runner (:mod:`catena_mito.blockwise.runner`).

**Seeded instance modes** (``instance_mode: contour | distance``, the rules in
:mod:`catena_mito.instances`): the same blocks and merge number the *seeds* (seeds under
``thres_small_seeds`` voxels dropped), then two more phases::

    blocks   (sharded)  as above, on the seeds; also writes the block's provisional seed
                        labels and its foreground (``n + 1`` = foreground outside seeds, in
                        the smallest dtype) → W/runs/<id>/blocks/labels/<i>.arrays, and its
                        six face slabs, ``min(grow_distance, extent)`` thick → .../faces/<i>
    merge    (1 proc.)  as above: seed ids 1..S by first voxel
    grow     (sharded)  per block: read its own labels and the face slabs of the blocks
                        around (a halo of ``grow_distance`` voxels reaches no further), map
                        each block's provisional labels to seed ids, grow (exact with that
                        halo), write the block's grown ids (block-local ids and their seed
                        ids) → W/runs/<id>/grow/grown/<i>.arrays, and its per-seed counts;
                        with ``unseeded_components``, also the provisional connected
                        components of the block's foreground left at 0 by the growth (local
                        ids after the seeds' in the same file), their summary for the
                        stitching (sizes, first voxels, boundary planes) and which of them
                        touch a grown voxel → .../unseeded/<i>
    sizes    (1 proc.)  sum the counts; grown objects under ``thres_small_instances``
                        removed; final ids 1..K in seed order → W/runs/<id>/sizes/table.npy;
                        unseeded components stitched across blocks exactly as the merge
                        stitches (union-find over the boundary planes, global sizes); those
                        with a part touching a grown voxel (the far end of a seeded object)
                        or under ``thres_small_instances`` removed, the rest K+1..K+U by
                        first voxel → W/runs/<id>/sizes/maps/<i>.npy
    relabel  (sharded)  map the grown ids of each block → the output array

A foreground component holds no grown voxel exactly when no part of ``foreground and
grown == 0`` in it touches a grown voxel. Both are exact per block after growth, except
that "touches" looks one voxel across the block's faces: with ``unseeded_components``
the grow phase reads a halo of ``grow_distance + 1`` voxels (face slabs one voxel
thicker), which makes the grown ids on that ring exact as well; the stitching of
:mod:`catena_mito.stitch` joins the parts across blocks and drops an object with any
touching part.

Distance seeds read a halo of ``ceil(seed_distance / resolution)`` voxels in the blocks
phase. Connected-components runs keep their run description (and run ids) unchanged.

Where things go (``W = <output_instance_dir>/.catena/label/<output_filename>``, the run
records of :mod:`catena_mito.blockwise.runs`)::

    <output_instance_dir>/<output_filename>     the output (Zarr array), or
    <output_instance_dir>/<output_filename>.tif the output (TIFF, single-process gather)
    W/run.json                                  the run that owns the output
    W/config.yaml                               the resolved config (secrets redacted)
    W/runs/<id>/<phase>/done/                   done markers of each phase
    W/runs/<id>/complete.json                   written when relabel is complete

The run id covers the settings, the block plan and the input's identity (for a
prediction written by ``predict``: its run id and completeness). A phase of another run
is refused with the setting that changed (``--overwrite`` in the first phase replaces
it); an incomplete or stale input is refused unless ``--allow-incomplete``. A completed
run whose output was deleted is recomputed. Two processes running ``merge``, ``clean``
or ``--phase all`` on one output at once: the second is refused (a lease with a
heartbeat, see :class:`catena_mito.blockwise.runs.Lease`).

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
import itertools
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from catena_mito import storage
from catena_mito.blockwise.geometry import Block, BlockGrid, Roi, check_shard
from catena_mito.blockwise.identity import RUN_ATTR, foreign_identity
from catena_mito.blockwise.runner import BlockSteps, run_phase
from catena_mito.blockwise.runs import (
    Lease,
    RunSpec,
    RunStore,
    check_input,
    describe_inputs,
    relative_url,
)
from catena_mito.config import LabelConfig, save_resolved_config
from catena_mito.errors import (
    CatenaError,
    ConfigError,
    DataError,
    PhaseError,
    RunMismatchError,
    ShardError,
    StorageError,
)
from catena_mito.instances.components import connected_components
from catena_mito.instances.grow import grow
from catena_mito.instances.packed import Packed, pack, smallest_uint
from catena_mito.instances.seeds import distance_halo
from catena_mito.instances.settings import (
    CONNECTED_COMPONENTS,
    CONTOUR,
    DISTANCE,
    InstanceSettings,
    check_unused_fields,
    resolve_mode,
)
from catena_mito.instances.threshold import foreground
from catena_mito.instances.whole import seeds_and_mask
from catena_mito.stitch import BlockResult, boundary_pairs, forward_offsets, global_table
from catena_mito.targets import FOREGROUND, TARGET_ATTR, prediction_url

log = logging.getLogger(__name__)

PHASES = ("all", "blocks", "merge", "grow", "sizes", "relabel", "clean")
#: Phases only the seeded modes (contour, distance) have; elsewhere they do nothing.
INSTANCE_PHASES = ("grow", "sizes")
#: Phases that run as one process (the others are sharded, except ``all``).
SINGLE_PROCESS_PHASES = ("merge", "sizes", "clean")
TIFF_SUFFIXES = (".tif", ".tiff")
#: Environment variable that sets the most bytes a TIFF output may gather in memory.
TIFF_LIMIT_ENV = "CATENA_TIFF_MAX_BYTES"
#: Without that variable, a TIFF output may use this fraction of the available memory.
TIFF_MEMORY_FRACTION = 0.5
#: Bumped whenever a change here or in :mod:`catena_mito.stitch` changes the output.
ALGORITHM_VERSION = 1
#: Bumped whenever a change in :mod:`catena_mito.instances` changes a seeded mode's output
#: (connected-components runs do not carry it, so their run ids stay as they were).
INSTANCE_ALGORITHM_VERSION = 2

__all__ = ["PhaseError", "OutputTooLargeError", "label", "LabelSummary"]


class OutputTooLargeError(ConfigError):
    """``output_format: tiff`` was asked for a volume that does not fit in memory."""



# --- the input --------------------------------------------------------------------------------


class _Input:
    """A probability volume, a Zarr array (read block-wise) or a TIFF (read whole).

    ``field`` names the config field it comes from, in every message about it.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any], allow_incomplete: bool = False,
                 field: str = "input_prediction_path"):
        self.url = url
        self.shown = storage.redact_url(url)
        self.field = field
        if url.lower().rstrip("/").endswith(TIFF_SUFFIXES):
            data, meta = storage.read_tiff(url, storage_options)
            self._data: Any = data
            self.attrs: dict[str, Any] = dict(meta)
            self.resolution = tuple(float(r) for r in meta["resolution"]) if "resolution" in meta else None
            self.offset = tuple(float(o) for o in meta.get("offset", (0.0, 0.0, 0.0)))
            # a TIFF is read whole anyway: its identity can be its content
            self.identity = {**foreign_identity(data.shape, data.dtype, None, meta),
                             "content": _digest(np.ascontiguousarray(data))}
        else:
            self._data = storage.open_volume(url, storage_options)
            self.attrs = dict(self._data.attrs)
            self.resolution, self.offset = storage.read_spatial(self._data)
            self.identity = check_input(self._data, url, f"{field} {self.shown!r}",
                                        storage_options, allow_incomplete=allow_incomplete)
        shape = tuple(int(s) for s in self._data.shape)
        if len(shape) != 3:
            raise DataError(
                f"{field} {self.shown!r} has {len(shape)} dimensions {list(shape)}, "
                "expected 3 (z, y, x)"
            )
        if 0 in shape:
            raise DataError(f"{field} {self.shown!r} is empty (shape {list(shape)})")
        self.shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        self.dtype = np.dtype(self._data.dtype)
        foreground(np.zeros(1, self.dtype), 0.5, f"{field} {self.shown!r}")  # dtype check

    def where(self, roi: Roi) -> str:
        return f"{self.field} {self.shown!r} at {_roi_text(roi)}"

    def read(self, roi: Roi) -> np.ndarray:
        try:
            return np.asarray(self._data[roi.to_slices()])
        except CatenaError:
            raise
        except Exception as e:
            raise StorageError(f"cannot read {self.shown!r} at {_roi_text(roi)}: {e}") from e

    def foreground(self, roi: Roi, threshold: float) -> np.ndarray:
        return foreground(self.read(roi), threshold, self.where(roi))


def _roi_text(roi: Roi) -> str:
    return "[" + ", ".join(f"{b}:{e}" for b, e in zip(roi.begin, roi.end)) + "]"



def _digest(data: np.ndarray) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(memoryview(data).cast("B")).hexdigest()


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


# --- helpers ----------------------------------------------------------------------------------


#: Threads for small-file reads and writes in the merge (latency-bound on object stores).
SMALL_FILE_THREADS = 16


def default_threads() -> int:
    """Threads per process: block I/O and decompression overlap with compute; sized from
    the CPUs this process may use (affinity, cgroup quota), at most 8."""
    from catena_mito.blockwise.cpus import available_cpus

    return max(1, min(8, available_cpus()))


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
    from catena_mito.blockwise import signals

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
        signals.raise_if_requested("while waiting")
        time.sleep(min(left, 1.0))  # one listing a second is cheap, even on S3


#: numpy parses .npy headers with ast.literal_eval, which CPython 3.11 (before 3.11.8,
#: gh-106905) can break with "SystemError: AST constructor recursion depth mismatch" when
#: threads call it at once; the reads stay parallel, only the parsing is serialised.
_NPY_HEADER_LOCK = threading.Lock()

_LATER_PHASE_FIX = "run --phase blocks with this config first (with --overwrite to replace the other run)"


def _single_block() -> Block:
    """The one "block" of a single-process phase (the merge, a TIFF gather)."""
    return BlockGrid((1, 1, 1), (1, 1, 1)).block(0)


# --- the task -------------------------------------------------------------------------------


@dataclass
class LabelSummary:
    """What a call to :func:`label` did."""

    phase: str
    output_url: str
    run_id: str = ""
    blocks_computed: int = 0
    blocks_skipped: int = 0
    num_objects: int | None = None
    num_removed: int | None = None
    dtype: str | None = None
    shape: tuple[int, int, int] | None = None
    plan: dict | None = None


class _LabelTask:
    def __init__(self, config: LabelConfig, threads: int, allow_incomplete: bool = False):
        self.config = config
        self.options = dict(config.storage_options)
        self.threads = threads
        c = config
        self.tiff = c.output_format == "tiff"
        name = c.output_filename
        if self.tiff and not name.lower().endswith(TIFF_SUFFIXES):
            self.output_url = storage.join_url(c.output_instance_dir, name + ".tif")
        else:
            self.output_url = storage.join_url(c.output_instance_dir, name)
        self.work_url = storage.join_url(c.output_instance_dir, ".catena", "label", name.strip("/"))
        self.input = _Input(config.input_prediction_path, self.options, allow_incomplete)
        self._open_instance_inputs(allow_incomplete)
        self.grid = BlockGrid(self.input.shape, config.chunk_size)
        self.out_shape = output_shape(self.input.shape, config.scale_factors)
        self.scaled = tuple(self.out_shape) != tuple(self.input.shape)
        self.out_grid = BlockGrid(self.out_shape, config.chunk_size)
        self.spec = self._spec()
        self.store = RunStore(self.work_url, self.options, shown=f"output {storage.redact_url(self.output_url)!r}",
                              outputs=() if self.tiff else (self.output_url,))
        self.summary = LabelSummary("", storage.redact_url(self.output_url), run_id=self.spec.run_id)
        if self.tiff:  # refuse before any work (the final dtype is at least uint32)
            _check_tiff_fits(self.out_shape, np.uint32, self.output_url)

    def _open_instance_inputs(self, allow_incomplete: bool) -> None:
        """Resolve the instance mode, open the contour input and check what the mode reads."""
        c = self.config
        self.mode = resolve_mode(c.instance_mode, c.input_contour_path is not None, self.input.attrs)
        check_unused_fields(c, self.mode, c.instance_mode)
        self.instances = self.mode != CONNECTED_COMPONENTS
        self.contour: _Input | None = None
        target = self.input.attrs.get(TARGET_ATTR)
        if self.instances and target not in (None, FOREGROUND):
            raise DataError(f"input_prediction_path {self.input.shown!r} holds the {target!r} target "
                            f"(attribute {TARGET_ATTR}), expected {FOREGROUND!r}")
        if self.mode == CONTOUR:
            url = c.input_contour_path or prediction_url(c.input_prediction_path, CONTOUR)
            if not url.lower().rstrip("/").endswith(TIFF_SUFFIXES) and not storage.array_exists(url, self.options):
                how = "" if c.input_contour_path else " (the default beside input_prediction_path)"
                raise DataError(f"instance_mode contour needs contour probabilities: no Zarr array at "
                                f"input_contour_path {storage.redact_url(url)!r}{how}; predict with a "
                                "contour target, set input_contour_path, or choose another instance_mode")
            self.contour = _Input(url, self.options, allow_incomplete, field="input_contour_path")
            if self.contour.shape != self.input.shape:
                raise DataError(f"input_contour_path {self.contour.shown!r} is {list(self.contour.shape)}, "
                                f"the foreground {list(self.input.shape)}; they must be the same shape")
            target = self.contour.attrs.get(TARGET_ATTR)
            if target not in (None, CONTOUR):
                raise DataError(f"input_contour_path {self.contour.shown!r} holds the {target!r} target "
                                f"(attribute {TARGET_ATTR}), expected {CONTOUR!r}")
        self.settings = InstanceSettings.from_config(c, self.mode, self.input.resolution if self.mode == DISTANCE
                                                     else None)
        # halo of the distance seeds (voxels per axis): background further away cannot matter
        self.seed_halo = (distance_halo(c.seed_distance, self.settings.resolution) if self.mode == DISTANCE
                          else (0, 0, 0))

    def _spec(self) -> RunSpec:
        c = self.config
        if self.instances:
            return self._instance_spec()
        description = {
            "algorithm": ALGORITHM_VERSION,
            "inputs": describe_inputs({"prediction": (c.input_prediction_path, self.input.identity)}),
            "settings": {
                "thres_foreground": float(c.thres_foreground), "connectivity": int(c.connectivity),
                "thres_small_instances": int(c.thres_small_instances), "remove_small_mode": c.remove_small_mode,
                "scale_factors": [float(f) for f in c.scale_factors],
            },
            "plan": {"shape": list(self.input.shape), "chunk_size": list(c.chunk_size),
                     "output_shape": list(self.out_shape), "output_format": c.output_format},
        }
        relabel_blocks = 1 if self.tiff else self.out_grid.num_blocks
        return RunSpec("label", description,
                       (("blocks", self.grid.num_blocks), ("merge", 1), ("relabel", relabel_blocks)))

    def _instance_spec(self) -> RunSpec:
        """The run of a seeded mode: its own settings and inputs, and three more phases.

        Connected-components runs keep the description above unchanged, so their run ids
        (and outputs already labelled) stay what they were.
        """
        c = self.config
        inputs = {"prediction": (c.input_prediction_path, self.input.identity)}
        if self.contour is not None:
            inputs["contour"] = (self.contour.url, self.contour.identity)
        description = {
            "algorithm": ALGORITHM_VERSION,
            "instance_algorithm": INSTANCE_ALGORITHM_VERSION,
            "inputs": describe_inputs(inputs),
            "settings": {
                "thres_foreground": float(c.thres_foreground), "connectivity": int(c.connectivity),
                "thres_small_instances": int(c.thres_small_instances), "remove_small_mode": c.remove_small_mode,
                "scale_factors": [float(f) for f in c.scale_factors],
                "instances": self.settings.description(),
            },
            "plan": {"shape": list(self.input.shape), "chunk_size": list(c.chunk_size),
                     "output_shape": list(self.out_shape), "output_format": c.output_format},
        }
        relabel_blocks = 1 if self.tiff else self.out_grid.num_blocks
        n = self.grid.num_blocks
        return RunSpec("label", description, (("blocks", n), ("merge", 1), ("grow", n), ("sizes", 1),
                                               ("relabel", relabel_blocks)))

    # -- bookkeeping --------------------------------------------------------------------

    def url(self, *parts: str) -> str:
        return self.store.run_url(self.spec.run_id, *parts)

    def block_data(self, i: int) -> str:
        return self.url("blocks", "data", f"{i}.npz")

    def block_map(self, i: int) -> str:
        return self.url("merge", "maps", f"{i}.npy")

    def save_config(self) -> None:
        save_resolved_config(self.config, self.store.url("config.yaml"), self.options)

    def claim(self, overwrite: bool) -> None:
        """The first phase (blocks, or all) claims the output for this run."""
        self.store.claim(self.spec, overwrite=overwrite, fix="rerun with --overwrite to recompute it")

    def check_owner(self) -> None:
        """A later phase runs only for the run that owns the output."""
        self.store.claim(self.spec, overwrite=False, may_claim=False, fix=_LATER_PHASE_FIX)

    def wait_for(self, missing: Callable[[], list[str]], timeout: float, what: str, fix: str) -> None:
        """Wait for a previous phase of this run, then check this run owns the output.

        Phases of one run may start together (Kubernetes Jobs): a later phase waits for
        its own run's markers, whoever owns the output meanwhile; if they never come and
        another run owns the output, that is the error to report.
        """
        try:
            _wait_for(missing, timeout, what, fix)
        except PhaseError:
            claim = self.store.read_claim()
            if claim is not None and claim.get("run_id") != self.spec.run_id:
                raise RunMismatchError(self.store.mismatch_message(claim, self.spec, _LATER_PHASE_FIX)) from None
            raise
        self.check_owner()

    def _output_current(self) -> bool:
        if self.tiff:
            return storage.exists(self.output_url, self.options)
        if not storage.array_exists(self.output_url, self.options):
            return False
        run = dict(storage.open_array(self.output_url, self.options).attrs).get(RUN_ATTR) or {}
        return run.get("run_id") == self.spec.run_id

    def already_complete(self, overwrite: bool) -> bool:
        """True when this run is complete and its output is there (nothing to do)."""
        claim = self.store.read_claim()
        if claim is None or claim.get("run_id") != self.spec.run_id:
            return False
        record = self.store.read_complete(self.spec.run_id)
        if record is None:
            return False
        if not self._output_current():
            log.warning("%s: run %s was complete but its output is missing or was replaced; "
                        "recomputing from the start", self.summary.output_url, self.spec.run_id)
            storage.remove(self.store.run_url(self.spec.run_id), self.options)
            return False
        if overwrite:  # the phases recompute what they are asked to; the rest stays
            storage.remove(self.store.run_url(self.spec.run_id, "complete.json"), self.options, recursive=False)
            return False
        log.info("%s is complete (run %s, %s objects); nothing to do (--overwrite recomputes)",
                 self.summary.output_url, self.spec.run_id, record.get("num_objects"))
        self._set_merge_summary(record)
        return True

    def check_existing_output(self) -> None:
        """Refuse an existing, incompatible output before any work (merge would, later)."""
        if self.tiff or not storage.array_exists(self.output_url, self.options):
            return
        out = storage.open_array(self.output_url, self.options)
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

    def _run(self, phase: str, blocks: Sequence[Block], steps: BlockSteps, shard_index: int, num_shards: int,
             overwrite: bool, desc: str, merge_info: Mapping[str, Any] | None = None) -> None:
        result = run_phase(self.store, self.spec, phase, blocks, steps, shard_index=shard_index,
                           num_shards=num_shards, overwrite=overwrite, threads=self.threads, desc=desc,
                           complete_info=self._complete_info(merge_info) if merge_info else None)
        self.summary.blocks_computed += result.blocks_computed
        self.summary.blocks_skipped += result.blocks_skipped

    # -- blocks ---------------------------------------------------------------------------

    def _block_mask(self, roi: Roi) -> np.ndarray:
        """What the blocks phase numbers in ``roi``: the foreground, or the mode's seeds.

        Distance seeds read ``roi`` grown by their halo (clipped to the volume) and are cut
        back to ``roi``; contour seeds are pointwise.
        """
        if not self.instances:
            return self.input.foreground(roi, self.config.thres_foreground)
        return self._block_masks(roi)[0]

    def _block_masks(self, roi: Roi) -> tuple[np.ndarray, np.ndarray]:
        """The seeds and the foreground mask of ``roi`` in a seeded mode."""
        region = roi.grow(self.seed_halo).intersect(self.grid.volume_roi)
        fg = self.input.read(region)
        contour = self.contour.read(region) if self.contour is not None else None
        seeds, mask = seeds_and_mask(fg, contour, self.settings, self.input.where(region))
        inner = roi.to_slices(region)
        return np.ascontiguousarray(seeds[inner]), np.ascontiguousarray(mask[inner])

    def run_blocks(self, shard_index: int, num_shards: int, overwrite: bool) -> None:
        # seeded modes also keep each block's provisional seed labels and its foreground,
        # and their face slabs for the grow halo (see _pack_provisional)
        seeded = self.instances

        def compute(block: Block, _: Any) -> tuple[bytes, int, tuple[bytes, bytes | None] | None]:
            if not seeded:
                labels, n = connected_components(self._block_mask(block.write_roi), self.config.connectivity)
                packed = None
            else:
                seeds, mask = self._block_masks(block.write_roi)
                labels, n = connected_components(seeds, self.config.connectivity)
                packed = self._pack_provisional(labels, n, mask)
            result = BlockResult.from_labels(labels, n, block.write_roi.offset, self.input.shape)
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **result.to_npz_dict())
            return buffer.getvalue(), n, packed

        def write(block: Block, out: tuple[bytes, int, tuple[bytes, bytes | None] | None]) -> dict:
            if out[2] is not None:
                storage.write_bytes(self._labels_url(block.index), out[2][0], self.options, sync=False)
                if out[2][1] is not None:
                    storage.write_bytes(self._faces_url(block.index), out[2][1], self.options, sync=False)
            storage.write_bytes(self.block_data(block.index), out[0], self.options)
            return {"labels": out[1]}

        self._run("blocks", self.grid.blocks(), BlockSteps(compute=compute, write=write, parallel=True),
                  shard_index, num_shards, overwrite, f"label blocks {shard_index}/{num_shards}")

    def _load_block(self, index: int, url: str | None = None) -> BlockResult:
        """Block ``index``'s :class:`BlockResult` from the blocks phase (or from ``url``: the
        unseeded components of the grow phase)."""
        fix = "rerun --phase blocks with --overwrite" if url is None else "rerun every phase with --overwrite"
        url = url or self.block_data(index)
        data = storage.read_bytes(url, self.options)
        with _NPY_HEADER_LOCK, np.load(io.BytesIO(data)) as npz:
            result = BlockResult.from_npz_dict(npz)
        expected = self.grid.block(index).write_roi
        if result.offset != expected.offset or result.shape != expected.shape:
            raise DataError(
                f"{storage.redact_url(url)!r} describes block "
                f"{result.offset}+{result.shape}, expected {expected.offset}+{expected.shape}; {fix}"
            )
        return result

    # -- merge ----------------------------------------------------------------------------

    def run_merge(self, overwrite: bool, wait_timeout: float) -> None:
        markers = self.store.markers(self.spec.run_id, "blocks")
        indices = range(self.grid.num_blocks)
        self.wait_for(lambda: [f"block {i}" for i in markers.missing(indices)], wait_timeout,
                  f"the label blocks phase of run {self.spec.run_id} at {self.store.shown}",
                  "run `catena-mito label --phase blocks` for every shard first")
        with Lease(self.store, self.spec.run_id, "merge", f"the label merge of {self.store.shown}"):
            steps = BlockSteps(compute=lambda _b, _d: self._merge_tables(), write=self._write_merge)
            self._run("merge", [_single_block()], steps, 0, 1, overwrite, "label merge")
        if not self.instances:  # a seeded mode's object count is known after the sizes phase
            self._set_merge_summary(self.store.markers(self.spec.run_id, "merge").read(0))

    def _merge_tables(self) -> Any:
        # seeded modes number seeds here: small seeds go, small grown objects go after growing
        min_size = self.settings.thres_small_seeds if self.instances else self.config.thres_small_instances
        table, num_pairs = self._stitch(self._load_block, min_size)
        log.info("label merge: %d provisional labels, %d equivalences, %d %s kept, %d removed "
                 "(< %d voxels)", int(table.offsets[-1]), num_pairs,
                 table.num_objects, "seeds" if self.instances else "objects", table.num_removed, min_size)
        return table

    def _stitch(self, load: Callable[[int], BlockResult], min_size: int) -> tuple[Any, int]:
        """The global table of the provisional labels of every block (``load(i)`` gives block
        ``i``'s :class:`BlockResult`), and the number of equivalences across blocks; objects
        with a part marked ``drop`` are removed (the unseeded components touching a grown
        object)."""
        sizes, firsts, pairs, drops = [], [], [], []
        offsets = [0]
        upper_cache: OrderedDict[int, BlockResult] = OrderedDict()
        _, gy, gx = self.grid.grid_shape
        reach = gy * gx + gx + 1  # the earliest block a forward neighbour can be behind
        offsets_d = forward_offsets(self.config.connectivity)
        indices = list(range(self.grid.num_blocks))
        for result in _ordered_prefetch(load, indices, SMALL_FILE_THREADS):
            i = len(sizes)
            block = self.grid.block(i)
            sizes.append(result.sizes)
            firsts.append(result.first)
            drops.append(result.drop if result.drop is not None else np.zeros(result.num_labels, bool))
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
        return global_table(sizes, firsts, pairs, min_size, drops), sum(len(p) for p in pairs)

    def _write_merge(self, _block: Block, table: Any) -> dict:
        dtype = _final_dtype(table.num_objects)

        def write_map(i: int) -> None:
            buffer = io.BytesIO()
            np.save(buffer, table.block_mapping(i, dtype))
            storage.write_bytes(self.block_map(i), buffer.getvalue(), self.options)

        with ThreadPoolExecutor(SMALL_FILE_THREADS) as pool:
            list(pool.map(write_map, range(self.grid.num_blocks)))
        if not self.instances and not self.tiff:  # seeded modes: after the sizes phase
            self._create_output(dtype)
        return {"num_objects": table.num_objects, "num_removed": table.num_removed,
                "dtype": str(dtype), "output_shape": list(self.out_shape)}

    # -- grow, sizes (the seeded modes) ---------------------------------------------------

    # Per-block files of the seeded phases (see :mod:`catena_mito.instances.packed`):
    #   blocks/labels/<i>  the block's provisional seed labels ``1..n``, ``n + 1`` where the
    #                      foreground has no seed, 0 elsewhere (the smallest dtype that fits)
    #   blocks/faces/<i>   its face slabs, ``min(grow_distance, extent)`` thick: all that the
    #                      grow halo of another block can reach of it
    #   grow/grown/<i>     the grown seed ids of the block, as ``ids[local]``; with
    #                      ``unseeded_components``, local ids ``len(ids) + j - 1`` are the
    #                      block's provisional unseeded component ``j`` (``meta["unseeded"]``)
    #   grow/counts/<i>    the voxels of each grown seed id in the block (for the sizes phase)
    #   grow/unseeded/<i>  the block's unseeded components as a BlockResult (the sizes phase
    #                      stitches them as the merge stitches seeds)
    #   sizes/maps/<i>     final id of each unseeded component of block ``i`` (0: removed)

    def _labels_url(self, i: int) -> str:
        return self.url("blocks", "labels", f"{i}.arrays")

    def _faces_url(self, i: int) -> str:
        return self.url("blocks", "faces", f"{i}.arrays")

    def _grown_url(self, i: int) -> str:
        return self.url("grow", "grown", f"{i}.arrays")

    def _unseeded_url(self, i: int) -> str:
        return self.url("grow", "unseeded", f"{i}.npz")

    def _unseeded_map_url(self, i: int) -> str:
        return self.url("sizes", "maps", f"{i}.npy")

    def _grow_halo(self) -> int:
        """Voxels per axis the grow phase reads around a block: ``grow_distance``, and one
        more with ``unseeded_components``, so that the grown ids on a one-voxel ring around
        the block are exact too (an unseeded component touching a grown voxel across the
        block's face is the far part of a seeded object, not an object of its own)."""
        return self.settings.grow_distance + (1 if self.settings.unseeded_components else 0)

    def _face_thickness(self, extent: int) -> int:
        return min(self._grow_halo(), extent)

    def _pack_provisional(self, labels: np.ndarray, n: int, mask: np.ndarray) -> tuple[bytes, bytes | None]:
        """The packed provisional labels of a block (mask-only voxels ``n + 1``), and its faces."""
        local = labels.astype(smallest_uint(n + 1))
        local[mask & (labels == 0)] = n + 1
        faces = {}
        for a, axis in enumerate("zyx"):
            ext = local.shape[a]
            t = self._face_thickness(ext)
            if 0 < t < ext:  # else a neighbour's halo reads the whole block (or nothing)
                faces[axis + "lo"] = local[(slice(None),) * a + (slice(0, t),)]
                faces[axis + "hi"] = local[(slice(None),) * a + (slice(ext - t, ext),)]
        meta = {"labels": int(n)}
        return pack({"labels": local}, meta), (pack(faces, meta) if faces else None)

    def _read_packed(self, url: str) -> Packed:
        where = storage.redact_url(url)
        try:
            return Packed(storage.read_bytes(url, self.options), where)
        except StorageError:
            if storage.exists(url, self.options):
                raise
            # e.g. a run begun by a version that kept these in Zarr arrays (same output)
            raise PhaseError(f"{where!r} is missing though its phase is marked done (removed, or written by "
                             "an older version of catena-mito); rerun every phase with --overwrite") from None
        except ValueError as e:
            raise DataError(f"{e}; rerun every phase with --overwrite") from e

    def _provisional_part(self, block: Block, reader: Block) -> tuple[Packed, str, Roi]:
        """Where the halo of ``reader`` finds ``block``'s provisional labels: the file, the
        array in it and the region (global voxels) that array covers."""
        if block.index == reader.index:
            return self._read_packed(self._labels_url(block.index)), "labels", block.write_roi
        roi = block.write_roi
        a = next(a for a in range(3) if block.grid_position[a] != reader.grid_position[a])
        ext = roi.shape[a]
        t = self._face_thickness(ext)
        if t >= ext:  # no face slabs along this axis: the whole block
            return self._read_packed(self._labels_url(block.index)), "labels", roi
        begin, end = list(roi.begin), list(roi.end)
        if block.grid_position[a] < reader.grid_position[a]:  # before the reader: its last planes
            side, begin[a] = "hi", end[a] - t
        else:
            side, end[a] = "lo", begin[a] + t
        return self._read_packed(self._faces_url(block.index)), "zyx"[a] + side, Roi.from_bounds(begin, end)

    def _region_seeds(self, reader: Block, region: Roi) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The seeds and the foreground in ``region`` (``reader``'s block and halo), from the
        provisional labels of every block it overlaps (only the face slabs of the blocks
        around are read), each mapped through that block's table from the merge.

        The seeds come as ranks ``r`` into ``ids`` (sorted global seed ids, ``ids[0] = 0``),
        in the smallest dtype that holds them: growing ranks gives the ranks of growing the
        global ids (the rule compares ids only by order), with less memory traffic.
        """
        c = self.config.chunk_size
        first = [b // s for b, s in zip(region.begin, c)]
        last = [(e - 1) // s for e, s in zip(region.end, c)]
        parts = []
        for pos in itertools.product(*(range(lo, hi + 1) for lo, hi in zip(first, last))):
            block = self.grid.block_at(pos)
            table = self._map(block.index)
            packed, name, covered = self._provisional_part(block, reader)
            if int(packed.meta.get("labels", -1)) != len(table) - 1:
                raise DataError(f"{packed.where} has {packed.meta.get('labels')} provisional labels, the merge "
                                f"{len(table) - 1}; rerun every phase with --overwrite")
            parts.append((block, table, packed, name, covered))
        ids = np.unique(np.concatenate([np.zeros(1, parts[0][1].dtype)] + [t for _, t, *_ in parts]))
        seeds = np.zeros(region.shape, smallest_uint(len(ids) - 1))
        mask = np.zeros(region.shape, bool)
        for block, table, packed, name, covered in parts:
            part = block.write_roi.intersect(region)
            local = packed.get(name)[part.to_slices(covered)]
            if local.size and int(local.max()) > len(table):
                raise DataError(f"provisional labels of block {block.index} exceed its {len(table) - 1} "
                                "labels of the merge; rerun every phase with --overwrite")
            # label n + 1 (foreground without a seed) maps to no seed (rank 0)
            ranks = np.searchsorted(ids, np.append(table, 0)).astype(seeds.dtype)
            out = part.to_slices(region)
            seeds[out] = ranks[local]
            np.not_equal(local, 0, out=mask[out])
        return seeds, mask, ids

    def _grow_counts(self, i: int) -> str:
        return self.url("grow", "counts", f"{i}.npz")

    def _require_instances(self, phase: str) -> None:
        if not self.instances:
            raise PhaseError(f"phase {phase!r} belongs to the seeded instance modes (contour, distance); this "
                             f"config's instance_mode resolves to {self.mode!r}, whose phases are blocks, merge, "
                             "relabel, clean")

    def run_grow(self, shard_index: int, num_shards: int, overwrite: bool, wait_timeout: float) -> None:
        """Grow the seeds into the foreground; each block reads a halo of ``grow_distance``."""
        self._require_instances("grow")
        merge = self.store.markers(self.spec.run_id, "merge")
        self.wait_for(lambda: [] if merge.is_done(0) else ["the merge marker"], wait_timeout,
                      f"the label merge of run {self.spec.run_id} at {self.store.shown}",
                      "run `catena-mito label --phase merge` first")
        dtype = np.dtype(merge.read(0)["dtype"])
        distance = self.settings.grow_distance
        halo = self._grow_halo()
        volume = self.grid.volume_roi
        self._maps = OrderedDict()
        # a block's halo reaches the blocks around it: keep the tables of two planes of
        # blocks (C order), so that each is read about once
        _, gy, gx = self.grid.grid_shape
        self._map_cache = max(64, 2 * (gy * gx + gx + 1) + 2 * self.threads)

        unseeded = self.settings.unseeded_components

        def compute(block: Block, _: Any) -> tuple[bytes, bytes, bytes | None]:
            import fastremap

            roi = block.write_roi
            region = roi.grow(halo).intersect(volume)
            seeds, mask, region_ids = self._region_seeds(block, region)
            inner = roi.to_slices(region)
            grown_region = grow(seeds, mask, self.config.connectivity, distance)
            grown = grown_region[inner]
            rest = None
            if unseeded:  # the block's foreground that no seed reached, in components
                rest_mask = np.ascontiguousarray(mask[inner]) & (grown == 0)
                rest, num_rest = connected_components(rest_mask, self.config.connectivity)
                del rest_mask
                result = BlockResult.from_labels(rest, num_rest, roi.offset, self.input.shape)
                result.drop = self._touching_grown(rest, num_rest, grown_region, roi, region)
                rest_buffer = io.BytesIO()
                np.savez_compressed(rest_buffer, **result.to_npz_dict())
            del seeds, mask, grown_region
            # block-local ids (the smallest dtype): relabel maps them through ``ids``
            local, mapping = fastremap.renumber(np.ascontiguousarray(grown), preserve_zero=True, in_place=True)
            ranks = np.zeros(max(mapping.values(), default=0) + 1, np.int64)
            for r, k in mapping.items():
                ranks[k] = r
            ids = region_ids[ranks].astype(dtype, copy=False)
            local = local.astype(smallest_uint(len(ids) - 1), copy=False)
            uniq, counts = fastremap.unique(local, return_counts=True)
            keep = uniq != 0
            buffer = io.BytesIO()
            np.savez_compressed(buffer, ids=np.asarray(ids[uniq[keep]], np.int64),
                                counts=np.asarray(counts[keep], np.int64))
            if rest is None:
                return pack({"local": local, "ids": ids}), buffer.getvalue(), None
            if num_rest:  # unseeded component j: local id len(ids) - 1 + j
                local = local.astype(smallest_uint(len(ids) - 1 + num_rest), copy=False)
                np.add(rest, len(ids) - 1, out=local, where=rest > 0, casting="unsafe")
            return (pack({"local": local, "ids": ids}, {"unseeded": int(num_rest)}), buffer.getvalue(),
                    rest_buffer.getvalue())

        def write(block: Block, result: tuple[bytes, bytes, bytes | None]) -> None:
            storage.write_bytes(self._grown_url(block.index), result[0], self.options, sync=False)
            if result[2] is not None:
                storage.write_bytes(self._unseeded_url(block.index), result[2], self.options, sync=False)
            storage.write_bytes(self._grow_counts(block.index), result[1], self.options)

        self._run("grow", self.grid.blocks(), BlockSteps(compute=compute, write=write, parallel=True),
                  shard_index, num_shards, overwrite, f"label grow {shard_index}/{num_shards}")

    def _touching_grown(self, rest: np.ndarray, num_rest: int, grown_region: np.ndarray, roi: Roi,
                        region: Roi) -> np.ndarray:
        """Which of a block's provisional unseeded components touch a grown voxel (under
        ``connectivity``), in the block or on the one-voxel ring around it (exact there:
        the grow phase reads a halo one voxel deeper than ``grow_distance``).

        Gathers the neighbours of the component voxels only (a few per cent of a block at
        most), not a dense dilation of the block (which would cost more than the growth).
        """
        touched = np.zeros(num_rest, bool)
        if num_rest == 0:
            return touched
        ring = roi.grow(1).intersect(self.grid.volume_roi)
        # the ring's grown ids as "reached", padded by one voxel of False where the ring is
        # clipped by the volume's edge, so that every neighbour of a block voxel is inside
        reached = np.zeros(tuple(s + 2 for s in roi.shape), bool)
        lo = [1 - (b - rb) for b, rb in zip(roi.begin, ring.begin)]
        reached[tuple(slice(a, a + s) for a, s in zip(lo, ring.shape))] = grown_region[ring.to_slices(region)] > 0
        flat = reached.ravel()
        where = np.flatnonzero(rest)
        labels = rest.ravel()[where]
        z, y, x = np.unravel_index(where, rest.shape)
        base = np.ravel_multi_index((z + 1, y + 1, x + 1), reached.shape)
        steps = [np.ravel_multi_index((1 + dz, 1 + dy, 1 + dx), reached.shape) - np.ravel_multi_index((1, 1, 1),
                 reached.shape) for dz, dy, dx in itertools.product((-1, 0, 1), repeat=3)
                 if 0 < abs(dz) + abs(dy) + abs(dx) <= {6: 1, 18: 2, 26: 3}[self.config.connectivity]]
        hit = np.zeros(len(where), bool)
        for step in steps:
            hit |= flat[base + step]
        touched[np.unique(labels[hit]).astype(np.int64) - 1] = True
        return touched

    def run_sizes(self, overwrite: bool, wait_timeout: float) -> None:
        """Global sizes of the grown objects; small ones removed; final ids by seed id."""
        self._require_instances("sizes")
        markers = self.store.markers(self.spec.run_id, "grow")
        indices = range(self.grid.num_blocks)
        self.wait_for(lambda: [f"block {i}" for i in markers.missing(indices)], wait_timeout,
                      f"the label grow phase of run {self.spec.run_id} at {self.store.shown}",
                      "run `catena-mito label --phase grow` for every shard first")
        num_seeds = int(self.store.markers(self.spec.run_id, "merge").read(0)["num_objects"])
        with Lease(self.store, self.spec.run_id, "sizes", f"the label sizes of {self.store.shown}"):
            steps = BlockSteps(compute=lambda _b, _d: self._size_table(num_seeds), write=self._write_sizes)
            self._run("sizes", [_single_block()], steps, 0, 1, overwrite, "label sizes")
        self._set_merge_summary(self.store.markers(self.spec.run_id, "sizes").read(0))

    def _load_counts(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        data = storage.read_bytes(self._grow_counts(i), self.options)
        with _NPY_HEADER_LOCK, np.load(io.BytesIO(data)) as npz:
            return np.asarray(npz["ids"], np.int64), np.asarray(npz["counts"], np.int64)

    def _size_table(self, num_seeds: int) -> tuple[np.ndarray, int, Any]:
        """``table[seed id] = final id`` (0 = removed), the number of removed objects, and
        the stitched unseeded components (None without ``unseeded_components``): their
        final ids follow the seeds', by first voxel (C order)."""
        total = np.zeros(num_seeds + 1, np.int64)
        for ids, counts in _ordered_prefetch(self._load_counts, list(range(self.grid.num_blocks)),
                                             SMALL_FILE_THREADS):
            if len(ids) and int(ids.max()) > num_seeds:
                raise DataError(f"grown ids up to {int(ids.max())} but the merge numbered {num_seeds} seeds; "
                                "rerun every phase with --overwrite")
            np.add.at(total, ids, counts)
        keep = total >= self.config.thres_small_instances
        keep[0] = False
        kept = int(keep.sum())
        rest = None
        if self.settings.unseeded_components:
            rest, _ = self._stitch(lambda i: self._load_block(i, self._unseeded_url(i)),
                                   self.config.thres_small_instances)
        num_rest = rest.num_objects if rest is not None else 0
        table = np.zeros(num_seeds + 1, _final_dtype(kept + num_rest))
        table[keep] = np.arange(1, kept + 1, dtype=table.dtype)  # in seed-id order
        removed = num_seeds - kept + (rest.num_removed if rest is not None else 0)
        log.info("label sizes: %d seeds grown, %d objects kept (%d of them unseeded components), %d removed "
                 "(< %d voxels)", num_seeds, kept + num_rest, num_rest, removed, self.config.thres_small_instances)
        return table, removed, rest

    def _write_sizes(self, _block: Block, result: tuple[np.ndarray, int, Any]) -> dict:
        table, removed, rest = result
        buffer = io.BytesIO()
        np.save(buffer, table)
        storage.write_bytes(self.url("sizes", "table.npy"), buffer.getvalue(), self.options)
        seeded = int(table.max()) if table.size else 0
        num_rest = rest.num_objects if rest is not None else 0
        if rest is not None:  # unseeded components: final ids after the seeded objects

            def write_map(i: int) -> None:
                mapping = rest.block_mapping(i, table.dtype)
                mapping[mapping > 0] += seeded
                buffer = io.BytesIO()
                np.save(buffer, mapping)
                storage.write_bytes(self._unseeded_map_url(i), buffer.getvalue(), self.options)

            with ThreadPoolExecutor(SMALL_FILE_THREADS) as pool:
                list(pool.map(write_map, range(self.grid.num_blocks)))
        if not self.tiff:
            self._create_output(table.dtype)
        return {"num_objects": seeded + num_rest, "num_removed": removed, "num_seeds": len(table) - 1,
                "num_unseeded": num_rest, "dtype": str(table.dtype), "output_shape": list(self.out_shape)}

    def _final_info(self) -> dict[str, Any]:
        """The marker of the phase that fixed the final ids: sizes (seeded modes) or merge."""
        return self.store.markers(self.spec.run_id, "sizes" if self.instances else "merge").read(0)

    def _set_merge_summary(self, info: Mapping[str, Any]) -> None:
        self.summary.num_objects = int(info["num_objects"])
        self.summary.num_removed = int(info.get("num_removed") or 0)
        self.summary.dtype = str(info["dtype"])
        self.summary.shape = tuple(self.out_shape)  # type: ignore[assignment]

    def _output_attrs(self) -> dict[str, Any]:
        res = self.input.resolution or (1.0, 1.0, 1.0)
        # an output voxel spans 1/factor input voxels; the corner (offset) stays put
        scaled = [r / f for r, f in zip(res, self.config.scale_factors)]
        attrs = {**storage.spatial_attrs(scaled, self.input.offset), "catena_label": {
            "source": storage.redact_url(self.config.input_prediction_path),
            "thres_foreground": self.config.thres_foreground,
            "thres_small_instances": self.config.thres_small_instances,
            "connectivity": self.config.connectivity,
            "scale_factors": list(self.config.scale_factors),
        }}
        if self.instances:
            attrs["catena_label"]["instances"] = self.settings.description()
        if not self.tiff:
            attrs[RUN_ATTR] = {"task": "label", "run_id": self.spec.run_id,
                               "record": relative_url(self.output_url, self.work_url)}
        return attrs

    def _create_output(self, dtype: np.dtype) -> None:
        # Created by the one merge process, so relabel shards only ever open it. An array
        # of another run (or dtype) is replaced: claiming the run was the --overwrite.
        storage.create_array(self.output_url, self.out_shape, dtype, self.config.chunk_size,
                             overwrite=True, attrs=self._output_attrs(), storage_options=self.options)

    # -- relabel --------------------------------------------------------------------------

    def run_relabel(self, shard_index: int, num_shards: int, overwrite: bool, wait_timeout: float) -> None:
        if self.tiff and num_shards != 1:
            raise ShardError(f"output_format 'tiff' is written by one process: relabel needs "
                             f"--num-shards 1, got {num_shards} (use output_format: zarr to shard)")
        # the final ids were fixed by the merge (connected components) or the sizes phase
        last = "sizes" if self.instances else "merge"
        merge = self.store.markers(self.spec.run_id, last)
        self.wait_for(lambda: [] if merge.is_done(0) else [f"the {last} marker"], wait_timeout,
                  f"the label {last} of run {self.spec.run_id} at {self.store.shown}",
                  f"run `catena-mito label --phase {last}` first")
        info = merge.read(0)
        self._set_merge_summary(info)
        dtype = np.dtype(info["dtype"])
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._sizes: np.ndarray | None = None
        if self.tiff:
            self._relabel_tiff(dtype, overwrite)
            return
        out = storage.open_array(self.output_url, self.options, mode="r+")
        run = dict(out.attrs).get(RUN_ATTR) or {}
        if tuple(out.shape) != tuple(self.out_shape) or out.dtype != dtype or run.get("run_id") != self.spec.run_id:
            raise StorageError(f"output {self.summary.output_url!r} is {list(out.shape)} {out.dtype} of run "
                               f"{run.get('run_id')}, expected {list(self.out_shape)} {dtype} of run "
                               f"{self.spec.run_id}; rerun --phase merge with --overwrite")

        def write(block: Block, data: np.ndarray) -> None:
            out[block.write_roi.to_slices()] = data

        steps = BlockSteps(compute=lambda b, _: self._relabel_block(b.write_roi, dtype), write=write, parallel=True)
        self._run("relabel", self.out_grid.blocks(), steps, shard_index, num_shards, overwrite,
                  f"label relabel {shard_index}/{num_shards}", merge_info=info)

    def _complete_info(self, info: Mapping[str, Any]) -> dict[str, Any]:
        return {"num_objects": info["num_objects"], "num_removed": info.get("num_removed"),
                "dtype": info["dtype"], "output": storage.redact_url(self.output_url),
                "output_shape": list(self.out_shape)}

    def _complete_if_done(self, info: Mapping[str, Any]) -> None:
        self.store.mark_complete_if_done(self.spec, self._complete_info(info))

    def _relabel_tiff(self, dtype: np.dtype, overwrite: bool) -> None:
        _check_tiff_fits(self.out_shape, dtype, self.output_url)

        def compute(_block: Block, _: Any) -> np.ndarray:
            volume = np.zeros(self.out_shape, dtype)

            def one(block: Block) -> None:
                volume[block.write_roi.to_slices()] = self._relabel_block(block.write_roi, dtype)

            with ThreadPoolExecutor(self.threads) as pool:
                list(pool.map(one, self.out_grid.blocks()))
            return volume

        def write(_block: Block, volume: np.ndarray) -> None:
            attrs = self._output_attrs()
            storage.write_tiff(self.output_url, volume, attrs["resolution"], attrs["offset"], self.options)

        self._run("relabel", [_single_block()], BlockSteps(compute=compute, write=write), 0, 1, overwrite,
                  "label relabel (tiff)", merge_info=self._final_info())

    def _map(self, index: int) -> np.ndarray:
        table = self._maps.get(index)
        if table is None:
            data = storage.read_bytes(self.block_map(index), self.options)
            with _NPY_HEADER_LOCK:
                table = np.load(io.BytesIO(data))
            self._maps[index] = table
            # the tables of recent blocks (scaled outputs and the grow halo reuse them)
            while len(self._maps) > getattr(self, "_map_cache", 64):
                self._maps.popitem(last=False)
        return table

    def _source_labels(self, block: Block, table: np.ndarray) -> np.ndarray:
        """Block ``block``'s provisional labels, recomputed exactly as in the blocks phase."""
        return self._check_count(block, table, *connected_components(self._block_mask(block.write_roi),
                                                                     self.config.connectivity))

    def _check_count(self, block: Block, table: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
        if n != len(table) - 1:
            raise DataError(
                f"input_prediction_path {self.input.shown!r}"
                + (f" or input_contour_path {self.contour.shown!r}" if self.contour is not None else "")
                + " changed since the blocks phase: "
                f"block {block.index} now has {n} components, {len(table) - 1} before; "
                "rerun every phase with --overwrite"
            )
        return labels

    def _final_block(self, block: Block, dtype: np.dtype) -> np.ndarray | None:
        """Final ids of input block ``block`` (None: no kept object there, nothing was read)."""
        if self.instances:
            if self._sizes is None:
                data = storage.read_bytes(self.url("sizes", "table.npy"), self.options)
                with _NPY_HEADER_LOCK:
                    self._sizes = np.load(io.BytesIO(data)).astype(dtype, copy=False)
            if not self.summary.num_objects:
                return None
            packed = self._read_packed(self._grown_url(block.index))
            ids = packed.get("ids")
            if ids.size and int(ids.max()) >= len(self._sizes):
                raise DataError(f"grown ids of block {block.index} exceed the {len(self._sizes) - 1} seeds "
                                "of the sizes table; rerun every phase with --overwrite")
            lut = self._sizes[ids]
            num_rest = int(packed.meta.get("unseeded", 0))
            if self.settings.unseeded_components and num_rest:  # the block's unseeded components follow
                data = storage.read_bytes(self._unseeded_map_url(block.index), self.options)
                with _NPY_HEADER_LOCK:
                    rest = np.load(io.BytesIO(data)).astype(dtype, copy=False)
                if len(rest) != num_rest + 1:
                    raise DataError(f"{packed.where} has {num_rest} unseeded components, the sizes phase "
                                    f"{len(rest) - 1}; rerun every phase with --overwrite")
                lut = np.concatenate([lut, rest[1:]])
            elif num_rest:
                raise DataError(f"{packed.where} holds unseeded components, but this run does not number "
                                "them; rerun every phase with --overwrite")
            if not lut.any():  # no kept object here
                return None
            local = packed.get("local")
            if tuple(local.shape) != tuple(block.write_roi.shape):
                raise DataError(f"{packed.where} is {list(local.shape)}, block {block.index} "
                                f"{list(block.write_roi.shape)}; rerun every phase with --overwrite")
            return lut[local]
        table = self._map(block.index)
        if not table.any():  # no kept object here: skip reading the input
            return None
        return table[self._source_labels(block, table)]

    def _relabel_block(self, roi: Roi, dtype: np.dtype) -> np.ndarray:
        """Final labels of the output region ``roi`` (output voxels, z y x)."""
        if not self.scaled:
            block = self.grid.block_at([b // c for b, c in zip(roi.begin, self.config.chunk_size)])
            assert block is not None and block.write_roi == roi
            final = self._final_block(block, dtype)
            return np.zeros(roi.shape, dtype) if final is None else final
        src = [source_indices(b, e, f, s) for b, e, f, s in
               zip(roi.begin, roi.end, self.config.scale_factors, self.input.shape)]
        out = np.zeros(roi.shape, dtype)
        first_pos = [int(ix[0]) // c for ix, c in zip(src, self.config.chunk_size)]
        last_pos = [int(ix[-1]) // c for ix, c in zip(src, self.config.chunk_size)]
        for gz in range(first_pos[0], last_pos[0] + 1):
            for gy in range(first_pos[1], last_pos[1] + 1):
                for gx in range(first_pos[2], last_pos[2] + 1):
                    block = self.grid.block_at((gz, gy, gx))
                    b0, b1 = block.write_roi.begin, block.write_roi.end
                    # source indices are sorted: each block holds one contiguous run of them
                    runs = [slice(int(np.searchsorted(ix, lo)), int(np.searchsorted(ix, hi)))
                            for ix, lo, hi in zip(src, b0, b1)]
                    if any(r.stop <= r.start for r in runs):
                        continue
                    final = self._final_block(block, dtype)
                    if final is None:
                        continue
                    out[tuple(runs)] = final[np.ix_(*(ix[r] - lo for ix, r, lo in zip(src, runs, b0)))]
        return out

    # -- clean ----------------------------------------------------------------------------

    def run_clean(self, wait_timeout: float = 0.0) -> None:
        """Remove the intermediate files once relabel is complete (waiting up to
        ``wait_timeout`` seconds for it, as the other phases wait for theirs)."""
        if self.store.read_complete(self.spec.run_id) is None:
            last = self.store.markers(self.spec.run_id, "sizes" if self.instances else "merge")
            relabel = self.store.markers(self.spec.run_id, "relabel")
            total = self.spec.num_blocks("relabel")

            def missing() -> list[str]:
                if self.store.read_complete(self.spec.run_id) is not None:
                    return []
                if not last.is_done(0):
                    return ["the merge" if not self.instances else "the sizes phase"]
                return [f"relabel block {i}" for i in relabel.missing(range(total))]

            self.wait_for(missing, wait_timeout,
                          "the label relabel phase",
                          f"run the earlier phases of run {self.spec.run_id} at {self.store.shown} "
                          "(up to relabel, every shard) first; nothing to clean")
            if self.store.read_complete(self.spec.run_id) is None:
                self._complete_if_done(self._final_info())
        else:
            self.check_owner()
        with Lease(self.store, self.spec.run_id, "clean", f"the label clean of {self.store.shown}"):
            record = self.store.read_complete(self.spec.run_id) or {}
            # complete.json stays (and run.json): consumers and `status` read them
            for part, _ in self.spec.phases:
                storage.remove(self.url(part), self.options)
        self._set_merge_summary(record)
        log.info("label: cleaned the intermediate files under %s", storage.redact_url(self.work_url))

    # -- plan -----------------------------------------------------------------------------

    def plan(self, shard_index: int, num_shards: int) -> dict[str, Any]:
        """What this run would do (``--dry-run``), reading only."""
        itemsize = np.dtype(self.input.dtype).itemsize
        block_voxels = math.prod(self.config.chunk_size)
        claim = self.store.read_claim()
        if claim is None:
            state = "new"
        elif claim.get("run_id") == self.spec.run_id:
            state = "this run: " + ", ".join(
                f"{p.phase} {len(p.done)}/{p.total}" for p in self.store.progress(claim))
        else:
            state = f"another run ({self.store.mismatch_message(claim, self.spec)})"
        return {
            "input": self.input.shown, "output": self.summary.output_url, "run_id": self.spec.run_id,
            "input_shape": list(self.input.shape), "output_shape": list(self.out_shape),
            "chunk_size": list(self.config.chunk_size),
            "blocks_total": self.grid.num_blocks, "relabel_blocks_total": self.spec.num_blocks("relabel"),
            "blocks_per_shard": [len(range(k, self.grid.num_blocks, num_shards)) for k in range(num_shards)],
            "threads": self.threads,
            # per block in flight: the input values, the mask, the labels (uint32) and the npz;
            # seeded modes: the grow phase's block + halo (ids, mask, growth state, copies)
            "peak_memory_bytes_per_worker": int(self.threads * max(
                block_voxels * (itemsize * (2 if self.contour is not None else 1) + 1 + 4 + 4 + 4),
                math.prod(c + 2 * self.settings.grow_distance + 2 for c in self.config.chunk_size) * 22,
            ) if self.instances else self.threads * block_voxels * (itemsize + 1 + 4 + 4)),
            "output_bytes_at_least": int(math.prod(self.out_shape)) * 4,
            "output_state": state,
            "instance_mode": self.mode,
            "phases": [p for p, _ in self.spec.phases],
        }


def format_plan(plan: Mapping[str, Any]) -> str:
    from catena_mito.predict import format_bytes

    per_shard = plan["blocks_per_shard"]
    return "\n".join([
        f"label {plan['input']} -> {plan['output']} (run {plan['run_id']})",
        f"  input       {plan['input_shape']}; output {plan['output_shape']} uint32 or uint64, "
        f"at least {format_bytes(plan['output_bytes_at_least'])}",
        f"  blocks      {plan['blocks_total']} of {plan['chunk_size']} (relabel {plan['relabel_blocks_total']}); "
        f"per shard {min(per_shard)}-{max(per_shard)}" if min(per_shard) != max(per_shard) else
        f"  blocks      {plan['blocks_total']} of {plan['chunk_size']} (relabel {plan['relabel_blocks_total']}); "
        f"per shard {per_shard[0]}",
        f"  memory      about {format_bytes(plan['peak_memory_bytes_per_worker'])} per worker "
        f"({plan['threads']} blocks in flight)",
        f"  instances   {plan['instance_mode']}: phases {', '.join(plan['phases'])}",
        f"  output now  {plan['output_state']}",
    ])


def label(
    config: LabelConfig,
    phase: str = "all",
    shard_index: int = 0,
    num_shards: int = 1,
    overwrite: bool = False,
    wait_timeout: float = 0.0,
    *,
    num_threads: int | None = None,
    allow_incomplete: bool = False,
    dry_run: bool = False,
) -> LabelSummary:
    """Run ``phase`` of the label task of ``config`` (see the module docstring).

    ``all`` runs every phase of the mode in this process (one shard only); ``blocks``,
    ``grow`` and ``relabel`` process shard ``shard_index`` of ``num_shards``; ``merge``,
    ``sizes`` and ``clean`` are single-process; ``grow`` and ``sizes`` do nothing in
    connected_components mode. ``wait_timeout`` (seconds): each phase after ``blocks``
    polls for the markers of the one before for up to this long; with 0 a missing
    previous phase is an immediate :class:`PhaseError`. ``overwrite`` recomputes
    what is marked done and, in the first phase, replaces another run's output.
    ``allow_incomplete``: label an incomplete or stale prediction anyway (logged).
    ``dry_run``: plan only; ``summary.plan`` holds it. ``num_threads`` (default: the CPUs
    this process may use, at most 8) overlaps block I/O with compute.
    """
    if phase not in PHASES:
        raise ConfigError(f"phase: expected one of {', '.join(PHASES)}, got {phase!r}")
    check_shard(shard_index, num_shards)
    if phase == "all" and num_shards != 1:
        raise ShardError(
            f"--phase all runs every block in one process: --num-shards must be 1, got {num_shards} "
            "(shard --phase blocks and --phase relabel instead)"
        )
    if phase in SINGLE_PROCESS_PHASES:  # one process: a shard count from the environment is moot
        shard_index, num_shards = 0, 1
    threads = num_threads or default_threads()
    task = _LabelTask(config, threads, allow_incomplete)
    task.summary.phase = phase
    if phase in INSTANCE_PHASES and not task.instances:
        # One set of cluster manifests (k8s/, jobs/slurm/) runs every phase of PHASES in
        # order, whatever the mode: a connected-components run has no grow or sizes step,
        # so those phases say so and succeed without reading, waiting or writing anything.
        log.info("label %s: instance_mode %r has no %s phase (its phases are blocks, merge, relabel, "
                 "clean); nothing to do", phase, task.mode, phase)
        return task.summary
    if dry_run:
        task.summary.plan = task.plan(shard_index, num_shards)
        return task.summary
    if phase != "clean" and task.already_complete(overwrite):  # clean tidies a complete run
        if config.pyramid_levels and config.output_format == "zarr":  # levels asked for later
            from catena_mito.pyramid import build_after

            build_after(task.output_url, config.pyramid_levels, config.storage_options)
        return task.summary
    if not overwrite and phase in ("all", "blocks", "merge"):
        task.check_existing_output()
    if phase in ("all", "blocks"):
        task.claim(overwrite)
    task.save_config()
    started = time.perf_counter()
    if phase == "all":
        with Lease(task.store, task.spec.run_id, "all", f"label --phase all of {task.store.shown}"):
            if overwrite:
                # every phase is recomputed: drop their markers now, or the markers of later
                # phases left by an earlier run of single phases would let the run count as
                # complete (without its object counts) as soon as the first phase is done
                for name, _ in task.spec.phases:
                    storage.remove(task.url(name, "done"), task.options)
            task.run_blocks(0, 1, overwrite)
            task.run_merge(overwrite, wait_timeout)
            if task.instances:
                task.run_grow(0, 1, overwrite, wait_timeout)
                task.run_sizes(overwrite, wait_timeout)
            task.run_relabel(0, 1, overwrite, wait_timeout)
            task.run_clean()
    elif phase == "blocks":
        task.run_blocks(shard_index, num_shards, overwrite)
    elif phase == "merge":
        task.run_merge(overwrite, wait_timeout)
    elif phase == "grow":
        task.run_grow(shard_index, num_shards, overwrite, wait_timeout)
    elif phase == "sizes":
        task.run_sizes(overwrite, wait_timeout)
    elif phase == "relabel":
        task.run_relabel(shard_index, num_shards, overwrite, wait_timeout)
    else:
        task.run_clean(wait_timeout)
    log.info("label %s: done in %.1f s (%s)", phase, time.perf_counter() - started, task.summary.output_url)
    if config.pyramid_levels and phase in ("all", "relabel"):  # the shard completing relabel builds the levels
        from catena_mito.pyramid import build_after

        build_after(task.output_url, config.pyramid_levels, config.storage_options)
    return task.summary
