"""FIB-SEM-like synthetic volumes with known mitochondria, for the demo and the tests.

A synthetic volume is a pure function of ``(shape, seed, resolution)``: every voxel's raw
value and labels depend only on its global coordinate, never on the block it is rendered
in. So a 512³ dataset can be written chunk by chunk without ever sitting in memory, and
rendering with any block shape gives byte-identical results.

What is drawn (all sizes in nm, converted with ``resolution``; axis order (z, y, x)):

* **Neurons** -- a warped Voronoi partition of space. Seeds sit on a jittered global grid
  (one per cell, position hashed from the cell index), so the seeds near a block are known
  without a global list; a smooth displacement field bends the cell walls. Every voxel
  belongs to one neuron id >= 1. Cell walls are dark membranes.
* **Mitochondria** -- curved tubes (a smoothed random polyline with a varying radius),
  some branched, some touching a partner tube. Tubes never pass through each other:
  apart from a touching partner, two stay at least 12 nm apart, so each ground-truth id
  is one object, as in tissue. Each lies inside one host neuron and is clipped a little
  inside its membrane. Drawn with a dark double membrane and dark
  cristae sheets across the tube on a mid-grey matrix.
* **Distractors** -- vesicle clusters (small dark-rimmed spheres) and sparse larger
  endosome-like spheres (mid-grey with a dark rim, like a mitochondrion without cristae),
  darker and lighter neurons, textured cytoplasm.
* **Acquisition** -- signal-dependent (Poisson-like) noise and a slow intensity drift
  across the volume.

The mix is tuned so that no global intensity threshold separates mitochondria (best
foreground IoU about 0.25) while local texture (double membrane + cristae) still does.

Determinism: random numbers per voxel come from a counter-based hash of the global voxel
index; smooth noise is value noise on a global lattice; per-voxel arithmetic uses only
``+ - * / sqrt floor`` (correctly rounded everywhere, so SIMD and scalar code paths agree);
objects (mitochondria) are drawn from ``numpy.random.default_rng(seed)`` once per volume.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from catena_mito.blockwise.cpus import available_cpus
from catena_mito.errors import ConfigError, DataError

__all__ = [
    "SyntheticVolume",
    "generate_block",
    "best_global_threshold_iou",
    "make_volume",
    "write_synthetic_dataset",
]

Shape3 = tuple[int, int, int]

# --- sizes and intensities (nm and uint8 grey levels) ------------------------------------
# Objects are smaller than in real tissue so that a 96³ test volume at 8 nm still holds a
# few neurons and dozens of mitochondria.

_NEURON_CELL_NM = 560.0  # spacing of the neuron seed grid (~neurite calibre)
_NEURON_JITTER = 0.35  # max seed offset from its cell centre, fraction of a cell; bounds searches
_WARP_NM = 45.0  # amplitude of the displacement that bends cell walls
_WARP_SPACING_NM = 420.0
_MEMBRANE_HALF_NM = 11.0  # half width of the dark cell membrane profile
_WALL_CAP_NM = 60.0  # wall distances beyond this change nothing drawn (see _draw_mitos)
_TILE = 8  # voxels per side of the tiles of the nearest-seed search

_MITO_RADIUS_NM = (38.0, 62.0)
_MITO_LENGTH_NM = (220.0, 620.0)
_MITO_GAP_NM = 22.0  # clearance between a mitochondrion and its host's membrane
_MITO_FRACTION_TARGET = 0.105  # sets how many tubes are wanted; clipping and
# the clearance between tubes leave about 6-7 % of the voxels mitochondria
_MITO_P_BRANCH = 0.3
_MITO_P_TOUCH = 0.25
_MITO_OUTER_BAND_NM = 7.0  # the outer membrane blurs this far outside the label
_MITO_CLEARANCE_NM = 12.0  # least gap between two mitochondria that do not touch on purpose
_MITO_PULL = 0.25  # how far each tube's centre moves towards its cell's seed
_MITO_ATTEMPTS = 8  # at most this many candidates per mitochondrion wanted
_MITO_BATCH = 256  # candidates whose host is tested at once
_TUBE_STEP_NM = 8.0  # spacing of the centre-line points of the clearance check

_VESICLE = {  # small synaptic-like vesicles, clustered
    "spacing": 72.0,
    "r": (14.0, 22.0),
    "rim": 7.0,
    "stream": 31,
    "cluster_spacing": 520.0,
    "occupancy": (0.05, 1.6),
    "rim_value": 62.0,
    "lumen_value": 188.0,
}
_ENDOSOME = {  # sparse larger round organelles: mito-like grey, single rim, no cristae
    "spacing": 240.0,
    "r": (32.0, 58.0),
    "rim": 7.0,
    "stream": 37,
    "cluster_spacing": 900.0,
    "occupancy": (0.10, 0.32),
    "rim_value": 52.0,
    "lumen_value": 122.0,
}

_CYTO_VALUE = 168.0
_MEMBRANE_VALUE = 42.0
_RING_VALUE = 40.0
_CRISTA_VALUE = 62.0
_DARK_NEURON_P = 0.2  # share of dark (glia-like) cells, as grey as a mitochondrial matrix
_DARK_NEURON_TONE = -48.0
_NOISE_SIGMA = 15.0  # grey levels at intensity 128; scales with sqrt(intensity)
_DRIFT_GAIN = 0.22  # +-22 % gain from one corner of the volume to the other

# streams of the hash, so that each random field is independent
_S_SEED, _S_WARP, _S_TEXTURE, _S_NEURON_TONE, _S_CRISTA, _S_NOISE = 1, 3, 11, 13, 17, 23

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


# --- counter-based hashing ----------------------------------------------------------------


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic): a good bijective bit mixer."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash(seed: int, stream: int, *ints: np.ndarray) -> np.ndarray:
    """A 64-bit hash of (seed, stream, ints...), broadcasting the integer arrays."""
    with np.errstate(over="ignore"):
        key = np.uint64(
            (seed * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03) & 0xFFFFFFFFFFFFFFFF
        )
        h = _mix64(np.asarray(key, dtype=np.uint64))
        for v in ints:
            v = np.asarray(v, dtype=np.int64).astype(np.uint64)
            h = _mix64(h ^ (v * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019)))
    return h


def _uniform(h: np.ndarray, which: int = 0) -> np.ndarray:
    """A float64 in [0, 1) from a hash; ``which`` picks an independent derived value."""
    if which:
        with np.errstate(over="ignore"):
            h = _mix64(h + np.uint64(which) * np.uint64(0xA0761D6478BD642F))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def _gaussianish(h: np.ndarray) -> np.ndarray:
    """Approximately standard normal values from a hash (Irwin-Hall sum of 4 uniforms).

    Only integer arithmetic and one scaling, so it is bit-reproducible everywhere.
    """
    m = np.uint64(0xFFFF)
    s = (h & m) + ((h >> np.uint64(16)) & m) + ((h >> np.uint64(32)) & m) + (h >> np.uint64(48))
    return (s.astype(np.float64) * (1.0 / 65535.0) - 2.0) * math.sqrt(3.0)


def _bump(x: np.ndarray) -> np.ndarray:
    """A smooth bump, 1 at 0 and 0 for |x| >= 1; polynomial so it is bit-reproducible."""
    y = np.clip(1.0 - x * x, 0.0, None)
    return y * y


# --- value noise on a global lattice --------------------------------------------------------


def _smooth_frac(c: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    u = c / spacing
    i0 = np.floor(u)
    f = u - i0
    return i0.astype(np.int64), f * f * (3.0 - 2.0 * f)


def _value_noise_grid(
    seed: int, stream: int, coords: Sequence[np.ndarray], spacing: float
) -> np.ndarray:
    """Smooth noise in [-1, 1] on the grid ``coords`` (three 1-D nm vectors, z, y, x).

    Lattice values are hashed from global lattice indices and interpolated separably, so a
    voxel's value is independent of which grid (block) it is computed in.
    """
    (iz, fz), (iy, fy), (ix, fx) = (_smooth_frac(c, spacing) for c in coords)
    lz, ly, lx = (np.arange(i.min(), i.max() + 2) for i in (iz, iy, ix))
    lattice = _uniform(_hash(seed, stream, lz[:, None, None], ly[None, :, None], lx[None, None, :]))
    lattice = lattice * 2.0 - 1.0
    ix, iy, iz = ix - lx[0], iy - ly[0], iz - lz[0]
    a = lattice[:, :, ix] * (1.0 - fx) + lattice[:, :, ix + 1] * fx
    b = a[:, iy, :] * (1.0 - fy)[:, None] + a[:, iy + 1, :] * fy[:, None]
    return b[iz] * (1.0 - fz)[:, None, None] + b[iz + 1] * fz[:, None, None]


def _value_noise_points(seed: int, stream: int, points: np.ndarray, spacing: float) -> np.ndarray:
    """The same noise as :func:`_value_noise_grid` at scattered points ``(n, 3)`` nm."""
    (iz, fz), (iy, fy), (ix, fx) = (_smooth_frac(points[:, a], spacing) for a in range(3))

    def lat(dz: int, dy: int, dx: int) -> np.ndarray:
        return _uniform(_hash(seed, stream, iz + dz, iy + dy, ix + dx)) * 2.0 - 1.0

    out = 0.0
    for dz, wz in ((0, 1.0 - fz), (1, fz)):
        b = 0.0
        for dy, wy in ((0, 1.0 - fy), (1, fy)):
            a = lat(dz, dy, 0) * (1.0 - fx) + lat(dz, dy, 1) * fx
            b = b + a * wy
        out = out + b * wz
    return out


# --- mitochondria (global objects) ----------------------------------------------------------


@dataclass(frozen=True)
class _Mito:
    """One mitochondrion: line segments (nm) with arc length and radius at both ends."""

    ident: int
    host: int  # neuron id it lives in
    a: np.ndarray  # (S, 3) segment starts, nm
    b: np.ndarray  # (S, 3) segment ends, nm
    s: np.ndarray  # (S, 2) arc length at start/end, nm
    r: np.ndarray  # (S, 2) radius at start/end, nm
    vox_lo: np.ndarray  # per-segment voxel bounding boxes (S, 3), inclusive
    vox_hi: np.ndarray  # (S, 3), exclusive
    matrix: float  # grey level of the matrix
    period: float  # crista spacing, nm
    duty: float  # fraction of a period that is crista
    phase: float


def _catmull_rom(ctrl: np.ndarray, samples: int = 4) -> np.ndarray:
    """A smooth curve through the control points (endpoints kept), ``samples`` per span."""
    pts = np.concatenate([2 * ctrl[:1] - ctrl[1:2], ctrl, 2 * ctrl[-1:] - ctrl[-2:-1]])
    out = [ctrl[0]]
    t = np.arange(1, samples + 1) / samples
    for i in range(1, len(pts) - 2):
        p0, p1, p2, p3 = pts[i - 1], pts[i], pts[i + 1], pts[i + 2]
        tt = t[:, None]
        out.extend(
            0.5
            * (
                2 * p1
                + (-p0 + p2) * tt
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * tt**2
                + (-p0 + 3 * p1 - 3 * p2 + p3) * tt**3
            )
        )
    return np.asarray(out)


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _perpendicular(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    v = rng.normal(size=3)
    v -= v.dot(d) * d
    return v / np.linalg.norm(v)


def _random_path(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    length: float,
    n_ctrl: int,
    bend: float,
) -> np.ndarray:
    """Control points of a gently bending path of about ``length`` nm from ``start``."""
    step = length / (n_ctrl - 1)
    pts, d = [start], direction
    for _ in range(n_ctrl - 1):
        pts.append(pts[-1] + d * step)
        d = d + bend * _perpendicular(rng, d)
        d /= np.linalg.norm(d)
    return np.asarray(pts)


def _line_points(line: np.ndarray) -> np.ndarray:
    """Points along a polyline, at most ``_TUBE_STEP_NM`` apart, ends included."""
    pts = []
    for a, b in zip(line[:-1], line[1:], strict=True):
        steps = max(1, int(np.ceil(np.linalg.norm(b - a) / _TUBE_STEP_NM)))
        pts.append(a + (b - a) * (np.arange(steps) / steps)[:, None])
    pts.append(line[-1:])
    return np.concatenate(pts)


def _runs(mask: np.ndarray) -> int:
    """How many separate runs of True a 1-D mask has."""
    return int(np.count_nonzero(np.diff(np.concatenate([[False], mask]).astype(np.int8)) == 1))


def _drawn_part(
    lines: Sequence[tuple[np.ndarray, np.ndarray]], radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """The centre-line points (and radii) whose tube can be drawn: those inside the host
    and, since voxels inside the host within a radius of the line are drawn too, those
    within a radius of such a point along the line. The radius is the largest the piece
    can draw (it varies by up to 15 %), so a check on these points is conservative.
    """
    r = 1.15 * radius
    reach = int(np.ceil(r / _TUBE_STEP_NM)) + 1
    kept = []
    for pts, mask in lines:  # points along a centre line, and which lie in the host
        full = np.convolve(mask.astype(np.int32), np.ones(2 * reach + 1, np.int32))
        near = full[reach : reach + len(mask)] > 0
        kept.append(pts[near])
    points = np.concatenate(kept) if kept else np.zeros((0, 3))
    return points, np.full(len(points), r)


def _collide(p: np.ndarray, rp: np.ndarray, q: np.ndarray, rq: np.ndarray) -> bool:
    """Whether two tubes (centre points and radii) come closer than the clearance."""
    if len(p) == 0 or len(q) == 0:
        return False
    d2 = ((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)
    reach = rp[:, None] + rq[None, :] + _MITO_CLEARANCE_NM + _TUBE_STEP_NM / 2
    return bool(np.any(d2 < reach * reach))


class _TubeIndex:
    """The tubes kept so far, with bounding boxes to find the few a candidate could touch."""

    def __init__(self) -> None:
        self._tubes: list[tuple[np.ndarray, np.ndarray]] = []
        self._lo = np.zeros((64, 3))  # grown by doubling; rows past len(_tubes) unused
        self._hi = np.zeros((64, 3))

    def add(self, points: np.ndarray, radii: np.ndarray) -> None:
        if len(points) == 0:
            return
        k = len(self._tubes)
        if k == len(self._lo):
            self._lo = np.concatenate([self._lo, np.zeros_like(self._lo)])
            self._hi = np.concatenate([self._hi, np.zeros_like(self._hi)])
        r = radii.max() + _MITO_CLEARANCE_NM + _TUBE_STEP_NM
        self._lo[k] = points.min(0) - r
        self._hi[k] = points.max(0) + r
        self._tubes.append((points, radii))

    def collides(self, points: np.ndarray, radii: np.ndarray) -> bool:
        if len(points) == 0:
            return False
        r = radii.max()
        lo, hi = points.min(0) - r, points.max(0) + r
        k = len(self._tubes)
        near = np.nonzero(np.all((self._lo[:k] < hi) & (self._hi[:k] > lo), axis=1))[0]
        return any(_collide(points, radii, *self._tubes[j]) for j in near)


# --- the volume -----------------------------------------------------------------------------


def _as_shape(value: Any, name: str) -> Shape3:
    try:
        items = tuple(value)
        ints = tuple(int(v) for v in items)
    except (TypeError, ValueError) as e:
        raise DataError(f"{name}: expected 3 integers (z, y, x), got {value!r}") from e
    if len(ints) != 3 or any(i != v for i, v in zip(ints, items, strict=True)):
        raise DataError(f"{name}: expected 3 integers (z, y, x), got {list(items)}")
    return ints  # type: ignore[return-value]


def _check_positive(shape: Shape3, name: str) -> None:
    if any(s <= 0 for s in shape):
        raise DataError(f"{name}: every extent must be positive (voxels, z y x), got {list(shape)}")


class SyntheticVolume:
    """A synthetic FIB-SEM volume of ``shape`` voxels (z, y, x) at ``resolution`` nm.

    The volume is defined everywhere by ``seed``; :meth:`render` draws any region of it.
    Construction draws the mitochondria (a few ms per thousand); rendering does the work.
    """

    def __init__(
        self, shape: Sequence[int], seed: int = 0, resolution: Sequence[float] = (8, 8, 8)
    ) -> None:
        self.shape: Shape3 = _as_shape(shape, "shape")
        _check_positive(self.shape, "shape")
        try:
            res = tuple(float(r) for r in resolution)
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"resolution: expected 3 positive numbers (nm, z y x), got {resolution!r}"
            ) from e
        if len(res) != 3 or not all(math.isfinite(r) and r > 0 for r in res):
            raise ConfigError(
                f"resolution: expected 3 positive numbers (nm, z y x), got {list(resolution)}"
            )
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"seed: expected a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.resolution: tuple[float, float, float] = res  # type: ignore[assignment]
        self._res = np.asarray(res)
        self._extent_nm = np.asarray(self.shape) * self._res
        # Neuron seeds live on a grid that extends two cells past the volume on each side,
        # so every voxel has its neighbouring seeds; ids are the (1-based) C-order index of
        # a seed's cell in that grid, fixed per volume shape (so not contiguous).
        self._n_cells = np.ceil(self._extent_nm / _NEURON_CELL_NM).astype(np.int64) + 4
        self._seeds = self._seed_table()
        self._mitos = self._make_mitos()
        self._mito_lo = np.array([m.vox_lo.min(0) for m in self._mitos]).reshape(-1, 3)
        self._mito_hi = np.array([m.vox_hi.max(0) for m in self._mitos]).reshape(-1, 3)

    # -- neurons -------------------------------------------------------------------------

    def _seed_points(self, cells: np.ndarray) -> np.ndarray:
        """Seed positions (nm) of the given neuron cells ``(n, 3)`` (indices from -2)."""
        h = _hash(self.seed, _S_SEED, cells[:, 0], cells[:, 1], cells[:, 2])
        jitter = np.stack([_uniform(h, k) for k in (1, 2, 3)], axis=1) * 2.0 - 1.0
        return (cells + 0.5 + _NEURON_JITTER * jitter) * _NEURON_CELL_NM

    def _neuron_ids(self, cells: np.ndarray) -> np.ndarray:
        n = self._n_cells
        c = cells + 2
        return ((c[:, 0] * n[1] + c[:, 1]) * n[2] + c[:, 2] + 1).astype(np.uint32)

    def _warp_points(self, p: np.ndarray) -> np.ndarray:
        return p + _WARP_NM * np.stack(
            [
                _value_noise_points(self.seed, _S_WARP + k * 100, p, _WARP_SPACING_NM)
                for k in range(3)
            ],
            axis=1,
        )

    def _cells_seeds(
        self, lo_nm: np.ndarray, hi_nm: np.ndarray, margin: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Seeds (nm) and neuron ids of the cells within ``margin`` cells of a box, in
        C order of the cell index (so candidate order, hence tie-breaking, is global)."""
        lo = np.maximum(np.floor(lo_nm / _NEURON_CELL_NM).astype(np.int64) - margin, -2)
        hi = np.minimum(
            np.floor(hi_nm / _NEURON_CELL_NM).astype(np.int64) + margin + 1, self._n_cells - 2
        )
        axes = [np.arange(lo[a], hi[a]) for a in range(3)]
        cells = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
        return self._seed_points(cells), self._neuron_ids(cells)

    def _neuron_fields(self, coords: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Neuron ids and distance to the cell wall (nm) on the grid ``coords`` (z, y, x nm).

        The id is that of the nearest seed (in warped space); the wall distance is the
        smallest distance to a bisector plane with another seed, capped at ``_WALL_CAP_NM``
        (nothing drawn depends on larger values). The search is brute force per 8³ tile
        over the seeds that can matter for that tile: with ``D`` the smallest *farthest*
        distance from the tile to any seed, the nearest seed is no farther than ``D``, and
        a seed at least ``D + 2 cap`` away has a bisector farther than ``cap`` (because
        ``(d_j² - d_1²) / (2|s_j - s_1|) >= (d_j - d_1) / 2``). The pruning is exact, so a
        voxel's result does not depend on the block or tile it is computed in.
        """
        t = _TILE
        shp = [len(c) for c in coords]
        # pad to whole tiles with extrapolated coordinates; padded voxels are dropped
        pc = [
            np.concatenate([c, c[-1] + r * np.arange(1, (-n) % t + 1)])
            for c, n, r in zip(coords, shp, self.resolution, strict=True)
        ]
        nz, ny, nx = (len(c) // t for c in pc)
        qt = []  # per axis: warped coordinate of every voxel, as (tiles, t³)
        for k, bshape in enumerate(((-1, 1, 1), (1, -1, 1), (1, 1, -1))):
            qk = pc[k].reshape(bshape) + _WARP_NM * _value_noise_grid(
                self.seed, _S_WARP + k * 100, pc, _WARP_SPACING_NM
            )
            qt.append(qk.reshape(nz, t, ny, t, nx, t).transpose(0, 2, 4, 1, 3, 5).reshape(-1, t**3))
        lo = np.stack([a.min(1) for a in qt], 1)  # (tiles, 3) bounding box of each tile, nm
        hi = np.stack([a.max(1) for a in qt], 1)

        cap = _WALL_CAP_NM
        margin = 2
        while True:  # widen the seed set if large voxels make the reach exceed 2 cells
            seeds, ids = self._cells_seeds(lo.min(0), hi.max(0), margin)
            mind2 = np.zeros((len(lo), len(seeds)))
            maxd2 = np.zeros((len(lo), len(seeds)))
            for k in range(3):
                below = lo[:, k, None] - seeds[None, :, k]
                above = seeds[None, :, k] - hi[:, k, None]
                gap = np.maximum(np.maximum(below, above), 0.0)
                mind2 += gap * gap
                far = np.maximum(np.abs(below), np.abs(above))
                maxd2 += far * far
            reach = np.sqrt(maxd2.min(1)) + 2.0 * cap + 1.0
            # a seed outside the cells within `margin` is >= (margin + 0.5 - jitter) cells away
            needed = int(np.ceil(reach.max() / _NEURON_CELL_NM - (0.5 - _NEURON_JITTER)))
            if needed <= margin:
                break
            margin = needed
        cand = mind2 <= (reach * reach)[:, None]
        count = cand.sum(1)

        out_id = np.empty(qt[0].shape, dtype=np.uint32)
        out_wall = np.empty(qt[0].shape)
        for c in np.unique(count):  # tiles grouped by candidate count: no padding work
            sel = np.nonzero(count == c)[0]
            idx = np.nonzero(cand[sel])[1].reshape(len(sel), c)  # ascending = global order
            if c == 1:  # deep inside one cell: no other seed can matter
                out_id[sel] = ids[idx]
                out_wall[sel] = cap
                continue
            sc = seeds[idx]  # (n, c, 3)
            qz, qy, qx = (a[sel] for a in qt)
            d2 = np.empty((c,) + qz.shape)
            for j in range(c):
                dz = qz - sc[:, j, 0, None]
                dy = qy - sc[:, j, 1, None]
                dx = qx - sc[:, j, 2, None]
                d2[j] = dz * dz + dy * dy + dx * dx
            near = np.argmin(d2, axis=0)  # first minimum: ties go to the lower cell index
            d1 = np.take_along_axis(d2, near[None], 0)[0]
            wall = np.full(qz.shape, cap)
            # seed-to-seed distances per tile, then looked up by each voxel's nearest
            pair = np.sqrt(((sc[:, :, None] - sc[:, None, :]) ** 2).sum(-1))  # (n, c, c)
            with np.errstate(divide="ignore", invalid="ignore"):
                for j in range(c):
                    sep = np.take_along_axis(pair[:, j], near, 1)
                    b = (d2[j] - d1) / (2.0 * sep)
                    wall = np.minimum(wall, np.where(near == j, cap, b))
            out_id[sel] = ids[np.take_along_axis(idx, near, 1)]
            out_wall[sel] = wall

        def untile(a: np.ndarray) -> np.ndarray:
            full = (
                a.reshape(nz, ny, nx, t, t, t)
                .transpose(0, 3, 1, 4, 2, 5)
                .reshape(nz * t, ny * t, nx * t)
            )
            return full[: shp[0], : shp[1], : shp[2]]

        return untile(out_id), untile(out_wall)

    def neuron_at(self, points_nm: np.ndarray) -> np.ndarray:
        """Neuron ids at points ``(n, 3)`` given in nm (z, y, x)."""
        q = self._warp_points(np.asarray(points_nm, dtype=np.float64).reshape(-1, 3))
        return self._neuron_ids(self._nearest_cells(q))

    # -- mitochondria ----------------------------------------------------------------------

    def _make_mitos(self) -> list[_Mito]:
        """Draw the mitochondria: tubes that never pass through each other.

        Candidates are kept in draw order only if they stay at least
        ``_MITO_CLEARANCE_NM`` clear of every tube kept before in the same host cell (a
        touching partner is the one deliberate exception: it overlaps its own tube by a
        few nm). Tubes in different cells cannot meet, since each is clipped inside its
        own membrane, and only the part of a tube inside (or near) its host is drawn, so
        only that part is checked. A tube whose centre line leaves its host and comes back
        is dropped: it would be drawn as two pieces. Real mitochondria do not
        interpenetrate, and a tube drawn through another would leave one id in two pieces,
        which no instance method can -- or should -- recover as one object.
        """
        rng = np.random.default_rng([self.seed, 0x6D69746F])
        margin = _MITO_LENGTH_NM[1] / 2
        lo, hi = -margin, self._extent_nm + margin
        mean_r = np.mean(_MITO_RADIUS_NM)
        mean_len = np.mean(_MITO_LENGTH_NM)
        mean_volume = (
            math.pi * mean_r**2 * mean_len * (1 + _MITO_P_BRANCH * 0.5 + _MITO_P_TOUCH * 0.6)
        )
        n = rng.poisson(_MITO_FRACTION_TARGET * np.prod(hi - lo) / mean_volume)
        attempts = _MITO_ATTEMPTS * n
        centres = rng.uniform(lo, hi, size=(attempts, 3))
        # pull each centre towards its neuron's seed, so tubes sit inside cells rather
        # than across walls (they are clipped at the wall anyway)
        q = self._warp_points(centres)
        near = self._nearest_cells(q)
        centres = centres + _MITO_PULL * (self._seed_points(near) - q)
        hosts = self.neuron_at(centres)
        candidates = [self._mito_paths(rng, c) for c in centres]

        mitos: list[_Mito] = []
        kept: dict[int, _TubeIndex] = {}
        groups = 0
        for i, paths in enumerate(candidates):
            if groups == n:
                break
            if i % _MITO_BATCH == 0:  # host tests for the next batch of candidates at once
                traced = self._lines_in_host(candidates[i : i + _MITO_BATCH], hosts[i : i + _MITO_BATCH])
            lines = traced[i % _MITO_BATCH]  # per path: [(points, in host), ...], main line first
            if any(_runs(mask) > 1 for path in lines for _, mask in path):
                continue
            tubes = [_drawn_part(path, p["radius"]) for path, p in zip(lines, paths, strict=True)]
            index = kept.setdefault(int(hosts[i]), _TubeIndex())
            if any(index.collides(*t) for t in tubes):
                continue
            # the partner (second path) may overlap its own tube's main line, not its branch
            if len(tubes) == 2 and len(lines[0]) == 2 and _collide(
                    *tubes[1], *_drawn_part(lines[0][1:], paths[0]["radius"])):
                continue
            for t in tubes:
                index.add(*t)
            groups += 1
            mitos.extend(
                self._mito_object(rng, len(mitos) + 1, int(hosts[i]), path) for path in paths
            )
        return mitos

    def _lines_in_host(
        self, candidates: Sequence[list[dict]], hosts: np.ndarray
    ) -> list[list[list[tuple[np.ndarray, np.ndarray]]]]:
        """Per candidate, per path, per centre line: points along it and which lie in the
        host (one :meth:`neuron_at` call for all of them)."""
        points = [[[_line_points(line) for line, _ in p["lines"]] for p in paths] for paths in candidates]
        flat = [pts for paths in points for path in paths for pts in path]
        host = np.concatenate([
            np.full(sum(len(pts) for path in paths for pts in path), h)
            for paths, h in zip(points, hosts, strict=True)
        ])
        inside = iter(np.split(self.neuron_at(np.concatenate(flat)) == host,
                               np.cumsum([len(x) for x in flat])[:-1]))
        return [[[(pts, next(inside)) for pts in path] for path in paths] for paths in points]

    def _seed_table(self) -> np.ndarray:
        """Seed positions (nm) of every cell of the grid, indexed by cell index + 2 (what
        :meth:`_seed_points` gives, computed once for the nearest-seed searches)."""
        n = self._n_cells
        cells = np.stack(np.meshgrid(*[np.arange(k) - 2 for k in n], indexing="ij"), -1)
        return self._seed_points(cells.reshape(-1, 3)).reshape(*n, 3)

    def _nearest_cells(self, q: np.ndarray) -> np.ndarray:
        """The cell index of the nearest seed to warped points ``q`` ``(n, 3)`` nm.

        Brute force over the 5³ cells around each point: with seeds jittered by at most
        0.35 of a cell, the own cell's seed is within 1.47 cells and any seed three cells
        away is at least 2.15 cells away.
        """
        cell = _NEURON_CELL_NM
        base = np.floor(q / cell).astype(np.int64)
        offsets = np.stack(np.meshgrid(*[np.arange(-2, 3)] * 3, indexing="ij"), -1).reshape(-1, 3)
        table = self._seeds
        best_d = np.full(len(q), np.inf)
        best = base.copy()
        for off in offsets:
            c = np.clip(base + off, -2, self._n_cells - 3)
            seeds = table[c[:, 0] + 2, c[:, 1] + 2, c[:, 2] + 2]
            d = ((seeds - q) ** 2).sum(1)
            better = d < best_d
            best_d[better], best[better] = d[better], c[better]
        return best

    def _mito_paths(self, rng: np.random.Generator, centre: np.ndarray) -> list[dict]:
        """Centre lines of one mitochondrion and, sometimes, its branch or a touching partner."""
        length = rng.uniform(*_MITO_LENGTH_NM)
        radius = rng.uniform(*_MITO_RADIUS_NM)
        d = _random_unit(rng)
        ctrl = _random_path(rng, centre - d * length / 2, d, length, 4, 0.45)
        main = _catmull_rom(ctrl)
        pieces = [{"lines": [(main, 0.0)], "radius": radius}]
        if rng.random() < _MITO_P_BRANCH:
            j = int(rng.integers(len(main) // 4, 3 * len(main) // 4 + 1))
            tangent = main[min(j + 1, len(main) - 1)] - main[max(j - 1, 0)]
            tangent /= np.linalg.norm(tangent)
            angle = rng.uniform(0.8, 1.4)
            bdir = np.cos(angle) * tangent + np.sin(angle) * _perpendicular(rng, tangent)
            blen = length * rng.uniform(0.35, 0.65)
            branch = _catmull_rom(_random_path(rng, main[j], bdir, blen, 3, 0.4))
            s_at = float(np.sqrt((np.diff(main[: j + 1], axis=0) ** 2).sum(1)).sum())
            pieces[0]["lines"].append((branch, s_at))
        if rng.random() < _MITO_P_TOUCH:
            # a partner alongside, overlapping by a few nm so the two labels touch and the
            # double membranes meet in a dark seam
            r2 = rng.uniform(*_MITO_RADIUS_NM)
            normal = _perpendicular(rng, d)
            k0 = int(rng.integers(0, len(main) // 3 + 1))
            k1 = int(rng.integers(2 * len(main) // 3, len(main) + 1))
            partner = main[k0:k1] + normal * (radius + r2 - 6.0)
            if len(partner) >= 2:
                pieces.append({"lines": [(partner, 0.0)], "radius": r2})
        return pieces

    def _mito_object(self, rng: np.random.Generator, ident: int, host: int, piece: dict) -> _Mito:
        a, b, s, r = [], [], [], []
        for line, s_start in piece["lines"]:
            seg = np.sqrt((np.diff(line, axis=0) ** 2).sum(1))
            arc = s_start + np.concatenate([[0.0], np.cumsum(seg)])
            rad = piece["radius"] * (1.0 + 0.15 * rng.uniform(-1, 1, size=len(line)))
            a.append(line[:-1])
            b.append(line[1:])
            s.append(np.stack([arc[:-1], arc[1:]], 1))
            r.append(np.stack([rad[:-1], rad[1:]], 1))
        a_, b_, s_, r_ = (np.concatenate(x) for x in (a, b, s, r))
        reach = r_.max(1)[:, None] + _MITO_OUTER_BAND_NM + 1.0
        vox_lo = np.floor((np.minimum(a_, b_) - reach) / self._res).astype(np.int64)
        vox_hi = np.floor((np.maximum(a_, b_) + reach) / self._res).astype(np.int64) + 1
        return _Mito(
            ident=ident,
            host=host,
            a=a_,
            b=b_,
            s=s_,
            r=r_,
            vox_lo=vox_lo,
            vox_hi=vox_hi,
            matrix=float(rng.uniform(100.0, 138.0)),
            period=float(rng.uniform(38.0, 58.0)),
            duty=float(rng.uniform(0.3, 0.42)),
            phase=float(rng.uniform(0.0, 1.0)),
        )

    @property
    def num_mitochondria(self) -> int:
        """How many mitochondria were placed (some may lie outside or be clipped away)."""
        return len(self._mitos)

    # -- rendering -------------------------------------------------------------------------

    def render(self, roi_offset: Sequence[int], roi_shape: Sequence[int]) -> dict[str, np.ndarray]:
        """Draw the region ``roi_offset``/``roi_shape`` (voxels, z y x) of the volume.

        Returns ``raw`` (uint8), ``mito_ids`` and ``neuron_ids`` (uint32), each of
        ``roi_shape``. The region must lie inside the volume.
        """
        off = _as_shape(roi_offset, "roi_offset")
        shp = _as_shape(roi_shape, "roi_shape")
        _check_positive(shp, "roi_shape")
        if any(o < 0 or o + s > v for o, s, v in zip(off, shp, self.shape, strict=True)):
            raise DataError(
                f"roi: offset {list(off)} + shape {list(shp)} must lie inside the volume "
                f"of shape {list(self.shape)} (voxels, z y x)"
            )
        # voxel centres in nm; integer * resolution, so exact and block-independent
        coords = [
            (np.arange(o, o + s) + 0.5) * r
            for o, s, r in zip(off, shp, self.resolution, strict=True)
        ]
        neuron_ids, wall = self._neuron_fields(coords)

        raw = self._cytoplasm(coords, neuron_ids)
        for spec in (_VESICLE, _ENDOSOME):
            self._draw_spheres(raw, coords, off, spec)
        # cell membranes on top of cytoplasm and vesicles
        mem = _bump(wall / _MEMBRANE_HALF_NM)
        raw += mem * (_MEMBRANE_VALUE - raw)

        mito_ids = self._draw_mitos(raw, coords, off, shp, neuron_ids, wall)
        raw = self._acquire(raw, off, shp)
        return {"raw": raw, "mito_ids": mito_ids, "neuron_ids": neuron_ids}

    def _cytoplasm(self, coords: list[np.ndarray], neuron_ids: np.ndarray) -> np.ndarray:
        tex = 22.0 * _value_noise_grid(
            self.seed, _S_TEXTURE, coords, 330.0
        ) + 10.0 * _value_noise_grid(self.seed, _S_TEXTURE + 1, coords, 90.0)
        # neurites differ in density (some much darker, like glia): defeats global thresholds
        h = _hash(self.seed, _S_NEURON_TONE, neuron_ids.astype(np.int64))
        tone = np.where(
            _uniform(h, 1) < _DARK_NEURON_P, _DARK_NEURON_TONE, _uniform(h) * 55.0 - 38.0
        )
        return _CYTO_VALUE + tex + tone

    def _draw_spheres(
        self, raw: np.ndarray, coords: list[np.ndarray], off: Shape3, spec: Mapping[str, Any]
    ) -> None:
        """Dark-rimmed spheres, at most one per cell of a global grid (no overlaps).

        A sphere plus its rim fits inside its own cell, so every voxel only needs the
        sphere of the cell it is in: no object list, no neighbour search.
        """
        spacing, (r_lo, r_hi), rim = spec["spacing"], spec["r"], spec["rim"]
        cell = [np.floor(c / spacing).astype(np.int64) for c in coords]
        cz, cy, cx = (np.arange(c.min(), c.max() + 1) for c in cell)
        h = _hash(
            self.seed, spec["stream"], cz[:, None, None], cy[None, :, None], cx[None, None, :]
        )
        radius = r_lo + (r_hi - r_lo) * _uniform(h, 4)
        slack = spacing / 2 - radius - rim
        centres = [
            (c + 0.5) * spacing + slack * (2.0 * _uniform(h, k) - 1.0)
            for k, c in zip(
                (1, 2, 3), (cz[:, None, None], cy[None, :, None], cx[None, None, :]), strict=True
            )
        ]
        # cluster occupancy: a smooth field decides where vesicles are dense
        mid = np.stack(
            np.meshgrid(
                (cz + 0.5) * spacing, (cy + 0.5) * spacing, (cx + 0.5) * spacing, indexing="ij"
            ),
            -1,
        ).reshape(-1, 3)
        field = 0.5 + 0.5 * _value_noise_points(
            self.seed, spec["stream"] + 1, mid, spec["cluster_spacing"]
        )
        o_lo, o_hi = spec["occupancy"]
        present = _uniform(h, 5) < (o_lo + (o_hi - o_lo) * field.reshape(h.shape) ** 2)

        # stamp each present sphere into its bounding box; boxes can be clipped by the
        # block but never overlap, since each sphere (with rim) stays inside its cell
        pz, py, px = np.nonzero(present)
        if len(pz) == 0:
            return
        centre = [centres[0][pz, py, px], centres[1][pz, py, px], centres[2][pz, py, px]]
        r = radius[pz, py, px]
        reach = r_hi + rim
        local, delta = [], []
        for ax, (o, n, res) in enumerate(zip(off, raw.shape, self.resolution, strict=True)):
            k = int(np.floor(2.0 * reach / res)) + 2
            start = np.ceil(centre[ax] / res - 0.5 - reach / res).astype(np.int64)
            g = start[:, None] + np.arange(k)  # (spheres, k) global voxel indices
            d = (g + 0.5) * res - centre[ax][:, None]  # same arithmetic as the block coords
            d = np.where((g >= o) & (g < o + n), d, np.inf)  # outside the block: no effect
            shape = [len(pz), 1, 1, 1]
            shape[ax + 1] = k
            local.append(np.clip(g - o, 0, n - 1).reshape(shape))
            delta.append(d.reshape(shape))
        dist = np.sqrt(delta[0] * delta[0] + delta[1] * delta[1] + delta[2] * delta[2])
        rr = r[:, None, None, None]
        lumen = np.clip((rr - dist) / 3.0 + 0.5, 0.0, 1.0)
        ring = _bump((dist - rr) / rim)
        hit = (lumen > 0.0) | (ring > 0.0)
        where = tuple(np.broadcast_to(a, hit.shape)[hit] for a in local)
        value = raw[where]
        value += lumen[hit] * (spec["lumen_value"] - value)
        value += ring[hit] * (spec["rim_value"] - value)
        raw[where] = value

    def _draw_mitos(
        self,
        raw: np.ndarray,
        coords: list[np.ndarray],
        off: Shape3,
        shp: Shape3,
        neuron_ids: np.ndarray,
        wall: np.ndarray,
    ) -> np.ndarray:
        """Paint mitochondria into ``raw`` and return their ids for the block.

        Each voxel goes to the object it is deepest inside ("depth" = nm inside the outer
        membrane); objects are visited in global order with a strict comparison, so ties
        and overlaps resolve the same in every block.
        """
        lo_b, hi_b = np.asarray(off), np.asarray(off) + np.asarray(shp)
        depth = np.full(shp, -_MITO_OUTER_BAND_NM)
        winner = np.full(shp, -1, dtype=np.int64)
        arc = np.zeros(shp)
        hits = np.nonzero(np.all((self._mito_lo < hi_b) & (self._mito_hi > lo_b), axis=1))[0]
        for k in hits:
            m = self._mitos[k]
            olo = np.maximum(m.vox_lo.min(0), lo_b)
            ohi = np.minimum(m.vox_hi.max(0), hi_b)
            region = tuple(slice(lo - o, hi - o) for lo, hi, o in zip(olo, ohi, off, strict=True))
            host = neuron_ids[region] == m.host
            if not host.any():
                continue
            shape = tuple(ohi - olo)
            d2 = np.full(shape, np.inf)
            s_at = np.zeros(shape)
            r_at = np.zeros(shape)
            for j in range(len(m.a)):
                slo = np.maximum(m.vox_lo[j], olo)
                shi = np.minimum(m.vox_hi[j], ohi)
                if np.any(slo >= shi):
                    continue
                sub = tuple(slice(lo - o, hi - o) for lo, hi, o in zip(slo, shi, olo, strict=True))
                a, v = m.a[j], m.b[j] - m.a[j]
                vv = float(v @ v)
                # |p - a - t v|² with t clamped to the segment, by broadcasting the axes
                pa = [coords[ax][slo[ax] - off[ax] : shi[ax] - off[ax]] - a[ax] for ax in range(3)]
                pz, py, px = pa[0][:, None, None], pa[1][None, :, None], pa[2][None, None, :]
                w = pz * v[0] + py * v[1] + px * v[2]
                t = np.clip(w / vv, 0.0, 1.0)
                dist2 = (pz * pz + py * py + px * px) - 2.0 * t * w + t * t * vv
                better = dist2 < d2[sub]
                d2[sub] = np.where(better, dist2, d2[sub])
                s_at[sub] = np.where(better, m.s[j, 0] + t * (m.s[j, 1] - m.s[j, 0]), s_at[sub])
                r_at[sub] = np.where(better, m.r[j, 0] + t * (m.r[j, 1] - m.r[j, 0]), r_at[sub])
            dep = np.minimum(r_at - np.sqrt(d2), wall[region] - _MITO_GAP_NM)
            dep = np.where(host, dep, -np.inf)
            upd = dep > depth[region]
            depth[region] = np.where(upd, dep, depth[region])
            winner[region] = np.where(upd, k, winner[region])
            arc[region] = np.where(upd, s_at, arc[region])

        mito_ids = np.zeros(shp, dtype=np.uint32)
        painted = winner >= 0
        if not painted.any():
            return mito_ids
        idents = np.array([m.ident for m in self._mitos], dtype=np.uint32)
        matrix = np.array([m.matrix for m in self._mitos])
        period = np.array([m.period for m in self._mitos])
        duty = np.array([m.duty for m in self._mitos])
        phase = np.array([m.phase for m in self._mitos])

        wv = winner[painted]
        dv = depth[painted]
        inside = dv > 0.0
        mito_ids[painted] = np.where(inside, idents[wv], 0)

        # cristae: sheets across the tube, a triangle wave of arc length with wobble
        # smooth noise only over the box that holds painted voxels (often a small part)
        nzs = [
            np.nonzero(painted.any(axis=tuple(b for b in range(3) if b != a)))[0] for a in range(3)
        ]
        box = tuple(slice(n[0], n[-1] + 1) for n in nzs)
        sub_coords = [c[b] for c, b in zip(coords, box, strict=True)]
        sub_painted = painted[box]
        wobble = _value_noise_grid(self.seed, _S_CRISTA, sub_coords, 70.0)[sub_painted]
        gaps = _value_noise_grid(self.seed, _S_CRISTA + 1, sub_coords, 45.0)[sub_painted]
        x = arc[painted] / period[wv] + phase[wv] + 0.3 * wobble
        tri = np.abs(2.0 * (x - np.floor(x)) - 1.0)  # 1 at sheet centres, 0 between
        crista = np.clip((tri - (1.0 - duty[wv])) / 0.12, 0.0, 1.0)
        crista *= np.clip((dv - 22.0) / 6.0, 0.0, 1.0) * np.clip((gaps + 0.55) / 0.2, 0.0, 1.0)
        value = matrix[wv] + crista * (_CRISTA_VALUE - matrix[wv])
        # double membrane: outer and inner dark bands just inside the surface
        ring = np.maximum(_bump((dv - 4.0) / 7.0), 0.85 * _bump((dv - 17.0) / 5.5))
        value = value + ring * (_RING_VALUE - value)
        cur = raw[painted]
        outer = ring * (_RING_VALUE - cur) + cur  # outside the label only the blurred rim shows
        raw[painted] = np.where(inside, value, outer)
        return mito_ids

    def _acquire(self, raw: np.ndarray, off: Shape3, shp: Shape3) -> np.ndarray:
        """Noise and drift, then quantise to uint8."""
        z, y, x = (np.arange(o, o + s, dtype=np.int64) for o, s in zip(off, shp, strict=True))
        linear = (z[:, None, None] * self.shape[1] + y[None, :, None]) * self.shape[2] + x[
            None, None, :
        ]
        noise = _gaussianish(_hash(self.seed, _S_NOISE, linear))
        raw = raw + _NOISE_SIGMA * np.sqrt(np.clip(raw, 1.0, None) / 128.0) * noise
        # slow drift: gain and offset vary linearly from one corner of the volume to the other
        t = (
            (z[:, None, None] + 0.5) / self.shape[0]
            + (y[None, :, None] + 0.5) / self.shape[1]
            + (x[None, None, :] + 0.5) / self.shape[2]
        ) / 3.0 - 0.5
        raw = raw * (1.0 + 2.0 * _DRIFT_GAIN * t) + 20.0 * t
        return np.clip(np.rint(raw), 0, 255).astype(np.uint8)


# --- functional API -------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _volume(shape: Shape3, seed: int, resolution: tuple[float, float, float]) -> SyntheticVolume:
    return SyntheticVolume(shape, seed, resolution)


def _cached_volume(shape: Sequence[int], seed: int, resolution: Sequence[float]) -> SyntheticVolume:
    shp = _as_shape(shape, "volume_shape")
    _check_positive(shp, "volume_shape")
    try:
        res = tuple(float(r) for r in resolution)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"resolution: expected 3 positive numbers (nm, z y x), got {resolution!r}"
        ) from e
    return _volume(shp, seed, res)  # type: ignore[arg-type]


def generate_block(
    roi_offset: Sequence[int],
    roi_shape: Sequence[int],
    volume_shape: Sequence[int],
    seed: int,
    resolution: Sequence[float] = (8, 8, 8),
) -> dict[str, np.ndarray]:
    """Render one region (voxels, z y x) of the synthetic volume ``(volume_shape, seed)``.

    Returns ``raw`` (uint8), ``mito_ids`` and ``neuron_ids`` (uint32) of ``roi_shape``;
    the same voxels always get the same values, whatever the region.
    """
    return _cached_volume(volume_shape, seed, resolution).render(roi_offset, roi_shape)


def _tiles(shape: Shape3, tile: Shape3):
    for z in range(0, shape[0], tile[0]):
        for y in range(0, shape[1], tile[1]):
            for x in range(0, shape[2], tile[2]):
                off = (z, y, x)
                yield off, tuple(min(t, s - o) for t, s, o in zip(tile, shape, off, strict=True))


def _render_tiles(
    vol: SyntheticVolume, tiles: Sequence[tuple[Shape3, Shape3]], workers: int | None = None
):
    """Yield ``(offset, shape, block)`` for each tile, in order, rendered by a few threads.

    numpy releases the GIL in the heavy loops, so threads give a near-linear speed-up; at
    most ``2 * workers`` blocks are in flight, so memory stays bounded for huge volumes.
    """
    # The CPUs this process may use (affinity, cgroup quota), not the node's count.
    workers = workers or min(4, available_cpus())
    if workers == 1 or len(tiles) == 1:
        for off, shp in tiles:
            yield off, shp, vol.render(off, shp)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for off, shp in tiles:
            pending.append((off, shp, pool.submit(vol.render, off, shp)))
            if len(pending) >= 2 * workers:
                o, s, fut = pending.popleft()
                yield o, s, fut.result()
        while pending:
            o, s, fut = pending.popleft()
            yield o, s, fut.result()


def make_volume(
    shape: Sequence[int], seed: int = 0, resolution: Sequence[float] = (8, 8, 8)
) -> dict[str, np.ndarray]:
    """A whole synthetic volume in memory: ``raw``, ``mito_ids``, ``neuron_ids`` (z, y, x)."""
    vol = _cached_volume(shape, seed, resolution)
    out = {
        "raw": np.zeros(vol.shape, np.uint8),
        "mito_ids": np.zeros(vol.shape, np.uint32),
        "neuron_ids": np.zeros(vol.shape, np.uint32),
    }
    # render in tiles to bound the float64 temporaries (about 60 bytes per voxel)
    for off, shp, block in _render_tiles(vol, list(_tiles(vol.shape, (64, 128, 128)))):
        sl = tuple(slice(o, o + s) for o, s in zip(off, shp, strict=True))
        for key, arr in block.items():
            out[key][sl] = arr
    return out


def write_synthetic_dataset(
    url: str,
    shape: Sequence[int] = (128, 128, 128),
    seed: int = 0,
    resolution: Sequence[float] = (8, 8, 8),
    chunks: Sequence[int] = (64, 64, 64),
    storage_options: dict | None = None,
    zarr_format: int = 3,
    progress: bool = False,
) -> str:
    """Write a synthetic dataset into the Zarr group at ``url`` and return ``url``.

    Layout: ``volumes/raw`` (uint8), ``volumes/labels/mito_ids`` and
    ``volumes/labels/neuron_ids`` (uint32), all (z, y, x) of ``shape`` voxels, chunked by
    ``chunks``, with ``resolution`` (nm) and ``offset`` ``[0, 0, 0]`` as attributes; each
    is an OME-NGFF multiscale group holding level ``0``, the ids as label images (see
    :mod:`catena_mito.ome`; ``catena-mito pyramid`` adds coarser levels). The
    volume is rendered one chunk at a time (a few threads), so its size is not limited by
    memory. ``url`` is a local path, ``memory://…`` or ``s3://…``; arrays already at those
    paths are replaced. The group's ``synthetic`` attribute records seed, shape and
    resolution, so the data can be regenerated exactly.
    """
    from catena_mito import storage

    vol = _cached_volume(shape, seed, resolution)
    chk = _as_shape(chunks, "chunks")
    _check_positive(chk, "chunks")
    if zarr_format not in (2, 3):
        raise ConfigError(f"zarr_format: expected 2 or 3, got {zarr_format!r}")

    root = storage.open_group(url, mode="a", storage_options=storage_options, zarr_format=zarr_format)
    root.require_group("volumes").require_group("labels")
    # Before the arrays: create_array adds OME-NGFF entries to the root's attributes, which
    # an update through this (older) handle afterwards would overwrite.
    root.attrs.update(
        {"synthetic": {"seed": vol.seed, "shape": list(vol.shape), "resolution": list(vol.resolution)}}
    )
    attrs = storage.spatial_attrs(vol.resolution, (0, 0, 0))
    layout = {
        "raw": (storage.RAW_PATH, np.uint8),
        "mito_ids": (storage.LABEL_PATHS["mito"], np.uint32),
        "neuron_ids": (storage.LABEL_PATHS["neuron"], np.uint32),
    }
    arrays = {
        key: storage.create_array(
            storage.join_url(url, path), vol.shape, dtype, chk, overwrite=True, attrs=attrs,
            storage_options=storage_options, zarr_format=zarr_format,
        )
        for key, (path, dtype) in layout.items()
    }
    tiles = list(_tiles(vol.shape, chk))
    blocks = _render_tiles(vol, tiles)
    if progress:
        from tqdm import tqdm

        blocks = tqdm(blocks, total=len(tiles), desc="synthesising", unit="chunk")
    for off, shp, block in blocks:
        sl = tuple(slice(o, o + s) for o, s in zip(off, shp, strict=True))
        for key, arr in arrays.items():
            arr[sl] = block[key]
    return url


def best_global_threshold_iou(raw: np.ndarray, foreground: np.ndarray) -> tuple[float, str, int]:
    """The best IoU with ``foreground`` that a single global threshold on ``raw`` reaches.

    Scans all 256 levels of a uint8 ``raw`` in both polarities (``raw <= t`` and
    ``raw >= t``); returns ``(iou, polarity, t)``. Used to check that the synthetic data
    cannot be segmented by intensity alone.
    """
    raw = np.asarray(raw)
    fg = np.asarray(foreground, dtype=bool)
    if raw.dtype != np.uint8 or raw.shape != fg.shape:
        raise DataError(
            f"raw: expected uint8 of shape {list(fg.shape)}, got {raw.dtype} {list(raw.shape)}"
        )
    h_fg = np.bincount(raw[fg], minlength=256).astype(np.float64)
    h_bg = np.bincount(raw[~fg], minlength=256).astype(np.float64)
    total = h_fg.sum()
    best = (0.0, "<=", 0)
    for polarity, f, b in (("<=", h_fg, h_bg), (">=", h_fg[::-1], h_bg[::-1])):
        tp, fp = np.cumsum(f), np.cumsum(b)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.nan_to_num(tp / (total + fp))
        i = int(np.argmax(iou))
        if iou[i] > best[0]:
            best = (float(iou[i]), polarity, i if polarity == "<=" else 255 - i)
    return best
