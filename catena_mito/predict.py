"""``catena-mito predict``: block-wise sliding-window inference, shardable and resumable.

For every input dataset (``test_zarr_dirs``), the output volume is cut into blocks of
``block_shape`` (voxels of the *output* grid, z, y, x; default :func:`default_block_shape`);
this process computes the blocks of its shard.

``window_sharing: exchange`` (the default; see :mod:`catena_mito.exchange`): every window
of the whole-volume grid runs once, in the block that holds its start. Two phases, each
through the block runner, shards owning contiguous runs of blocks::

    windows  read + preprocess the union of the block's own windows → model, softmax/
             sigmoid, TTA, fixed-point weighted sums on the model's device → one copy
             back → 8 pieces (core + spill into the next blocks) → files → done marker
    predict  (the blend) the pieces landing on the block → ÷ weight sum → encode
             (uint8 = round(p·255) | float16 | float32) → write the block → done marker

``--phase windows`` and ``--phase blend`` run the phases apart (every piece stored);
``--phase all`` runs both in one pass over this shard's blocks, each block's blend right
after its own windows, the pieces that stay in this process in memory
(:mod:`catena_mito.exchange_onepass`). The blend of a block needs its lower neighbours'
windows (the same or a lower shard): ``--phase all`` waits ``wait_timeout`` seconds for a
missing one, then computes that overlap itself (the same integers); ``--phase blend``
fails instead. The stored pieces are removed when the run completes. Integer sums make the output bitwise identical for any
``block_shape``, batch grouping and number of shards, and equal to
:func:`catena_mito.exchange.whole_volume_predict` on the whole preprocessed volume.

``window_sharing: recompute`` (and ``output_res: original`` with resampling, which it
alone serves), one phase::

    output block (write region, whole output chunks)
      │ output_res=original: the model-grid voxels its linear interpolation needs
      ▼
    model-grid region R  ──►  every window of the GLOBAL window grid touching R
      │                        (their union = the region read and preprocessed:
      │                         normalise/CLAHE on the input grid, resample to target_res)
      ▼
    Gaussian-weighted blend of those windows over R  (float32, global window order)
      │ output_res=original: resample R back to the input grid (global formula)
      ▼
    encode → write the block → done marker

Every step computes a voxel from the same inputs in the same order whichever block asks
(see :mod:`catena_mito.inference` and :mod:`catena_mito.preprocess`), so that output too
is bitwise identical for any ``block_shape`` and any number of shards, and equal to
:func:`catena_mito.inference.sliding_window_predict` on the whole preprocessed volume.

A model predicts one or more *targets* (:mod:`catena_mito.targets`): one block computes all
of them at once (the same windows, one forward pass each) and writes each target's chunk
of its own array, so one writer per chunk still holds.

Outputs (Zarr):

* no ``output_dir``: into each input store, at ``output_filename`` or
  ``volumes/predictions/<label_type>``;
* ``output_dir`` ending in ``.zarr`` (one input only): ``<output_dir>/<name>``;
* any other ``output_dir``: ``<output_dir>/<input stem>.zarr/<name>`` per input (stem =
  the input's last path component without ``.zarr``).

That is the foreground's array; every other target of the checkpoint goes beside it at
:func:`catena_mito.targets.prediction_url` (``…/mito_contour``), with the same dtype,
chunks and spatial/OME metadata. Each array carries ``catena_target`` (its target), the
foreground's also ``catena_targets`` (all targets of the run), and all of them
``catena_run``, pointing at the one run record kept with the foreground array.

Each output array carries ``resolution`` and ``offset`` (nm); done markers live under
``<output array>/.catena/predict/done`` and the resolved config (secrets redacted) at
``<output array>/.catena/predict/config.yaml``. A rerun skips blocks marked done;
``overwrite`` clears this shard's markers and recomputes them (and replaces an
incompatible existing output).

``output_format: tiff`` gathers the whole output in memory in one process (``num_shards``
must be 1; no markers, no resume) and writes ``<output_dir or the input's folder>/
<output_filename or <stem>_<label_type>_predictions.tif>``; volumes larger than
:data:`TIFF_MAX_BYTES` (or ``$CATENA_TIFF_MAX_BYTES``) or than half the machine's memory
are refused before any work.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from catena_mito import storage
from catena_mito.blockwise import signals
from catena_mito.blockwise.geometry import Block, BlockGrid, Coord, Roi, check_shard, select_shard
from catena_mito.blockwise.identity import RUN_ATTR
from catena_mito.blockwise.runner import BlockSteps, PhaseResult, run_phase
from catena_mito.blockwise.runs import (
    RunSpec,
    RunStore,
    array_identity,
    checkpoint_identity,
    describe_inputs,
)
from catena_mito.config import PredictConfig, save_resolved_config
from catena_mito.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    PhaseError,
    RunMismatchError,
    Stopped,
    StorageError,
)
from catena_mito.exchange import Exchange, PieceStore
from catena_mito.exchange_onepass import HOLD_BLOCKS, OnePass
from catena_mito.preprocess import GridMap, Preprocessor, normalize
from catena_mito.targets import FOREGROUND, TARGET_ATTR, prediction_url

log = logging.getLogger(__name__)

#: Largest TIFF output gathered in memory (bytes); ``$CATENA_TIFF_MAX_BYTES`` overrides.
TIFF_MAX_BYTES = 8 * 2**30
MARKER_TASK = "predict"
#: The run records' folder inside the output array (see :mod:`catena_mito.blockwise.runs`).
RECORD_DIR = ".catena/predict"
#: Bumped whenever a change in this module or in inference/preprocess changes the values
#: predict writes, so outputs of an older algorithm never pass as current.
ALGORITHM_VERSION = 3  # 2: anti-aliased down-sampling (preprocess.GridMap); 3: windows computed once, fixed-point blend
#: ``window_sharing: exchange``: the phase that runs each block's own windows; the output
#: blocks are then written by the phase named :data:`MARKER_TASK` (the blend).
WINDOWS_PHASE = "windows"
#: ``--phase`` values: both phases in one process, or one of them.
PHASES = ("all", "windows", "blend")
#: ``--phase all`` of several shards: seconds a blend waits for the windows of a lower shard
#: before it computes the missing overlap itself (exact either way). The library call never
#: waits by default; the CLI waits 600 s, for shards started together as pods or array tasks.
DEFAULT_WAIT_SECONDS = 0.0
#: The foreground array's attribute listing every target its run wrote.
TARGETS_ATTR = "catena_targets"


# --- settings resolved from the config and the checkpoint -----------------------------------


@dataclass(frozen=True)
class ModelSettings:
    """What the model needs, resolved from the config, else the checkpoint's training config."""

    model_type: str
    patch_size: Coord
    stride: Coord
    clahe: bool
    targets: tuple[str, ...]
    train_original_res: tuple[float, float, float] | None
    train_target_res: tuple[float, float, float] | None


def _triple(value: Any, field: str) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        value = (value, value, value)
    try:
        items = tuple(value)
    except TypeError:
        items = ()
    if len(items) != 3:
        raise CheckpointError(f"checkpoint training config: {field} is {value!r}, expected 3 values (z, y, x)")
    return items


def resolve_model_settings(config: PredictConfig, ckpt: Mapping[str, Any]) -> ModelSettings:
    """Patch size, stride and CLAHE: the config's, else the training config in ``ckpt``.

    Raises:
        CheckpointError: ``model_type`` given and different from the checkpoint's.
        ConfigError: no patch size anywhere, a stride larger than the patch, or a patch
        the model cannot process.
    """
    from catena_mito.inference import default_stride
    from catena_mito.models import check_patch_size
    from catena_mito.targets import checkpoint_targets

    ckpt_type = ckpt["model_type"]
    if config.model_type is not None and config.model_type != ckpt_type:
        raise CheckpointError(
            f"model_type {config.model_type!r} in the config does not match the checkpoint "
            f"{storage.redact_url(config.model_path)!r}, which holds a {ckpt_type!r} model; "
            "remove model_type from the config or use a matching checkpoint"
        )
    train = dict(ckpt.get("config") or {})
    patch = config.patch_size or _triple(train.get("patch_size"), "patch_size")
    if patch is None:
        raise ConfigError("patch_size is not set and the checkpoint's training config has none; set patch_size")
    patch = tuple(int(p) for p in patch)
    stride = tuple(int(s) for s in (config.stride or default_stride(patch)))
    if any(s > p for s, p in zip(stride, patch)):
        raise ConfigError(f"stride {list(stride)} must be <= patch_size {list(patch)} in every axis")
    check_patch_size(ckpt_type, ckpt["model_params"], patch)
    clahe = bool(train.get("clahe", False)) if config.clahe is None else config.clahe
    return ModelSettings(
        model_type=ckpt_type,
        patch_size=patch,  # type: ignore[arg-type]
        stride=stride,  # type: ignore[arg-type]
        clahe=clahe,
        targets=checkpoint_targets(ckpt),
        train_original_res=_triple(train.get("original_res"), "original_res"),
        train_target_res=_triple(train.get("target_res"), "target_res"),
    )


def resolve_resolutions(
    config: PredictConfig, settings: ModelSettings, raw_res: tuple[float, float, float] | None, raw_url: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(original_res, target_res)`` in nm for one input.

    ``original_res``: the config's, else the raw array's ``resolution`` attribute, else the
    training ``original_res``. ``target_res``: the config's, else the training
    ``target_res``, else ``original_res`` (no resampling). Without any resolution both are
    (1, 1, 1): no resampling.
    """
    original = config.original_res or raw_res or settings.train_original_res
    target = config.target_res or settings.train_target_res
    if original is None:
        if target is not None:
            raise ConfigError(
                f"{storage.redact_url(raw_url)!r} has no 'resolution' attribute and original_res "
                f"is not set, so it cannot be resampled to target_res {list(target)}; set original_res"
            )
        original = target = (1.0, 1.0, 1.0)
    if target is None:
        target = original
    return tuple(float(r) for r in original), tuple(float(r) for r in target)


# --- output locations -----------------------------------------------------------------------


def _stem(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".zarr")] if name.endswith(".zarr") else name


def _parent(url: str) -> str:
    stripped = url.rstrip("/")
    return stripped.rsplit("/", 1)[0] if "/" in stripped else "."


def output_urls(config: PredictConfig) -> list[str]:
    """The output URL of each input, in the order of ``test_zarr_dirs`` (see module doc)."""
    inputs = list(config.test_zarr_dirs)
    if config.output_format == "tiff":
        urls = []
        for url in inputs:
            folder = config.output_dir or _parent(url)
            name = config.output_filename or f"{_stem(url)}_{config.label_type}_predictions.tif"
            urls.append(storage.join_url(folder, name))
    else:
        name = config.output_filename or storage.prediction_path(config.label_type)
        if config.output_dir is None:
            urls = [storage.join_url(url, name) for url in inputs]
        elif config.output_dir.rstrip("/").endswith(".zarr"):
            if len(inputs) > 1:
                raise ConfigError(
                    f"output_dir {storage.redact_url(config.output_dir)!r} is one Zarr store but "
                    f"there are {len(inputs)} test_zarr_dirs; give a folder (outputs go to "
                    "<output_dir>/<input stem>.zarr/...) or one input"
                )
            urls = [storage.join_url(config.output_dir, name)]
        else:
            urls = [storage.join_url(config.output_dir, f"{_stem(url)}.zarr", name) for url in inputs]
    seen: dict[str, str] = {}
    for inp, out in zip(inputs, urls):
        if out in seen:
            raise ConfigError(
                f"inputs {storage.redact_url(seen[out])!r} and {storage.redact_url(inp)!r} would both "
                f"write {storage.redact_url(out)!r}; give them different names or set output_dir/output_filename"
            )
        seen[out] = inp
    return urls


def target_url(foreground_url: str, target: str) -> str:
    """Where ``target``'s output goes, given the foreground's (a TIFF keeps its suffix last)."""
    for suffix in (".tif", ".tiff"):
        if foreground_url.endswith(suffix):
            return prediction_url(foreground_url[: -len(suffix)], target) + suffix
    return prediction_url(foreground_url, target)


# --- encoding -------------------------------------------------------------------------------


def encode(probs: np.ndarray, dtype: str) -> np.ndarray:
    """Probabilities (float32, [0, 1]) in the output dtype: uint8 = round(p·255)."""
    if dtype == "uint8":  # the same float32 operations, in one temporary
        values = np.clip(probs, 0.0, 1.0)
        np.multiply(values, np.float32(255.0), out=values)
        np.rint(values, out=values)
        return values.astype(np.uint8)
    if dtype in ("float16", "float32"):
        return probs.astype(dtype)
    raise ConfigError(f"output_dtype: expected uint8, float16 or float32, got {dtype!r}")


def decode(values: np.ndarray) -> np.ndarray:
    """Stored predictions back to float32 probabilities (uint8 / 255)."""
    if values.dtype == np.uint8:
        return values.astype(np.float32) / np.float32(255.0)
    return values.astype(np.float32)


# --- one input ------------------------------------------------------------------------------


@dataclass
class _Job:
    """Everything needed to compute blocks of one input's output."""

    input_url: str
    output_url: str  # the foreground's
    targets: tuple[str, ...]
    raw_url: str
    raw_identity: dict
    preprocessor: Preprocessor
    window_grid: Any  # inference.WindowGrid
    block_grid: BlockGrid
    back: GridMap | None  # model grid → input grid when output_res is original
    out_res: tuple[float, ...]
    offset: tuple[float, ...]
    original_res: tuple[float, ...]
    target_res: tuple[float, ...]
    #: The ownership plan when windows are shared (``window_sharing: exchange``), else None.
    exchange: Exchange | None = None

    @property
    def sharing(self) -> str:
        return "recompute" if self.exchange is None else "exchange"

    @property
    def target_urls(self) -> dict[str, str]:
        """Every target's output URL, in the targets' order (the foreground's first)."""
        return {t: target_url(self.output_url, t) for t in self.targets}

    def model_region(self, block: Block) -> Roi:
        """The model-grid region whose probabilities the block's write region needs."""
        if self.back is None:
            return block.write_roi
        return self.back.source_roi(block.write_roi, order=1)

    def read_region(self, block: Block) -> Roi:
        return self.window_grid.read_roi(self.model_region(block))

    def compute(self, runner: Any, block: Block, data: np.ndarray) -> np.ndarray:
        """Float32 probabilities ``(T, *write shape)`` of the block's write region from its
        preprocessed read region."""
        from catena_mito.inference import predict_region

        region = self.model_region(block)
        read_roi = self.read_region(block)

        def read(roi: Roi) -> np.ndarray:
            if roi != read_roi:  # pragma: no cover - guarded by construction
                raise RuntimeError(f"unexpected read {roi}, prefetched {read_roi}")
            return data

        probs = predict_region(runner, read, region, self.window_grid)
        if self.back is None:
            return probs
        return np.stack([self.back.resample(p, region, block.write_roi, order=1) for p in probs])


def _make_job(config: PredictConfig, settings: ModelSettings, input_url: str, output_url: str) -> _Job:
    from catena_mito.inference import WindowGrid

    raw_url = storage.join_url(input_url, storage.RAW_PATH)
    raw = storage.open_volume(raw_url, config.storage_options)
    raw_res, raw_offset = storage.read_spatial(raw)
    try:  # refuse an unusable dtype now, not in the first block after the output exists
        normalize(np.zeros((1, 1, 1), raw.dtype))
    except DataError as e:
        raise DataError(f"{storage.redact_url(raw_url)!r}: {e}") from None
    original_res, target_res = resolve_resolutions(config, settings, raw_res, raw_url)
    pre = Preprocessor(raw, original_res, target_res, clahe=settings.clahe)
    try:
        wgrid = WindowGrid(pre.shape, settings.patch_size, settings.stride)
    except DataError as e:
        raise DataError(f"{storage.redact_url(raw_url)!r} (shape {list(raw.shape)} at {list(original_res)} nm): {e}") from None
    resampled_back = config.output_res == "original" and tuple(original_res) != tuple(target_res)
    if config.output_res == "original":
        back = GridMap.between(pre.shape, target_res, original_res, dst_shape=raw.shape)
        out_shape, out_res = tuple(raw.shape), original_res
    else:
        back, out_shape, out_res = None, pre.shape, target_res
    block_shape = config.block_shape or default_block_shape(settings.patch_size, settings.stride,
                                                            config.output_chunks, out_shape)
    block_grid = BlockGrid(out_shape, block_shape)
    exchange = None
    if config.window_sharing == "exchange" and not resampled_back and tuple(pre.shape) == tuple(out_shape):
        back = None  # the model grid is the output grid
        exchange = Exchange.of(wgrid, block_grid)
    elif config.window_sharing == "exchange":
        log.info("%s: output_res original resamples the output, so every block recomputes the windows "
                 "that touch it (window_sharing recompute)", storage.redact_url(input_url))
    return _Job(
        input_url=input_url,
        output_url=output_url,
        targets=settings.targets,
        raw_url=raw_url,
        raw_identity=array_identity(raw, raw_url, config.storage_options),
        preprocessor=pre,
        window_grid=wgrid,
        block_grid=block_grid,
        back=back,
        out_res=out_res,
        offset=raw_offset,
        original_res=original_res,
        target_res=target_res,
        exchange=exchange,
    )


def default_block_shape(patch: Coord, stride: Coord, chunks: Coord, volume_shape: Coord) -> Coord:
    """Per axis the smallest multiple of lcm(chunk, stride) that is >= max(128, 2·patch),
    capped at the volume rounded up to whole chunks (one block).

    Why: a multiple of the chunk keeps one writer per chunk; a multiple of the stride gives
    every block the same rows of windows and a spill of ``patch - stride`` into the next
    block; at least twice the patch keeps that spill (stored and exchanged between blocks)
    under the block's own size.
    """
    out = []
    for p, s, c, v in zip(patch, stride, chunks, volume_shape):
        unit = math.lcm(int(c), int(s))
        want = -(-max(128, 2 * int(p)) // unit) * unit
        out.append(min(want, -(-int(v) // int(c)) * int(c)))
    return tuple(out)  # type: ignore[return-value]


def _resolved(config: PredictConfig, settings: ModelSettings, job: _Job) -> PredictConfig:
    return config.model_copy(
        update={
            "patch_size": settings.patch_size,
            "stride": settings.stride,
            "clahe": settings.clahe,
            "model_type": settings.model_type,
            "original_res": job.original_res,
            "target_res": job.target_res,
            "block_shape": job.block_grid.block_shape,
        }
    )


# --- run identity ---------------------------------------------------------------------------


def run_spec(config: PredictConfig, settings: ModelSettings, job: _Job, model_identity: Mapping[str, Any],
             precision: str) -> RunSpec:
    """What determines one output: model, input, the settings that change values, the plan.

    Not in it: ``batch_size``, ``num_workers``, the device beyond its precision, and the
    shard count, which change no value (the runner pads batches to a fixed size; see
    :class:`~catena_mito.inference.ModelRunner` for the tolerance across devices).
    """
    description = {
        "algorithm": ALGORITHM_VERSION,
        "inputs": describe_inputs({"model": (config.model_path, model_identity), "raw": (job.raw_url, job.raw_identity)}),
        "settings": {
            "patch_size": list(settings.patch_size), "stride": list(settings.stride), "clahe": settings.clahe,
            "tta": config.tta, "original_res": list(job.original_res), "target_res": list(job.target_res),
            "output_res": config.output_res, "output_dtype": config.output_dtype, "precision": precision,
            "targets": list(settings.targets), "window_sharing": job.sharing,
            "channels_last": config.channels_last, "compile": config.compile,
        },
        "plan": {"shape": list(job.block_grid.volume_shape), "block_shape": list(job.block_grid.block_shape),
                 "output_chunks": list(config.output_chunks)},
    }
    n = job.block_grid.num_blocks
    phases = ((WINDOWS_PHASE, n), (MARKER_TASK, n)) if job.exchange is not None else ((MARKER_TASK, n),)
    return RunSpec(MARKER_TASK, description, phases)


def record_url(output_url: str) -> str:
    """Where the run records of a prediction output live (inside the array's folder)."""
    return storage.join_url(output_url, RECORD_DIR)


def run_store(output_url: str, storage_options: Mapping[str, Any] | None = None,
              outputs: Sequence[str] = ()) -> RunStore:
    """The run records of the prediction output at ``output_url``; ``outputs``: the arrays
    the run writes (every target's), swept of killed writers' temporaries at completion."""
    return RunStore(record_url(output_url), storage_options, shown=f"output {storage.redact_url(output_url)!r}",
                    outputs=outputs)


def _output_attrs(config: PredictConfig, job: _Job, spec: RunSpec, target: str = FOREGROUND) -> dict[str, Any]:
    """The attributes of ``target``'s array; ``catena_run`` points at the foreground's record."""
    from catena_mito.blockwise.runs import relative_url

    url = job.target_urls[target]
    attrs: dict[str, Any] = {
        **storage.spatial_attrs(job.out_res, job.offset),
        "catena_predict": {
            "input": storage.redact_url(job.input_url),
            "output_dtype": config.output_dtype,
            "uint8_scale": 255 if config.output_dtype == "uint8" else None,
        },
        TARGET_ATTR: target,
        RUN_ATTR: {"task": MARKER_TASK, "run_id": spec.run_id,
                   "record": relative_url(url, record_url(job.output_url))},
    }
    if target == FOREGROUND:
        attrs[TARGETS_ATTR] = list(job.targets)
    return attrs


def _open_output(config: PredictConfig, job: _Job, url: str, attrs: Mapping[str, Any], overwrite: bool):
    shape = job.block_grid.volume_shape
    if storage.array_exists(url, config.storage_options):
        existing = storage.open_array(url, config.storage_options, mode="r+")
        same = (
            tuple(existing.shape) == tuple(shape)
            and existing.dtype == np.dtype(config.output_dtype)
            and tuple(existing.chunks) == tuple(config.output_chunks)
        )
        if same and all(existing.attrs.get(k) == v for k, v in attrs.items()):
            # Concurrent shards: don't rewrite identical metadata under each other's feet.
            return existing
    return storage.create_array(
        url,
        shape,
        config.output_dtype,
        config.output_chunks,
        overwrite=overwrite,
        attrs=attrs,
        storage_options=config.storage_options,
    )


def _steps(job: _Job, runner: Any, config: PredictConfig, write: Callable[[Block, np.ndarray], None]) -> BlockSteps:
    return BlockSteps(
        read=lambda b: job.preprocessor(job.read_region(b)),
        compute=lambda b, data: encode(job.compute(runner, b, data), config.output_dtype),
        write=lambda b, values: write(b, values) or {"write_offset": list(b.write_roi.offset),
                                                     "write_shape": list(b.write_roi.shape)},
    )


class _WindowsDone:
    """Which blocks' windows phase is done: a cache of the markers, listed again only when a
    block asks for one not seen done yet (one listing a second at most while waiting)."""

    def __init__(self, markers: Any):
        self.markers = markers
        self.done: set[int] = set()
        self.lock = threading.Lock()

    def missing(self, indices: set[int], timeout: float) -> set[int]:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            with self.lock:
                need = indices - self.done
                if need:
                    self.done |= self.markers.done_indices()
                    need = indices - self.done
            if not need or time.monotonic() >= deadline:
                return need
            signals.raise_if_requested("while waiting for the windows of other shards")
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


class _ExchangeParts:
    """What the windows phase, the blend and the one pass of ``--phase all`` share (see
    :mod:`catena_mito.exchange` and :mod:`catena_mito.exchange_onepass`).

    A piece from another block is read from ``pieces`` once that block's windows marker is
    done (waiting ``wait_timeout`` seconds for it); one not done by then, or unreadable, is
    with ``compute_missing`` computed here from the same windows (exact: the same
    integers), else a :class:`PhaseError`."""

    def __init__(self, job: _Job, runner: Any, pieces: PieceStore, done: _WindowsDone | None,
                 wait_timeout: float, compute_missing: bool):
        assert job.exchange is not None
        self.job, self.ex, self.runner, self.pieces = job, job.exchange, runner, pieces
        self.done, self.wait_timeout, self.compute_missing = done, wait_timeout, compute_missing

    def prepared(self, block: Block, within: Roi | None = None) -> tuple[list[Roi], Roi | None, np.ndarray | None]:
        """The windows ``block`` owns (those meeting ``within``), their union and its
        preprocessed data."""
        wins = self.ex.owned_windows(block, within)
        roi = self.ex.read_roi(wins)
        return wins, roi, (self.job.preprocessor(roi) if roi is not None else None)

    def fetch(self, block: Block, sources: Sequence[tuple[Block, Coord]]) -> tuple[list, list]:
        """``(got, missing)`` of the pieces of ``sources`` landing on ``block``: ``(kind,
        array)`` read, and ``(kind, source, windows, roi, data)`` to compute here."""
        missing = (self.done.missing({src.index for src, _ in sources}, self.wait_timeout)
                   if self.done is not None else set())
        got: list = []
        todo: list = []
        for src, kind in sources:
            problem = f"the windows phase of block {src.index} is not done" if src.index in missing else None
            if problem is None:
                try:
                    got.append((kind, self.pieces.get(src.index, kind)))
                    continue
                except StorageError as e:
                    problem = f"its pieces cannot be read ({e})"
            if not self.compute_missing:
                waited = f" after {self.wait_timeout:g} s" if self.wait_timeout > 0 else ""
                raise PhaseError(
                    f"predict blend of block {block.index} at {storage.redact_url(self.job.output_url)!r}: "
                    f"{problem}{waited}; run `catena-mito predict --phase windows` for every shard first "
                    "(--overwrite if its pieces were removed; an interrupted --phase all keeps the pieces "
                    "its own blocks need in memory: rerun it), or give --wait-timeout")
            todo.append((kind, src, *self.prepared(src, within=block.write_roi)))
        return got, todo

    def overlap(self, todo: list) -> list[tuple[Coord, np.ndarray]]:
        """The pieces of :meth:`fetch`'s ``missing`` entries, computed here."""
        return [(kind, self.ex.partial(self.runner, src, x, roi, wins)[kind]) for kind, src, wins, roi, x in todo]


def _exchange_steps(parts: _ExchangeParts, config: PredictConfig,
                    write: Callable[[Block, np.ndarray], None]) -> tuple[BlockSteps, BlockSteps]:
    """The steps of the windows phase and of the blend (see :mod:`catena_mito.exchange`).

    The blend of a block needs the pieces of its lower neighbours (same or lower shard, by
    the contiguous assignment); see :class:`_ExchangeParts` for one not done."""
    ex = parts.ex

    def write_pieces(block: Block, pieces: Mapping[Any, np.ndarray]) -> dict[str, Any]:
        parts.pieces.put(block.index, pieces)
        return {"pieces": len(pieces)}

    windows = BlockSteps(
        read=parts.prepared,
        compute=lambda b, data: ex.partial(parts.runner, b, data[2], data[1], data[0]),
        write=write_pieces,
    )

    def compute_blend(block: Block, data: tuple[list, list]) -> np.ndarray:
        got, todo = data
        if todo:
            log.info("blend of block %d: computing the overlap of %d neighbour block(s) here (%s)", block.index,
                     len(todo), "not done by their shards yet" if parts.done is not None else "missing")
        return encode(ex.blend(block, [*got, *parts.overlap(todo)]), config.output_dtype)

    def write_output(block: Block, values: np.ndarray) -> dict[str, Any]:
        write(block, values)
        return {"write_offset": list(block.write_roi.offset), "write_shape": list(block.write_roi.shape)}

    blend = BlockSteps(read=lambda b: parts.fetch(b, ex.sources(b)), compute=compute_blend, write=write_output)
    return windows, blend


def _stored_whole(windows_markers: Any, indices: set[int]) -> set[int]:
    """Those of ``indices`` whose windows marker says every piece was stored (a ``--phase
    windows`` run; a one pass's marker lists the pieces it ``held`` in memory, its own core
    always among them): one listing, and a read of each such marker only."""
    out = set()
    for index in sorted(indices & windows_markers.done_indices()):
        try:
            info = windows_markers.read(index)
        except StorageError:
            continue  # removed meanwhile: computed again
        if not info.get("held"):
            out.add(index)
    return out


def _one_pass(parts: _ExchangeParts, config: PredictConfig, write: Callable[[Block, np.ndarray], None],
              shard: Sequence[Block], todo: Sequence[Block],
              mark_windows: Callable[[Block, Mapping[str, Any]], None] | None,
              stored: set[int] | None = None) -> OnePass:
    """``--phase all``: both phases of this shard in one pass (:mod:`catena_mito.exchange_onepass`)."""
    return OnePass(parts.ex, parts.runner, parts.pieces, shard=[b.index for b in shard],
                   todo=[b.index for b in todo], stored=stored or (), prepared=parts.prepared, fetch=parts.fetch,
                   overlap=parts.overlap, finish=lambda b, p: encode(p, config.output_dtype),
                   write_output=write, mark_windows=mark_windows)


def _open_outputs(config: PredictConfig, job: _Job, spec: RunSpec, store: RunStore, phase: str,
                  overwrite: bool) -> list[Any]:
    """The output arrays (one per target), created or checked; claims the run in its first phase."""
    opts = config.storage_options
    claim = store.read_claim()
    first = phase != "blend"
    if claim is not None and claim.get("run_id") != spec.run_id and not (overwrite and first):
        raise RunMismatchError(store.mismatch_message(  # before anything is written
            claim, spec, "" if first else "run --phase windows (or all) of this config first"))
    if not first:
        if claim is None:
            raise PhaseError(f"{store.shown} has no run recorded; run `catena-mito predict --phase windows` first")
        return [storage.open_array(url, opts, mode="r+") for url in job.target_urls.values()]
    existed = storage.array_exists(job.output_url, opts)
    # The other targets first: the foreground array (with the record) is the run's face.
    arrays = {t: _open_output(config, job, url, _output_attrs(config, job, spec, t), overwrite)
              for t, url in reversed(job.target_urls.items())}
    if not existed and claim is not None:
        # The array was deleted but its records were not (object stores): nothing is done.
        storage.remove(store.url("runs"), opts)
    store.claim(spec, overwrite=overwrite)
    return [arrays[t] for t in job.targets]


def _predict_zarr(config: PredictConfig, settings: ModelSettings, runner: Any, job: _Job, spec: RunSpec,
                  shard_index: int, num_shards: int, overwrite: bool, phase: str = "all",
                  wait_timeout: float = DEFAULT_WAIT_SECONDS) -> dict[str, Any]:
    opts = config.storage_options
    store = run_store(job.output_url, opts, outputs=list(job.target_urls.values()))
    arrays = _open_outputs(config, job, spec, store, phase, overwrite)
    save_resolved_config(_resolved(config, settings, job), store.url("config.yaml"), opts)

    def write(block: Block, values: np.ndarray) -> None:
        for arr, target_values in zip(arrays, values):
            arr[block.write_roi.to_slices()] = target_values

    windows_before = getattr(runner, "windows_run", 0)
    common = {"shard_index": shard_index, "num_shards": num_shards, "overwrite": overwrite,
              "threads": max(1, config.num_workers)}
    blocks = job.block_grid.blocks()
    if job.exchange is None:
        result = run_phase(store, spec, MARKER_TASK, blocks, _steps(job, runner, config, write),
                           desc=f"predict shard {shard_index}/{num_shards}", **common)
        return _summary(job, result, getattr(runner, "windows_run", 0) - windows_before, spec)
    pieces = PieceStore(store.run_url(spec.run_id, WINDOWS_PHASE, "pieces"), opts)
    done = _WindowsDone(store.markers(spec.run_id, WINDOWS_PHASE))
    parts = _ExchangeParts(job, runner, pieces, done, wait_timeout, compute_missing=phase == "all")
    if phase == "all":
        results = [_run_one_pass(store, spec, parts, config, write, blocks, common)]
    else:
        windows_steps, blend_steps = _exchange_steps(parts, config, write)
        steps = windows_steps if phase == "windows" else blend_steps
        results = [run_phase(store, spec, WINDOWS_PHASE if phase == "windows" else MARKER_TASK, blocks, steps,
                             assignment="contiguous", desc=f"predict {phase} shard {shard_index}/{num_shards}",
                             **common)]
    if phase != "windows" and store.read_complete(spec.run_id) is not None:
        pieces.remove()  # every block is blended: the intermediate sums are no longer needed
    return _summary(job, results[-1], getattr(runner, "windows_run", 0) - windows_before, spec, results)


def _run_one_pass(store: RunStore, spec: RunSpec, parts: _ExchangeParts, config: PredictConfig,
                  write: Callable[[Block, np.ndarray], None], blocks: Sequence[Block],
                  common: Mapping[str, Any]) -> PhaseResult:
    """``--phase all`` of ``window_sharing: exchange``: this shard's windows and blend in one
    pass over its blocks; both phases' markers and shard records, as if run apart."""
    shard_index, num_shards, overwrite = common["shard_index"], common["num_shards"], common["overwrite"]
    mine = select_shard(blocks, shard_index, num_shards, "contiguous")
    windows_markers = store.markers(spec.run_id, WINDOWS_PHASE)
    if overwrite:
        windows_markers.clear([b.index for b in mine])
        done: set[int] = set()
    else:
        done = store.markers(spec.run_id, MARKER_TASK).done_indices()
    todo = [b for b in mine if b.index not in done]
    stored = _stored_whole(windows_markers, {b.index for b in todo}) if not overwrite else set()

    def mark_windows(block: Block, info: Mapping[str, Any]) -> None:
        windows_markers.mark_done(block.index, {"shard": shard_index, "num_shards": num_shards, **info})

    onepass = _one_pass(parts, config, write, mine, todo, mark_windows, stored)
    record = {"blocks": len(mine), "assignment": "contiguous"}
    store.write_shard_record(spec.run_id, WINDOWS_PHASE, shard_index, num_shards, "running", todo=len(todo),
                             **record)
    state = "failed"
    try:
        result = run_phase(store, spec, MARKER_TASK, blocks, onepass.steps(), assignment="contiguous",
                           desc=f"predict shard {shard_index}/{num_shards}", **common)
        state = "finished"
        return result
    except Stopped:
        state = "stopped"
        raise
    finally:
        store.write_shard_record(spec.run_id, WINDOWS_PHASE, shard_index, num_shards, state, **record)


def _summary(job: _Job, result: PhaseResult, windows: int, spec: RunSpec | None,
             phases: list[PhaseResult] | None = None) -> dict[str, Any]:
    """The summary of one output; the block counts are those of the phase that writes the
    output (the windows phase's when only it ran); ``phases`` has each phase run."""
    return {
        "input": storage.redact_url(job.input_url),
        "output": storage.redact_url(job.output_url),
        "targets": {t: storage.redact_url(u) for t, u in job.target_urls.items()},
        "run_id": spec.run_id if spec is not None else None,
        "shape": list(job.block_grid.volume_shape),
        "resolution": list(job.out_res),
        "blocks_total": result.blocks_total,
        "blocks_in_shard": result.blocks_in_shard,
        "blocks_computed": result.blocks_computed,
        "blocks_skipped": result.blocks_skipped,
        "windows_run": windows,
        "phases": {r.phase: {"blocks_computed": r.blocks_computed, "blocks_skipped": r.blocks_skipped}
                   for r in (phases or [result])},
    }


def tiff_limit_bytes() -> int:
    """The largest TIFF output gathered in memory: the env override, else the constant,
    and never more than half the physical memory."""
    env = os.environ.get("CATENA_TIFF_MAX_BYTES")
    limit = int(env) if env else TIFF_MAX_BYTES
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        limit = min(limit, physical // 2)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        pass
    return limit


def _predict_tiff(config: PredictConfig, settings: ModelSettings, runner: Any, job: _Job) -> dict[str, Any]:
    shape = job.block_grid.volume_shape
    nbytes = int(np.prod(shape)) * np.dtype(config.output_dtype).itemsize * len(job.targets)
    limit = tiff_limit_bytes()
    if nbytes > limit:
        raise ConfigError(
            f"output_format 'tiff' gathers the whole output in memory: {list(shape)} {config.output_dtype} "
            f"is {nbytes / 2**30:.2f} GiB, over the limit of {limit / 2**30:.2f} GiB "
            "($CATENA_TIFF_MAX_BYTES); use output_format 'zarr'"
        )
    out = np.zeros((len(job.targets), *shape), dtype=config.output_dtype)

    def write(block: Block, values: np.ndarray) -> None:
        out[(slice(None), *block.write_roi.to_slices())] = values

    windows_before = getattr(runner, "windows_run", 0)
    threads = max(1, config.num_workers)
    blocks = job.block_grid.blocks()
    if job.exchange is None:
        result = run_phase(None, None, MARKER_TASK, blocks, _steps(job, runner, config, write),
                           threads=threads, desc="predict (tiff)")
    else:  # both phases in one pass, the pieces in memory
        parts = _ExchangeParts(job, runner, PieceStore(None), None, 0.0, compute_missing=False)
        onepass = _one_pass(parts, config, write, blocks, blocks, None)
        result = run_phase(None, None, MARKER_TASK, blocks, onepass.steps(), threads=threads, desc="predict (tiff)")
    for target_values, url in zip(out, job.target_urls.values()):
        storage.write_tiff(url, target_values, job.out_res, job.offset, config.storage_options)
    save_resolved_config(_resolved(config, settings, job), job.output_url + ".config.yaml", config.storage_options)
    return _summary(job, result, getattr(runner, "windows_run", 0) - windows_before, None)


# --- the job --------------------------------------------------------------------------------


def _size_torch_threads() -> None:
    """torch's intra-op threads follow the CPUs this process may use (affinity, cgroup
    quota), not the node's core count, unless ``OMP_NUM_THREADS`` says otherwise: 64
    threads in a 4-CPU pod are throttled, not fast."""
    import torch

    from catena_mito.blockwise.cpus import available_cpus

    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(available_cpus())


def _checkpoint_bytes(url: str, storage_options: Mapping[str, Any]) -> bytes:
    try:
        return storage.read_bytes(url, storage_options)
    except storage.StorageError as e:
        raise CheckpointError(f"cannot read checkpoint {storage.redact_url(url)}: {e}") from e


def predict(config: PredictConfig, shard_index: int = 0, num_shards: int = 1, overwrite: bool = False,
            *, dry_run: bool = False, phase: str = "all", wait_timeout: float = DEFAULT_WAIT_SECONDS) -> dict:
    """Run shard ``shard_index`` of ``num_shards`` of a prediction job; return a summary.

    The summary: ``{"shard_index", "num_shards", "seconds", "outputs": [per input: input,
    output, run_id, shape, resolution, blocks_total, blocks_in_shard, blocks_computed,
    blocks_skipped, windows_run]}``. ``dry_run``: plan only (see :func:`plan_summary`),
    nothing is written; the summary is ``{"dry_run": True, "outputs": [plans]}``.

    ``phase`` (``window_sharing: exchange``): ``all`` runs this shard's windows and blend
    in one pass; a blend whose lower neighbours' windows are not done after ``wait_timeout``
    seconds computes that overlap itself. ``windows`` / ``blend`` run one phase; the blend
    then waits up to ``wait_timeout`` seconds and fails (PhaseError) if they never come.

    Raises:
        ShardError/ConfigError: bad shard, TIFF with several shards or too large, patch
        or stride problems, outputs that would collide.
        RunMismatchError: an output holds another run's result (other model, settings,
        plan or input) and ``overwrite`` is off.
        CheckpointError: missing/unreadable checkpoint, model_type mismatch.
        DataError: raw data not 3-D, or smaller than a patch at the model resolution.
        StorageError: unreadable input or incompatible existing output.
    """
    from catena_mito.inference import ModelRunner, precision_name
    from catena_mito.model_export import build_predict_model, load_model_source

    start = time.perf_counter()
    check_shard(shard_index, num_shards)
    if phase not in PHASES:
        raise ConfigError(f"phase: expected one of {', '.join(PHASES)}, got {phase!r}")
    if config.output_format == "tiff" and num_shards != 1:
        raise ConfigError(
            f"output_format 'tiff' is a single-process gather; num_shards must be 1, got {num_shards} "
            "(use output_format 'zarr' to shard)"
        )
    urls = output_urls(config)
    ckpt = load_model_source(config.model_path, config.storage_options)  # a checkpoint or an exported model
    settings = resolve_model_settings(config, ckpt)
    model_identity = checkpoint_identity(_checkpoint_bytes(config.model_path, config.storage_options),
                                         settings.model_type)
    # Plan every input before any work: a bad input is reported before outputs are touched.
    jobs = [_make_job(config, settings, inp, out) for inp, out in zip(config.test_zarr_dirs, urls)]
    if phase != "all" and any(job.exchange is None for job in jobs):
        raise ConfigError(f"--phase {phase}: only window_sharing 'exchange' has phases, and this job "
                          "recomputes windows (window_sharing recompute, or output_res original with "
                          "resampling); use --phase all")
    if phase != "all" and config.output_format == "tiff":
        raise ConfigError(f"--phase {phase}: output_format 'tiff' runs both phases in one process; use --phase all")
    precision = precision_name(config.device, config.amp, config.precision)
    specs = [run_spec(config, settings, job, model_identity, precision) for job in jobs]
    if dry_run:
        plans = [plan_summary(config, settings, job, spec, shard_index, num_shards) for job, spec in zip(jobs, specs)]
        return {"dry_run": True, "shard_index": shard_index, "num_shards": num_shards, "outputs": plans}
    _size_torch_threads()
    model = build_predict_model(ckpt)
    del ckpt
    runner = ModelRunner(model, batch_size=config.batch_size, device=config.device, amp=config.amp, tta=config.tta,
                         targets=settings.targets, precision=config.precision,
                         channels_last=config.channels_last, compile=config.compile)
    results = []
    for job, spec in zip(jobs, specs):
        if config.output_format == "tiff":
            results.append(_predict_tiff(config, settings, runner, job))
        else:
            results.append(_predict_zarr(config, settings, runner, job, spec, shard_index, num_shards, overwrite,
                                         phase, wait_timeout))
            if config.pyramid_levels:  # the shard that completes the output builds its levels
                from catena_mito.pyramid import build_after

                build_after(job.output_url, config.pyramid_levels, config.storage_options)
    summary = {
        "shard_index": shard_index,
        "num_shards": num_shards,
        "seconds": time.perf_counter() - start,
        "outputs": results,
    }
    log.info(
        "predict shard %d/%d: %d blocks computed, %d skipped (done), %d windows, %.1f s",
        shard_index, num_shards, sum(r["blocks_computed"] for r in results),
        sum(r["blocks_skipped"] for r in results), sum(r["windows_run"] for r in results), summary["seconds"],
    )
    return summary


def plan_summary(config: PredictConfig, settings: ModelSettings, job: _Job, spec: RunSpec,
                 shard_index: int, num_shards: int) -> dict[str, Any]:
    """What a run would do, without doing it: volume, blocks, windows, memory, output size,
    and what the output holds now (read only)."""
    blocks = job.block_grid.blocks()
    ex = job.exchange
    assignment = "round_robin" if ex is None else "contiguous"
    mine = select_shard(blocks, shard_index, num_shards, assignment)
    write_voxels = max(b.write_roi.size for b in blocks)
    patch = math.prod(settings.patch_size)
    ahead = max(1, config.num_workers) + 1
    n_targets = len(job.targets)
    if ex is None:  # every window that touches a block
        per_block = [len(job.window_grid.windows(job.model_region(b))) for b in blocks]
        read_voxels = max(job.read_region(b).size for b in blocks)
        sums = 4 * (1 + n_targets) * write_voxels  # float32 num (per target) and den
    else:  # the windows each block owns
        per_block = [len(ex.owned_windows(b)) for b in blocks]
        read_voxels = max((r.size for b in blocks if (r := ex.read_roi(ex.owned_windows(b))) is not None), default=0)
        sums = 8 * n_targets * max(ex.extent(b).size for b in blocks)  # int64 sums of core + halo
        # --phase all: the spills kept for the next blocks (exchange_onepass.HOLD_BLOCKS at most)
        sums += 8 * n_targets * write_voxels * HOLD_BLOCKS
    # blocks read ahead + the one computing (float32), the block's sums and its encoded output,
    # a batch of windows in and out (x4 with flips TTA); plus the model.
    peak = (4 * read_voxels * (ahead + 1) + sums + n_targets * write_voxels
            + 4 * config.batch_size * patch * (1 + n_targets) * (4 if config.tta == "flips" else 1))
    itemsize = np.dtype(config.output_dtype).itemsize
    plan = {
        "input": storage.redact_url(job.input_url),
        "output": storage.redact_url(job.output_url),
        "run_id": spec.run_id,
        "output_shape": list(job.block_grid.volume_shape),
        "output_dtype": config.output_dtype,
        "targets": list(job.targets),
        "output_bytes": int(math.prod(job.block_grid.volume_shape)) * itemsize * len(job.targets),
        "model_grid_shape": list(job.window_grid.volume_shape),
        "block_shape": list(job.block_grid.block_shape),
        "blocks_total": len(blocks),
        "blocks_per_shard": [len(select_shard(blocks, k, num_shards, assignment)) for k in range(num_shards)],
        "window_sharing": job.sharing,
        "blocks_in_this_shard": len(mine),
        "windows_whole_volume": job.window_grid.num_windows,
        "windows_per_block_max": max(per_block),
        "windows_all_blocks": sum(per_block),
        "windows_this_shard": sum(per_block[b.index] for b in mine),
        "peak_memory_bytes_per_worker": int(peak),
        "output_state": "new",
    }
    if config.output_format == "zarr":
        store = run_store(job.output_url, config.storage_options)
        claim = store.read_claim()
        if claim is None:
            plan["output_state"] = "new" if not storage.array_exists(job.output_url, config.storage_options) else "unclaimed"
        elif claim.get("run_id") == spec.run_id:
            done = store.markers(spec.run_id, MARKER_TASK).done_indices()
            plan["output_state"] = f"this run: {len(done)} of {len(blocks)} blocks done"
        else:
            plan["output_state"] = f"another run ({store.mismatch_message(claim, spec)})"
    return plan


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(plan: Mapping[str, Any]) -> str:
    lines = [
        f"predict {plan['input']} -> {plan['output']} (run {plan['run_id']})",
        f"  output      {plan['output_shape']} {plan['output_dtype']}, {format_bytes(plan['output_bytes'])}"
        f" (model grid {plan['model_grid_shape']}; targets {', '.join(plan['targets'])})",
        f"  blocks      {plan['blocks_total']} of {plan['block_shape']}; per shard {_counts(plan['blocks_per_shard'])}"
        f"; this shard {plan['blocks_in_this_shard']}",
        f"  windows     {plan['windows_all_blocks']} over all blocks ({plan['windows_per_block_max']} per block at most)"
        f", {plan['windows_whole_volume']} in one whole-volume pass"
        f" ({plan['windows_all_blocks'] / max(1, plan['windows_whole_volume']):.2f}x, window_sharing "
        f"{plan['window_sharing']}); this shard {plan['windows_this_shard']}",
        f"  memory      about {format_bytes(plan['peak_memory_bytes_per_worker'])} of data buffers per worker, plus the model",
        f"  output now  {plan['output_state']}",
    ]
    return "\n".join(lines)


def _counts(values: list[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"
