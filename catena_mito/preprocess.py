"""The one preprocessing of raw EM data, shared by training, evaluation and prediction.

Pipeline, applied to the raw input on its own grid (``original_res``) and then mapped to the
model's grid (``target_res``)::

    raw (any int/float dtype)
      │  clahe=True : CLAHE per whole z slice (its output is already float32 in [0, 1])
      │  clahe=False: normalize()  – a fixed map by dtype range, never by data statistics
      ▼
    float32 volume on the input grid (z, y, x)
      │  GridMap.resample(order=1): linear interpolation with a fixed global formula
      ▼
    float32 volume on the model grid (z, y, x)

Why it is block-independent (invariant 1 of the design):

* :func:`normalize` depends on the dtype only, so any region of the volume normalises the
  same way.
* CLAHE (``skimage.exposure.equalize_adapthist``) rescales each image by its own min/max
  and picks tiles relative to the image shape, so it is *not* local. We therefore always
  run it on **whole xy slices**: a voxel's value depends on its z slice only, whichever
  block asks for it. The price: a block reads the whole xy extent of its z range. The
  :class:`Preprocessor` streams that range in z-groups of the raw chunk depth (memory
  ``O(chunk_z × Y × X)`` bytes of raw plus ``O(Y × X)`` float64 inside skimage) and keeps
  recently equalised slices in a byte-bounded cache so consecutive blocks of one z row do
  not repeat the work; CPU time is still ``O(blocks per xy plane)`` times one pass when the
  cache is too small. For very large xy planes prefer ``clahe: false``.
* Resampling uses a **global** coordinate formula (voxel centres aligned, the first
  voxel's corner shared by both grids): destination voxel ``i`` samples the source at::

      c(i) = (i + 0.5) * r - 0.5,   r = dst voxel size / src voxel size  (per axis),

  clamped to ``[0, n_src - 1]``. Linear interpolation is separable, axis by axis (z, then y,
  then x), with the two source indices and the weight computed from the global ``i``.
  Labels use nearest neighbour (``floor(c + 0.5)``).
* **Anti-aliasing.** Where an axis is *down*-sampled (``r > 1``), plain interpolation
  would keep the detail finer than the new voxel and fold it back as noise (at ``r = 3``
  the centres fall on source voxels, so white noise kept std 0.998 of 1.0). Intensities
  are therefore low-pass filtered along that axis first, with a Gaussian of
  ``sigma = (r - 1) / 2`` source voxels (scikit-image's ``resize(anti_aliasing=True)``
  rule) truncated at ``4 sigma`` (radius ``int(4 sigma + 0.5)``, scipy's rule), edges
  continued by the nearest voxel. The filter is evaluated only at the two source indices
  each destination voxel interpolates between: ``F(j) = sum_k w_k x[clamp(j + k)]``, the
  taps summed in a fixed order with indices clamped to the *volume*, so it is the same
  arithmetic whichever block asks. Its radius is part of the read margin
  (:meth:`GridMap.source_roi`), so block-wise and whole-volume results are bitwise equal.
  Up-sampled axes and labels (nearest) are not filtered.

The destination shape is ``round(n_src * src_res / dst_res)`` per axis
(:func:`target_shape`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from catena_mito.blockwise.geometry import Coord, Roi, as_coord
from catena_mito.errors import ConfigError, DataError

Resolution = tuple[float, float, float]

#: Bytes of equalised slices a :class:`Preprocessor` keeps (float32); beyond, least recent go.
CLAHE_CACHE_BYTES = 512 * 2**20


# --- intensity ------------------------------------------------------------------------------


def normalize(raw: np.ndarray) -> np.ndarray:
    """Map raw intensities to float32 by a fixed rule that depends on the dtype only.

    * ``uint8`` → ``x / 255``; other unsigned integers → ``x / iinfo.max``;
    * signed integers → ``(x - iinfo.min) / (iinfo.max - iinfo.min)`` (so [0, 1]);
    * ``bool`` → 0/1;
    * floating point → unchanged (cast to float32): float data is assumed already scaled.

    Per-volume or per-block statistics (mean/std, percentiles) are deliberately not used:
    they would make a block's output depend on which block it is.
    """
    raw = np.asarray(raw)
    if raw.dtype == np.bool_:
        return raw.astype(np.float32)
    if np.issubdtype(raw.dtype, np.unsignedinteger):
        info = np.iinfo(raw.dtype)
        return (raw.astype(np.float32) / np.float32(info.max)).astype(np.float32, copy=False)
    if np.issubdtype(raw.dtype, np.signedinteger):
        info = np.iinfo(raw.dtype)
        # float64 for the offset: iinfo(int32).min does not fit float32 exactly.
        out = (raw.astype(np.float64) - float(info.min)) / (float(info.max) - float(info.min))
        return out.astype(np.float32)
    if np.issubdtype(raw.dtype, np.floating):
        return raw.astype(np.float32, copy=False)
    raise DataError(f"raw data has unsupported dtype {raw.dtype}; expected an integer or float type")


def clahe_slice(image: np.ndarray) -> np.ndarray:
    """CLAHE of one whole (y, x) slice (skimage defaults), float32 in [0, 1].

    The slice is :func:`normalize`d first (skimage wants floats in [0, 1] or integers). A
    constant slice has no contrast to equalise and is returned normalised as it is (skimage
    would divide by zero).
    """
    from skimage.exposure import equalize_adapthist

    x = normalize(image)
    if x.size == 0 or float(x.min()) == float(x.max()):
        return x
    return equalize_adapthist(np.clip(x, 0.0, 1.0)).astype(np.float32)


def clahe(volume: np.ndarray) -> np.ndarray:
    """CLAHE per z slice of a (z, y, x) volume; float32 in [0, 1].

    Each slice is equalised as a whole image, so the result for a slice does not depend on
    the other slices. Call it on whole xy slices only (see the module docstring).
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise DataError(f"clahe expects a (z, y, x) volume, got shape {list(volume.shape)}")
    out = np.empty(volume.shape, dtype=np.float32)
    for z in range(volume.shape[0]):
        out[z] = clahe_slice(volume[z])
    return out


# --- grids ----------------------------------------------------------------------------------


def target_shape(shape: Sequence[int], from_res: Sequence[float], to_res: Sequence[float]) -> Coord:
    """Shape (z, y, x, voxels) of a volume of ``shape`` at ``from_res`` resampled to ``to_res`` (nm).

    ``round(shape * from_res / to_res)`` per axis, at least 1.
    """
    return tuple(
        max(1, int(round(n * f / t))) for n, f, t in zip(as_coord(shape), from_res, to_res)
    )  # type: ignore[return-value]


@dataclass(frozen=True)
class GridMap:
    """The fixed mapping between a source grid and a destination grid (z, y, x).

    ``scale[a]`` = destination voxel size / source voxel size on axis ``a`` (nm / nm), so
    destination voxel ``i`` is centred at source coordinate ``(i + 0.5) * scale - 0.5``.
    Both grids start at the same physical corner. Axes with ``scale == 1`` and equal sizes
    are the identity and are skipped.
    """

    src_shape: Coord
    dst_shape: Coord
    scale: tuple[float, float, float]

    @classmethod
    def between(
        cls,
        src_shape: Sequence[int],
        src_res: Sequence[float],
        dst_res: Sequence[float],
        dst_shape: Sequence[int] | None = None,
    ) -> GridMap:
        """The map from a grid at ``src_res`` to one at ``dst_res`` (nm, z, y, x).

        ``dst_shape`` defaults to :func:`target_shape`; pass it to map back onto a known
        grid (e.g. predictions at ``target_res`` back to the input's shape).
        """
        src_shape = as_coord(src_shape)
        if dst_shape is None:
            dst_shape = target_shape(src_shape, src_res, dst_res)
        scale = tuple(float(d) / float(s) for s, d in zip(src_res, dst_res))
        return cls(src_shape, as_coord(dst_shape), scale)  # type: ignore[arg-type]

    def is_identity(self, axis: int) -> bool:
        return self.scale[axis] == 1.0 and self.src_shape[axis] == self.dst_shape[axis]

    @property
    def identity(self) -> bool:
        return all(self.is_identity(a) for a in range(3))

    def coords(self, axis: int, begin: int, end: int) -> np.ndarray:
        """Source coordinates (float64, clamped) of destination voxels ``begin..end-1``."""
        i = np.arange(begin, end, dtype=np.float64)
        c = (i + 0.5) * self.scale[axis] - 0.5
        return np.clip(c, 0.0, float(self.src_shape[axis] - 1))

    def antialias_taps(self, axis: int) -> np.ndarray:
        """Weights (float32, ``2 R + 1``, summing to 1) of the low-pass filter along ``axis``.

        One tap ``[1]`` (no filter) unless the axis is down-sampled by ``r > 1``; then a
        Gaussian with ``sigma = (r - 1) / 2`` source voxels, radius ``int(4 sigma + 0.5)``.
        """
        sigma = max(0.0, (self.scale[axis] - 1.0) / 2.0)
        radius = int(4.0 * sigma + 0.5)
        if radius == 0:
            return np.ones(1, np.float32)
        k = np.arange(-radius, radius + 1, dtype=np.float64)
        w = np.exp(-0.5 * (k / sigma) ** 2)
        return (w / w.sum()).astype(np.float32)

    def filter_radius(self, axis: int, order: int = 1) -> int:
        """Source voxels the anti-aliasing filter reads on each side along ``axis`` (0 for labels)."""
        if order == 0 or self.is_identity(axis):
            return 0
        return (len(self.antialias_taps(axis)) - 1) // 2

    def _axis_source(self, axis: int, begin: int, end: int, order: int) -> tuple[int, int]:
        if end <= begin:
            return begin, begin
        if self.is_identity(axis):
            return begin, end
        c = self.coords(axis, begin, end)
        n = self.src_shape[axis]
        if order == 0:
            idx = np.floor(c + 0.5).astype(np.int64)
            return int(idx[0]), int(idx[-1]) + 1
        lo = np.floor(c).astype(np.int64)
        radius = self.filter_radius(axis, order)
        return max(int(lo[0]) - radius, 0), min(int(lo[-1]) + 2 + radius, n)

    def source_roi(self, dst_roi: Roi, order: int = 1) -> Roi:
        """The source voxels needed to compute ``dst_roi`` (both in voxels, z, y, x).

        For ``order`` 1 this includes the anti-aliasing filter's radius on down-sampled
        axes (clipped to the volume): the read halo of a resampled block.
        """
        bounds = [self._axis_source(a, b, e, order) for a, (b, e) in enumerate(zip(dst_roi.begin, dst_roi.end))]
        return Roi.from_bounds([b for b, _ in bounds], [e for _, e in bounds])

    def resample(self, src: np.ndarray, src_roi: Roi, dst_roi: Roi, order: int = 1) -> np.ndarray:
        """Destination values of ``dst_roi`` from ``src`` holding the source region ``src_roi``.

        ``src_roi`` must contain :meth:`source_roi` of ``dst_roi``. ``order`` 1 = linear
        (float32 output, for intensities and probabilities), 0 = nearest (dtype kept, for
        labels). The result for a voxel does not depend on ``src_roi`` or ``dst_roi``.
        """
        if order not in (0, 1):
            raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
        need = self.source_roi(dst_roi, order)
        if not src_roi.contains(need):
            raise ValueError(f"source region {src_roi} does not contain the needed {need}")
        out = np.asarray(src)
        if order == 1:
            out = out.astype(np.float32, copy=False)
        for axis in range(3):
            b, e = dst_roi.begin[axis], dst_roi.end[axis]
            off = src_roi.offset[axis]
            if self.is_identity(axis):
                sl = [slice(None)] * 3
                sl[axis] = slice(b - off, e - off)
                out = out[tuple(sl)]
                continue
            c = self.coords(axis, b, e)
            if order == 0:
                idx = np.floor(c + 0.5).astype(np.int64) - off
                out = np.take(out, idx, axis=axis)
                continue
            lo = np.floor(c).astype(np.int64)
            hi = np.minimum(lo + 1, self.src_shape[axis] - 1)
            w = (c - lo).astype(np.float32)
            shape = [1, 1, 1]
            shape[axis] = len(w)
            w = w.reshape(shape)
            taps = self.antialias_taps(axis)
            v0 = self._filtered(out, lo, off, axis, taps)
            v1 = self._filtered(out, hi, off, axis, taps)
            out = v0 * (np.float32(1.0) - w) + v1 * w
        return np.ascontiguousarray(out)

    def _filtered(self, data: np.ndarray, idx: np.ndarray, off: int, axis: int, taps: np.ndarray) -> np.ndarray:
        """The low-pass filtered source at global indices ``idx`` along ``axis``.

        ``data`` holds the source from global index ``off``. Indices are clamped to the
        volume (nearest-voxel edges) before the offset is taken off, and the taps are added
        in one fixed order, so a value depends on its global position only.
        """
        if len(taps) == 1:
            return np.take(data, idx - off, axis=axis)
        radius = (len(taps) - 1) // 2
        last = self.src_shape[axis] - 1
        acc = None
        for k, weight in zip(range(-radius, radius + 1), taps):
            term = np.take(data, np.clip(idx + k, 0, last) - off, axis=axis) * weight
            acc = term if acc is None else acc + term
        return acc


def resample(
    volume: np.ndarray,
    from_res: Sequence[float],
    to_res: Sequence[float],
    order: int = 1,
    dst_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Resample a whole (z, y, x) volume from ``from_res`` to ``to_res`` (nm).

    ``order`` 1 = linear (raw, probabilities; anti-aliased on down-sampled axes), 0 = nearest
    (labels). The output shape is
    ``round(shape * from_res / to_res)`` unless ``dst_shape`` is given. Uses the same global
    formula as the block-wise path, so a block of the result equals the whole.
    """
    volume = np.asarray(volume)
    gm = GridMap.between(volume.shape, from_res, to_res, dst_shape)
    if gm.identity:
        return volume.astype(np.float32) if order == 1 else volume.copy()
    return gm.resample(volume, Roi.from_shape(volume.shape), Roi.from_shape(gm.dst_shape), order)


# --- the block-wise preprocessor -----------------------------------------------------------


class Preprocessor:
    """Preprocessed model-grid regions of one raw volume, identical for every region.

    ``raw`` is anything sliceable with (z, y, x) slices and a ``shape`` (a Zarr array or a
    numpy array) at ``original_res``; calling the preprocessor with a region of the model
    grid (``target_res``) returns that region as float32, computed exactly as
    :func:`preprocess_volume` would compute the whole volume. Thread-safe (prefetch threads).
    """

    def __init__(
        self,
        raw: Any,
        original_res: Sequence[float] | None = None,
        target_res: Sequence[float] | None = None,
        clahe: bool = False,
        cache_bytes: int = CLAHE_CACHE_BYTES,
    ):
        shape = tuple(int(s) for s in raw.shape)
        if len(shape) != 3:
            raise DataError(f"raw volume has {len(shape)} dimensions {list(shape)}, expected 3 (z, y, x)")
        self.raw = raw
        self.src_shape: Coord = shape  # type: ignore[assignment]
        if target_res is None or original_res is None:
            if target_res is not None:
                raise ConfigError("target_res is set but original_res is unknown; set original_res")
            original_res = target_res = (1.0, 1.0, 1.0)
        self.original_res = tuple(float(r) for r in original_res)
        self.target_res = tuple(float(r) for r in target_res)
        self.grid = GridMap.between(shape, self.original_res, self.target_res)
        self.clahe = bool(clahe)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes = int(cache_bytes)
        self._lock = threading.Lock()
        chunks = getattr(raw, "chunks", None)
        self._z_group = int(chunks[0]) if chunks else 16

    @property
    def shape(self) -> Coord:
        """Shape of the preprocessed volume on the model grid (z, y, x voxels)."""
        return self.grid.dst_shape

    def _read_source(self, roi: Roi) -> np.ndarray:
        """Intensity-preprocessed (normalised or CLAHE) float32 source region ``roi``."""
        if not self.clahe:
            return normalize(np.asarray(self.raw[roi.to_slices()]))
        out = np.empty(roi.shape, dtype=np.float32)
        (z0, z1), ys, xs = (roi.begin[0], roi.end[0]), roi.to_slices()[1], roi.to_slices()[2]
        z = z0
        while z < z1:
            cached = self._cached(z)
            if cached is not None:
                out[z - z0] = cached[ys, xs]
                z += 1
                continue
            # Read whole xy slices in groups aligned to the raw chunk depth (one decode per chunk).
            ze = min(z1, (z // self._z_group + 1) * self._z_group)
            slab = np.asarray(self.raw[z:ze, :, :])
            for k in range(ze - z):
                eq = clahe_slice(slab[k])
                self._store(z + k, eq)
                out[z + k - z0] = eq[ys, xs]
            z = ze
        return out

    def _cached(self, z: int) -> np.ndarray | None:
        with self._lock:
            value = self._cache.get(z)
            if value is not None:
                self._cache.move_to_end(z)
            return value

    def _store(self, z: int, value: np.ndarray) -> None:
        if value.nbytes > self._cache_bytes:
            return
        with self._lock:
            self._cache[z] = value
            self._cache.move_to_end(z)
            total = sum(v.nbytes for v in self._cache.values())
            while total > self._cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                total -= old.nbytes

    def __call__(self, roi: Roi) -> np.ndarray:
        """The preprocessed model-grid region ``roi`` (z, y, x voxels), float32."""
        if not Roi.from_shape(self.shape).contains(roi):
            raise ValueError(f"region {roi} outside the model-grid volume {list(self.shape)}")
        if self.grid.identity:
            return self._read_source(roi)
        src_roi = self.grid.source_roi(roi, order=1)
        return self.grid.resample(self._read_source(src_roi), src_roi, roi, order=1)


def preprocess_volume(
    raw: np.ndarray,
    original_res: Sequence[float] | None = None,
    target_res: Sequence[float] | None = None,
    clahe: bool = False,
) -> np.ndarray:
    """The whole (z, y, x) raw volume preprocessed onto the model grid, float32.

    For training patches and whole-volume evaluation; block-wise prediction computes the
    same values region by region (:class:`Preprocessor`).
    """
    pre = Preprocessor(raw, original_res, target_res, clahe, cache_bytes=0)
    return pre(Roi.from_shape(pre.shape))


def resample_labels(
    labels: np.ndarray,
    original_res: Sequence[float] | None,
    target_res: Sequence[float] | None,
) -> np.ndarray:
    """Labels (z, y, x) onto the model grid by nearest neighbour (dtype kept)."""
    if original_res is None or target_res is None:
        return np.asarray(labels)
    return resample(labels, original_res, target_res, order=0)
