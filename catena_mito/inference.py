"""Sliding-window inference on a global window grid, whole-volume or block by block.

The **window grid** is global: per axis the window starts are ``0, stride, 2·stride, …``
while a window still fits, plus a last window flush with the far edge
(``start = size - patch``), so every voxel is covered and no window leaves the volume::

    size = 10, patch = 4, stride = 3:   starts 0, 3, 6   (6 + 4 = 10, flush)
    size = 11, patch = 4, stride = 3:   starts 0, 3, 6, 7

A volume smaller than the patch in some axis is refused with a :class:`DataError`
(padding would feed the model content it never saw in training and make the border
depend on the padding rule); use a smaller ``patch_size``.

Each window's per-target probabilities (see :mod:`catena_mito.targets`: softmax channel 1
of a two-channel single-target model, else one sigmoid per target) are weighted by a Gaussian importance map (as MONAI's ``gaussian`` mode: sigma = 0.125 ×
patch per axis, maximum 1, clamped below at 1e-3 so corner voxels keep a usable weight),
and the output is ``Σ w·p / Σ w`` over the windows covering a voxel.

**Block independence, bitwise.** A block computes exactly the windows of the global grid
that intersect its write region (its read region is the union of those windows) and
accumulates only the window ∩ write-region part, in float64, iterating windows in the one
global C order (z start, y start, x start). A voxel's sum is thus over the same windows
added in the same order whichever block computes it. The model itself must give a window
the same output whatever else is in its batch: we always run full batches of
``batch_size`` (the last one padded by repeating a window), because PyTorch's CPU
convolutions take a different code path for a batch of one than for larger batches.
:func:`sliding_window_predict` (whole volume, in memory) is the same code with one block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from catena_mito.blockwise import signals
from catena_mito.blockwise.geometry import Coord, Roi, as_coord
from catena_mito.errors import ConfigError, DataError
from catena_mito.targets import DEFAULT_TARGETS, validate_targets

#: Gaussian sigma as a fraction of the patch size (MONAI's default).
SIGMA_SCALE = 0.125
#: Lowest importance weight, so border voxels covered only by window edges stay defined.
MIN_WEIGHT = 1e-3
TTA_MODES = ("none", "flips")


# --- the window grid ------------------------------------------------------------------------


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Window starts along one axis (voxels): ``0, stride, …`` and one flush with the end."""
    if patch > size:
        raise DataError(f"volume size {size} is smaller than the patch {patch}")
    starts = list(range(0, size - patch, stride))
    starts.append(size - patch)
    return starts


@dataclass(frozen=True)
class WindowGrid:
    """The global grid of sliding windows over a volume (voxels, z, y, x)."""

    volume_shape: Coord
    patch_size: Coord
    stride: Coord

    def __post_init__(self) -> None:
        for name in ("volume_shape", "patch_size", "stride"):
            object.__setattr__(self, name, as_coord(getattr(self, name), name))
        if any(s <= 0 for s in self.stride) or any(p <= 0 for p in self.patch_size):
            raise ConfigError(f"patch_size {list(self.patch_size)} and stride {list(self.stride)} must be positive")
        if any(s > p for s, p in zip(self.stride, self.patch_size)):
            raise ConfigError(
                f"stride {list(self.stride)} must be <= patch_size {list(self.patch_size)} in every axis"
            )
        small = [a for a, v, p in zip("zyx", self.volume_shape, self.patch_size) if v < p]
        if small:
            raise DataError(
                f"volume shape {list(self.volume_shape)} (z, y, x, at the model resolution) is smaller "
                f"than patch_size {list(self.patch_size)} in axis {', '.join(small)}; "
                "use a smaller patch_size (a multiple of the model's down-sampling factor)"
            )

    def starts(self, axis: int) -> list[int]:
        return window_starts(self.volume_shape[axis], self.patch_size[axis], self.stride[axis])

    @property
    def num_windows(self) -> int:
        return math.prod(len(self.starts(a)) for a in range(3))

    def _axis_intersecting(self, axis: int, begin: int, end: int) -> list[int]:
        p = self.patch_size[axis]
        return [s for s in self.starts(axis) if s < end and s + p > begin]

    def windows(self, roi: Roi | None = None) -> list[Roi]:
        """Windows intersecting ``roi`` (all when None), in global C order (z, y, x starts)."""
        roi = Roi.from_shape(self.volume_shape) if roi is None else roi
        per_axis = [self._axis_intersecting(a, roi.begin[a], roi.end[a]) for a in range(3)]
        return [
            Roi((z, y, x), self.patch_size)
            for z in per_axis[0]
            for y in per_axis[1]
            for x in per_axis[2]
        ]

    def read_roi(self, roi: Roi) -> Roi:
        """Union of the windows intersecting ``roi``: what a block writing ``roi`` must read."""
        bounds = []
        for a in range(3):
            starts = self._axis_intersecting(a, roi.begin[a], roi.end[a])
            if not starts:
                return Roi(roi.offset, (0, 0, 0))
            bounds.append((starts[0], starts[-1] + self.patch_size[a]))
        return Roi.from_bounds([b for b, _ in bounds], [e for _, e in bounds])


def importance_map(patch_size: Sequence[int], sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
    """Gaussian weights of one window (z, y, x), float64, max 1, min ``MIN_WEIGHT``."""
    axes = []
    for p in as_coord(patch_size):
        sigma = max(sigma_scale * p, 1e-6)
        x = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
        axes.append(np.exp(-0.5 * (x / sigma) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w /= w.max()
    return np.maximum(w, MIN_WEIGHT)


# --- running the model -----------------------------------------------------------------------


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was requested but no CUDA device is available; use 'auto' or 'cpu'")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device: expected 'auto', 'cpu' or 'cuda', got {device!r}")
    return device


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def precision_name(device: str, amp: bool, precision: str = "auto") -> str:
    """The arithmetic a :class:`ModelRunner` with these settings uses: ``fp32``, ``bf16`` or
    ``fp16`` (autocast of the model's forward pass; probabilities and blending stay fp32).

    ``auto``: with ``amp`` on a CUDA device bf16, or fp16 where the GPU has no bf16 (before
    Ampere); fp32 otherwise (CPU bf16 is slow on most CPUs). ``bf16``/``fp16``: on any
    device, CPU included (bf16 falls back to fp16 on a GPU without bf16).

    Part of a prediction's run identity: reduced precision changes values beyond rounding,
    so shards in other precisions never mix in one output. Across devices in the same
    precision (CPU vs GPU, thread counts) results agree to float32 rounding, which can flip
    a stored uint8 by 1 where ``p * 255`` sits at a rounding boundary.
    """
    import torch

    if precision not in PRECISIONS:
        raise ConfigError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = resolve_device(device)
    cuda = device.startswith("cuda")
    if precision == "auto":
        precision = "bf16" if amp and cuda else "fp32"
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        precision = "fp16"
    return precision


class ModelRunner:
    """Runs a segmentation model on batches of windows and returns per-target probabilities.

    ``model`` maps ``(N, 1, pz, py, px)`` float input to ``(N, C, pz, py, px)`` logits (or
    any callable doing so). The runner puts a module in eval mode, runs under
    ``torch.inference_mode``, always in full batches of ``batch_size`` (padding the last
    one) so a window's result does not depend on its batch, and returns the probabilities
    of ``targets`` (:func:`catena_mito.targets.probabilities`) as float32 ``(N, T, …)``.

    Everything after the host's input batch runs on the model's device: the forward pass,
    softmax/sigmoid, TTA and (:meth:`accumulate`) the weighted sums of a whole block, which
    come back to the host in one copy. On CUDA the input goes through pinned host memory
    (an asynchronous copy).

    ``precision``/``amp``: see :func:`precision_name`. ``tta="flips"``: the mean over the
    identity and the in-plane flips y, x and yx, in that fixed order. ``channels_last``:
    the model and its input in ``torch.channels_last_3d`` memory format (often faster for
    3-D convolutions on GPUs). ``compile``: ``torch.compile`` the model (a slow first batch,
    then faster on GPUs; fixed shapes, since every batch is full).
    """

    def __init__(
        self,
        model: Any,
        batch_size: int = 2,
        device: str = "cpu",
        amp: bool = False,
        tta: str = "none",
        targets: Sequence[str] = DEFAULT_TARGETS,
        precision: str = "auto",
        channels_last: bool = False,
        compile: bool = False,
    ):
        import torch

        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if tta not in TTA_MODES:
            raise ConfigError(f"tta: expected one of {', '.join(TTA_MODES)}, got {tta!r}")
        self.device = resolve_device(device)
        self.precision = precision_name(self.device, amp, precision)
        self.channels_last = bool(channels_last)
        if isinstance(model, torch.nn.Module):
            model = model.to(self.device).eval()
            if self.channels_last:
                model = model.to(memory_format=torch.channels_last_3d)
        if compile:
            model = torch.compile(model, dynamic=False)
        self.model = model
        self.batch_size = int(batch_size)
        self.tta = tta
        self.targets = validate_targets(targets)
        self.pin = self.device.startswith("cuda")
        self.forward_calls = 0
        self.windows_run = 0

    @property
    def amp(self) -> bool:
        return self.precision != "fp32"

    def _logits(self, x: Any) -> Any:
        import torch

        self.forward_calls += 1
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if self.amp:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            with torch.autocast(self.device.split(":")[0], dtype=dtype):
                logits = self.model(x)
        else:
            logits = self.model(x)
        if logits.ndim != 5 or logits.shape[0] != x.shape[0] or logits.shape[2:] != x.shape[2:]:
            raise DataError(
                f"the model returned shape {list(logits.shape)} for input {list(x.shape)}; "
                "expected (N, C, z, y, x) with the input's N and spatial shape"
            )
        return logits.float().contiguous()

    def _probabilities(self, logits: Any, real: int) -> list[Any]:
        """Per-target probabilities (T, z, y, x) of each of the first ``real`` windows of a
        batch's logits, on the device.

        On CPU window by window, on a fresh contiguous tensor: PyTorch's vectorised CPU
        kernels for exp (softmax/sigmoid) split a tensor into SIMD lanes and thread chunks
        by flat position, so a voxel could round differently at another batch position.
        CUDA kernels compute each element alike wherever it sits, so there the batch goes
        in one call. Add/multiply/divide are exactly rounded either way.
        """
        import torch

        from catena_mito.targets import probabilities

        if self.device.startswith("cuda"):
            return list(torch.unbind(probabilities(logits[:real], self.targets)))
        return [probabilities(logits[i : i + 1].contiguous(), self.targets)[0] for i in range(real)]

    def _batch_probabilities(self, x: Any, real: int) -> list[Any]:
        probs = self._probabilities(self._logits(x), real)
        if self.tta == "none":
            return probs
        for dims in ((3,), (4,), (3, 4)):  # in-plane flips y, x, yx of (N, 1, z, y, x)
            back = self._logits(x.flip(dims)).flip(dims)
            probs = [p + q for p, q in zip(probs, self._probabilities(back, real))]
        return [p / 4.0 for p in probs]

    def _batches(self, windows: Callable[[int, int], np.ndarray], n: int) -> Iterator[tuple[int, list[Any]]]:
        """``(first, [probabilities of each real window, on the device])`` per full batch of the ``n`` windows
        ``windows(start, stop) -> (k, pz, py, px)`` (host float32)."""
        import torch

        for start in range(0, n, self.batch_size):
            signals.raise_if_requested("in the middle of a block, which is abandoned")
            batch = windows(start, min(n, start + self.batch_size))
            real = len(batch)
            if real < self.batch_size:  # pad: the batch size must never vary
                batch = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - real, axis=0)], axis=0)
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))[:, None]
            if self.pin:
                x = x.pin_memory()
            x = x.to(self.device, non_blocking=True)
            yield start, self._batch_probabilities(x, real)
            self.windows_run += real

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        """Probabilities (N, T, pz, py, px) float32 of windows (N, pz, py, px) float32."""
        import torch

        n = len(windows)
        out = np.empty((n, len(self.targets), *windows.shape[1:]), dtype=np.float32)
        with torch.inference_mode():
            for start, probs in self._batches(lambda a, b: windows[a:b], n):
                for i, p in enumerate(probs):
                    out[start + i] = p.cpu().numpy()
        return out

    def accumulate(self, data: np.ndarray, read_roi: Roi, windows: Sequence[Roi], extent: Roi,
                   weights: np.ndarray, bits: int) -> np.ndarray:
        """``Σ_w weights · round(p_w · 2^bits)`` over ``windows`` (int64 ``(T, *extent.shape)``).

        ``data`` is the preprocessed ``read_roi``, which contains every window; each window
        lies inside ``extent``. The sums stay on the device; one copy to the host at the end.
        Integer sums do not depend on the order or grouping of the windows (see
        :mod:`catena_mito.exchange`).
        """
        import torch

        n_targets = len(self.targets)
        weights = np.ascontiguousarray(weights, dtype=np.int64)
        batch = np.empty((self.batch_size, *weights.shape), dtype=np.float32)

        def host(a: int, b: int) -> np.ndarray:  # into one reused buffer (no allocation per batch)
            out = batch[: b - a]
            for k, win in enumerate(windows[a:b]):
                out[k] = data[win.to_slices(read_roi)]
            return out

        # p * 2^bits is exact in float32; rint (half to even, as torch.round) to an integer,
        # then exact int64 products and sums, through buffers allocated once per block (a
        # fresh 8-byte-per-voxel tensor per window costs more than the arithmetic).
        if self.device == "cpu":
            # numpy, one thread: these passes are memory-bound, and torch's intra-op threads
            # would only add fork/join barriers (stalls when an I/O thread holds a core).
            acc = np.zeros((n_targets, *extent.shape), dtype=np.int64)
            fbuf = np.empty((n_targets, *weights.shape), dtype=np.float32)
            ibuf = np.empty((n_targets, *weights.shape), dtype=np.int64)
            scale = np.float32(2**bits)
            with torch.inference_mode():
                for start, probs in self._batches(host, len(windows)):
                    for i, p in enumerate(probs):
                        np.multiply(p.numpy(), scale, out=fbuf)
                        np.rint(fbuf, out=fbuf)
                        ibuf[...] = fbuf
                        np.multiply(ibuf, weights, out=ibuf)
                        acc[(slice(None), *windows[start + i].to_slices(extent))] += ibuf
            return acc
        acc_t = torch.zeros((n_targets, *extent.shape), dtype=torch.int64, device=self.device)
        w = torch.from_numpy(weights).to(self.device)
        fbuf_t = torch.empty((n_targets, *weights.shape), dtype=torch.float32, device=self.device)
        ibuf_t = torch.empty((n_targets, *weights.shape), dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            for start, probs in self._batches(host, len(windows)):
                for i, p in enumerate(probs):
                    torch.mul(p, float(2**bits), out=fbuf_t)
                    torch.round(fbuf_t, out=fbuf_t)
                    ibuf_t.copy_(fbuf_t)
                    ibuf_t.mul_(w)
                    acc_t[(slice(None), *windows[start + i].to_slices(extent))] += ibuf_t
        return acc_t.cpu().numpy()


# --- blending -------------------------------------------------------------------------------


def predict_region(
    runner: Callable[[np.ndarray], np.ndarray],
    read_fn: Callable[[Roi], np.ndarray],
    write_roi: Roi,
    grid: WindowGrid,
    batch_size: int | None = None,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Blended probabilities (float32, ``(T, *write_roi.shape)``) of one region.

    Runs every window of ``grid`` that intersects ``write_roi`` (model grid, voxels z, y, x),
    reading their union once through ``read_fn(roi) -> float32 array`` (preprocessed input),
    and accumulates ``w·p`` (every target) and ``w`` over the window ∩ ``write_roi`` part in float32, in
    the global window order: the result for a voxel is bitwise the same for any
    ``write_roi`` containing it (the same windows, added in the same order; at most
    ``prod(ceil(patch / stride))`` terms per voxel, so float32 loses nothing that matters
    and halves the memory traffic of the hot loop). Windows are handed to ``runner`` ``batch_size`` at a time
    (default: ``runner.batch_size``, else 2) so memory stays ``O(batch × patch)``.
    ``runner(windows (N, pz, py, px)) -> (N, T, pz, py, px)`` probabilities; a runner that
    returns ``(N, pz, py, px)`` is one target.
    """
    windows = grid.windows(write_roi)
    if not windows:
        raise ValueError(f"no window intersects {write_roi}")
    read_roi = grid.read_roi(write_roi)
    data = np.asarray(read_fn(read_roi), dtype=np.float32)
    if data.shape != read_roi.shape:
        raise ValueError(f"read_fn returned shape {data.shape} for region {read_roi}")
    w = np.asarray(importance_map(grid.patch_size) if weights is None else weights, dtype=np.float32)
    num: np.ndarray | None = None
    den = np.zeros(write_roi.shape, dtype=np.float32)
    step = batch_size or getattr(runner, "batch_size", 2)
    every = (slice(None),)
    for group in _chunks(windows, step):
        signals.raise_if_requested("in the middle of a block, which is abandoned")
        patches = np.stack([data[win.to_slices(read_roi)] for win in group])
        probs = np.asarray(runner(patches))
        if probs.ndim == 4:  # a plain callable: one target
            probs = probs[:, None]
        if num is None:
            num = np.zeros((probs.shape[1], *write_roi.shape), dtype=np.float32)
        for win, p in zip(group, probs):
            part = win.intersect(write_roi)
            in_win = part.to_slices(win)
            in_out = part.to_slices(write_roi)
            wp = w[in_win]
            # the same float32 operations per target as with one target alone
            num[every + in_out] += wp * p[every + in_win]
            den[in_out] += wp
    num /= den
    return num


def _chunks(items: Sequence[Roi], size: int) -> Iterator[Sequence[Roi]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def predict_block(
    runner: Callable[[np.ndarray], np.ndarray],
    read_fn: Callable[[Roi], np.ndarray],
    block: Any,
    grid: WindowGrid,
) -> np.ndarray:
    """First-target probabilities of a :class:`~catena_mito.blockwise.geometry.Block`'s write
    region (model grid).

    The block's own ``read_roi`` is not used: the read region is the union of the windows
    that touch the write region (:meth:`WindowGrid.read_roi`).
    """
    return predict_region(runner, read_fn, block.write_roi, grid)[0]


def sliding_window_predict(
    model: Any,
    volume: np.ndarray,
    patch_size: Sequence[int],
    stride: Sequence[int] | None = None,
    batch_size: int = 2,
    device: str = "cpu",
    amp: bool = False,
    tta: str = "none",
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> np.ndarray:
    """Probabilities (z, y, x) float32 of a whole, already preprocessed volume; with several
    ``targets``, ``(T, z, y, x)`` in their order.

    ``volume`` is float32 (z, y, x) on the model grid (see
    :func:`catena_mito.preprocess.preprocess_volume`); ``patch_size``/``stride`` in voxels
    (stride defaults to half the patch). The reference for block-wise prediction, which
    gives bitwise the same values.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise DataError(f"expected a (z, y, x) volume, got shape {list(volume.shape)}")
    patch = as_coord(patch_size, "patch_size")
    stride = as_coord(stride, "stride") if stride is not None else default_stride(patch)
    grid = WindowGrid(volume.shape, patch, stride)  # type: ignore[arg-type]
    runner = ModelRunner(model, batch_size=batch_size, device=device, amp=amp, tta=tta, targets=targets)
    vol = volume.astype(np.float32, copy=False)
    probs = predict_region(runner, lambda roi: vol[roi.to_slices()], Roi.from_shape(vol.shape), grid)
    return probs[0] if len(runner.targets) == 1 else probs


def default_stride(patch_size: Sequence[int]) -> Coord:
    """Half the patch (at least 1) per axis."""
    return tuple(max(1, p // 2) for p in as_coord(patch_size))  # type: ignore[return-value]
