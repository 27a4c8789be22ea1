"""Multiscale pyramids: coarser OME-NGFF levels of a volume, block-wise and shardable.

A volume at ``U`` (a multiscale group, see :mod:`catena_mito.ome`) gets levels
``U/1 … U/L``; level ``k`` is level ``k-1`` reduced by an integer factor per axis, one
phase per level, each read from the level before (so a level costs a fraction of the one
above it)::

    level k-1   ┌──┬──┬──┬──┐   a block of level k writes whole chunks of level k
                ├──┼──┼──┼──┤   and reads the factor-times-larger region of k-1 it
                └──┴──┴──┴──┘   covers (no halo: every output voxel has its own inputs)
    level k     ┌─────┬─────┐
                └─────┴─────┘

Sharding cannot change the answer: each output voxel is a function of its own
``factor``-sized box of the level before (clipped at the volume's far edge), whatever the
block. The reductions:

* ``mean`` (raw, probabilities): float64 sum over the voxels of the box that exist,
  divided by their count; integer dtypes round half up (``floor(x + 0.5)``), floats are
  cast. Deterministic: the same values in the same order for any block.
* ``mode`` (instance ids): the most frequent id in the box, ties to the smaller id. Why
  not striding (one voxel per box): striding drops objects thinner than the factor and
  shifts boundaries by up to a box; the mode keeps the majority id of every box and
  never invents one.

Factors (:func:`reduction_factors`): anisotropic data is reduced first along the axes
whose voxel size is at most half the largest, until it is within a factor 2 of isotropic,
then along every axis (as neuroglancer/igneous do); an axis of one voxel is not reduced.

The run (task ``pyramid``, record ``U/.catena/pyramid``) is identified by the method,
factors, block plan and the identity of level 0: a source that is incomplete or stale is
refused like any consumer (``--allow-incomplete`` overrides), and a source rewritten by
another run drops its levels (:func:`catena_mito.storage.create_array`). Levels enter the
OME-NGFF metadata only once every block of every level is done, so a viewer never shows
a partial level.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from catena_mito import ome, storage
from catena_mito.blockwise.geometry import BlockGrid, Roi, check_chunk_alignment, check_shard
from catena_mito.blockwise.identity import RUN_ATTR
from catena_mito.blockwise.runner import BlockSteps, run_phase
from catena_mito.blockwise.runs import RunSpec, RunStore, check_input, describe_inputs, relative_url
from catena_mito.config import PyramidConfig
from catena_mito.errors import ConfigError, DataError, IncompleteInputError, PhaseError

log = logging.getLogger(__name__)

#: Bump when a code change changes the values of any level (it is part of the run id).
ALGORITHM_VERSION = 1
TASK = "pyramid"
RECORD_DIR = ".catena/pyramid"
#: Rows of the mode reduction handled at once (bounds its k*k comparison table).
_MODE_ROWS = 1 << 15


# --- the pure part --------------------------------------------------------------------------


def reduction_factors(resolution: Sequence[float], shape: Sequence[int], levels: int) -> list[tuple[int, int, int]]:
    """The factor (z, y, x) of each level relative to the level before (``levels`` entries).

    See the module doc for the rule. Refuses more levels than the shape allows.
    """
    res = [float(r) for r in resolution]
    shp = [int(s) for s in shape]
    out = []
    for k in range(1, levels + 1):
        big = max(r for r, s in zip(res, shp) if s > 1) if any(s > 1 for s in shp) else 0
        factor = [2 if s > 1 and 2 * r <= big else 1 for r, s in zip(res, shp)]
        if not any(f > 1 for f in factor):
            factor = [2 if s > 1 else 1 for s in shp]
        if not any(f > 1 for f in factor):
            raise ConfigError(f"levels {levels}: level {k - 1} is already one voxel "
                              f"({shp}); at most {k - 1} levels fit this volume")
        out.append(tuple(factor))
        res = [r * f for r, f in zip(res, factor)]
        shp = [-(-s // f) for s, f in zip(shp, factor)]
    return out  # type: ignore[return-value]


def level_shape(shape: Sequence[int], factor: Sequence[int]) -> tuple[int, int, int]:
    return tuple(-(-int(s) // int(f)) for s, f in zip(shape, factor))  # type: ignore[return-value]


def _boxes(data: np.ndarray, factor: Sequence[int], fill: Any) -> tuple[np.ndarray, np.ndarray]:
    """``data`` padded to whole boxes as ``(n_boxes, box voxels)``, and which entries exist."""
    out = level_shape(data.shape, factor)
    padded = np.full([o * f for o, f in zip(out, factor)], fill, dtype=data.dtype)
    valid = np.zeros(padded.shape, dtype=bool)
    sl = tuple(slice(0, s) for s in data.shape)
    padded[sl] = data
    valid[sl] = True

    def rows(a: np.ndarray) -> np.ndarray:
        a = a.reshape(out[0], factor[0], out[1], factor[1], out[2], factor[2])
        return a.transpose(0, 2, 4, 1, 3, 5).reshape(math.prod(out), math.prod(factor))

    return rows(padded), rows(valid)


def downsample(data: np.ndarray, factor: Sequence[int], method: str) -> np.ndarray:
    """``data`` (z, y, x) reduced by ``factor`` with ``mean`` or ``mode`` (see the module doc).

    A partial box at the far edge uses the voxels it has. Output dtype = input dtype.
    """
    data = np.asarray(data)
    out_shape = level_shape(data.shape, factor)
    values, valid = _boxes(data, factor, 0)
    if method == "mean":
        sums = np.where(valid, values, 0).sum(axis=1, dtype=np.float64)
        mean = sums / valid.sum(axis=1)
        if np.issubdtype(data.dtype, np.integer):
            info = np.iinfo(data.dtype)
            mean = np.clip(np.floor(mean + 0.5), info.min, info.max)
        elif data.dtype == np.bool_:
            mean = mean >= 0.5
        return mean.astype(data.dtype).reshape(out_shape)
    if method == "mode":
        result = np.empty(len(values), dtype=data.dtype)
        for start in range(0, len(values), _MODE_ROWS):
            v, ok = values[start:start + _MODE_ROWS], valid[start:start + _MODE_ROWS]
            same = (v[:, :, None] == v[:, None, :]) & ok[:, None, :]
            counts = np.where(ok, same.sum(axis=2), -1)
            best = counts.max(axis=1, keepdims=True)
            top = np.where(counts == best, v, np.iinfo(v.dtype).max if np.issubdtype(v.dtype, np.integer) else np.inf)
            result[start:start + len(v)] = top.min(axis=1)
        return result.reshape(out_shape)
    raise ConfigError(f"method {method!r}: expected 'mean' or 'mode'")


# --- the job --------------------------------------------------------------------------------


def _method(config: PyramidConfig, url: str, level0: Any) -> str:
    if config.method != "auto":
        if config.method == "mean" and storage.is_label_volume(url, dict(level0.attrs)):
            log.warning("%s is a label image; mean-downsampled ids are not ids", storage.redact_url(url))
        return config.method
    return "mode" if storage.is_label_volume(url, dict(level0.attrs)) else "mean"


class _Pyramid:
    """The plan and run of one volume's pyramid."""

    def __init__(self, config: PyramidConfig, url: str, allow_incomplete: bool):
        self.config, self.url, self.options = config, url, config.storage_options
        self.shown = storage.redact_url(url)
        if storage.volume_group(url, self.options) is None:
            raise DataError(
                f"{self.shown!r} is not an OME-NGFF multiscale volume (a plain array of an older "
                "version, or not a volume): copy it into the current layout first, e.g. "
                "`catena-mito import` or rerun the job that wrote it")
        self.level0 = storage.open_volume(url, self.options)
        resolution, self.offset = storage.read_spatial(self.level0)
        self.resolution = resolution or (1.0, 1.0, 1.0)
        self.identity = check_input(self.level0, url, f"volume {self.shown!r}", self.options,
                                    allow_incomplete=allow_incomplete)
        self.method = _method(config, url, self.level0)
        self.steps = reduction_factors(self.resolution, self.level0.shape, config.levels)
        self.chunks = tuple(int(c) for c in self.level0.chunks)
        self.block_shape = tuple(config.block_shape or tuple(2 * c for c in self.chunks))
        # Each level is chunked like level 0, clipped to its shape: a block that is a whole
        # number of level-0 chunks is then a whole number of every level's chunks, or spans
        # the (smaller) level's whole axis: one writer per chunk on every level.
        check_chunk_alignment(self.block_shape, self.chunks, field="block_shape")
        self.cumulative = [(1, 1, 1)]
        for f in self.steps:
            self.cumulative.append(tuple(a * b for a, b in zip(self.cumulative[-1], f)))
        self.shapes = [tuple(self.level0.shape)] + [level_shape(self.level0.shape, c) for c in self.cumulative[1:]]
        self.grids = [BlockGrid(s, self.block_shape) for s in self.shapes[1:]]
        self.store = RunStore(storage.join_url(url, RECORD_DIR), self.options, shown=f"pyramid of {self.shown}",
                              outputs=(url,))
        self.spec = RunSpec(TASK, {
            "algorithm_version": ALGORITHM_VERSION, "method": self.method,
            "factors": [list(f) for f in self.steps], "block_shape": list(self.block_shape),
            "chunks": list(self.chunks), "dtype": str(self.level0.dtype),
            "inputs": describe_inputs({"level0": (url, self.identity)}),
        }, tuple((f"level{k}", g.num_blocks) for k, g in enumerate(self.grids, start=1)))

    def level_attrs(self, k: int) -> dict[str, Any]:
        scale, translation = ome.level_transform(self.resolution, self.offset, self.cumulative[k])
        return {**storage.spatial_attrs(scale, translation), "catena_pyramid": {"level": k, "method": self.method},
                RUN_ATTR: {"task": TASK, "run_id": self.spec.run_id,
                           "record": relative_url(storage.join_url(self.url, str(k)), self.store.root_url)}}

    def run(self, shard_index: int, num_shards: int, overwrite: bool, replace: bool, wait_timeout: float,
            level: int | None) -> dict:
        if level is not None and not 1 <= level <= len(self.grids):
            raise ConfigError(f"--level {level}: expected 1..{len(self.grids)} (levels {len(self.grids)})")
        if self.store.claim(self.spec, overwrite=overwrite or replace, may_claim=level in (None, 1),
                            fix="run --level 1 first (with --overwrite to replace the other run)"):
            # A new owner: levels of another run must not stay listed while being rewritten,
            # and those beyond this run's count would stay behind unlisted.
            old = storage.volume_levels(self.url, self.options)
            storage.write_volume_metadata(self.url, [(1, 1, 1)], self.options)
            for k in range(len(self.grids) + 1, len(old)):
                storage.remove(storage.join_url(self.url, str(k)), self.options)
        results = []
        for k, grid in enumerate(self.grids, start=1):
            if level is not None and k != level:
                continue
            phase = f"level{k}"
            if k > 1:
                self._wait(k - 1, wait_timeout)
            src = storage.open_array(storage.join_url(self.url, str(k - 1)), self.options)
            dst = storage.create_level(self.url, k, self.shapes[k], self.level0.dtype,
                                       tuple(min(c, s) for c, s in zip(self.chunks, self.shapes[k])),
                                       attrs=self.level_attrs(k), storage_options=self.options)
            factor = self.steps[k - 1]

            def read(block, src=src, factor=factor, k=k):
                region = Roi(tuple(o * f for o, f in zip(block.write_roi.offset, factor)),
                             tuple(s * f for s, f in zip(block.write_roi.shape, factor)))
                return src[region.intersect(Roi.from_shape(self.shapes[k - 1])).to_slices()]

            def write(block, values, dst=dst):
                dst[block.write_roi.to_slices()] = values

            result = run_phase(self.store, self.spec, phase, grid.blocks(),
                               BlockSteps(read=read, compute=lambda b, x, f=factor: downsample(x, f, self.method),
                                          write=write, parallel=True),
                               shard_index=shard_index, num_shards=num_shards, overwrite=overwrite,
                               threads=2, desc=f"pyramid {phase} of {self.shown} shard {shard_index}/{num_shards}")
            results.append(result)
        complete = self.store.mark_complete_if_done(self.spec)
        if complete:
            storage.write_volume_metadata(self.url, self.cumulative, self.options)
        return {"volume": self.shown, "run_id": self.spec.run_id, "method": self.method,
                "factors": [list(f) for f in self.cumulative], "shapes": [list(s) for s in self.shapes],
                "complete": complete, "blocks_computed": sum(r.blocks_computed for r in results),
                "blocks_skipped": sum(r.blocks_skipped for r in results)}

    def _wait(self, k: int, timeout: float) -> None:
        """Level ``k`` must be complete (all shards) before level ``k+1`` reads it: poll its
        markers (one listing a second) for up to ``timeout`` seconds."""
        from catena_mito.blockwise import signals

        markers = self.store.markers(self.spec.run_id, f"level{k}")
        total = self.grids[k - 1].num_blocks
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            missing = markers.missing(range(total))
            if not missing:
                return
            if time.monotonic() >= deadline:
                waited = f" after waiting {timeout:g} s" if timeout > 0 else ""
                raise PhaseError(
                    f"pyramid level {k} of {self.shown} is not complete{waited}: {len(missing)} of {total} "
                    f"blocks missing (first {missing[:5]}); run the other shards' --level {k} first, "
                    "or start every shard with --wait-timeout")
            signals.raise_if_requested("while waiting for a pyramid level")
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def build_pyramid(
    config: PyramidConfig,
    *,
    shard_index: int = 0,
    num_shards: int = 1,
    overwrite: bool = False,
    replace: bool = False,
    wait_timeout: float = 0.0,
    allow_incomplete: bool = False,
    level: int | None = None,
) -> list[dict]:
    """Build ``config.levels`` coarser levels of each volume (this shard's blocks).

    ``level``: only that level (1-based), for schedulers that run the levels as
    consecutive array jobs; None: every level, each shard waiting (up to
    ``wait_timeout`` seconds) for the others' blocks of the level it reads.
    ``overwrite``: recompute done blocks and replace a pyramid of other settings;
    ``replace``: replace a pyramid of other settings or of an older source, but resume this
    run's done blocks (what predict/label use after they complete). ``wait_timeout``:
    seconds a shard waits for the other shards' blocks of the level it reads. Returns one
    summary per volume. Every volume is planned (and refused) before any is written.
    """
    check_shard(shard_index, num_shards)
    jobs = [_Pyramid(config, url, allow_incomplete) for url in config.volumes]
    return [job.run(shard_index, num_shards, overwrite, replace, wait_timeout, level) for job in jobs]


def plan_text(config: PyramidConfig) -> str:
    """The plan of each volume (``--dry-run``): method, levels, blocks; reads only."""
    lines = []
    for url in config.volumes:
        job = _Pyramid(config, url, allow_incomplete=True)
        claim = job.store.read_claim()
        state = ("new" if claim is None else "this run" if claim.get("run_id") == job.spec.run_id
                 else f"another run ({claim.get('run_id')}): needs --overwrite")
        lines.append(f"{job.shown}: run {job.spec.run_id} ({state}), method {job.method}, "
                     f"block_shape {list(job.block_shape)}")
        for k, grid in enumerate(job.grids, start=1):
            scale, translation = ome.level_transform(job.resolution, job.offset, job.cumulative[k])
            lines.append(f"  level {k}: shape {list(job.shapes[k])}, factor {list(job.cumulative[k])}, "
                         f"scale {scale} nm, translation {translation} nm, {grid.num_blocks} blocks")
    return "\n".join(lines)


def build_after(url: str, levels: int, storage_options: Mapping[str, Any] | None = None) -> dict | None:
    """The hook predict/label call after a shard finishes: once the output at ``url`` is
    complete, ``levels`` coarser levels of it in this process (resuming a pyramid of the
    same run, replacing one of an older output). While other shards still owe blocks,
    nothing: the shard that completes the output builds them. Two shards completing at
    the same moment would both build it, writing the same bytes."""
    if levels <= 0:
        return None
    config = PyramidConfig(volumes=[url], levels=levels, storage_options=dict(storage_options or {}))
    try:
        (summary,) = build_pyramid(config, replace=True)
    except IncompleteInputError as e:
        log.info("pyramid of %s: not yet (%s)", storage.redact_url(url), e)
        return None
    if not summary["complete"]:  # pragma: no cover - one process runs every block
        raise PhaseError(f"pyramid of {storage.redact_url(url)} did not complete")
    return summary
