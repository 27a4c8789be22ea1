"""Seed growth: every mask voxel takes the nearest seed, by geodesic distance in the mask.

The rule (exact, and the same for a whole volume and for a block read with its halo):

* a *step* goes from a voxel to one of its neighbours under the configured connectivity
  (6, 18 or 26: coordinates differ by at most 1 per axis, in at most 1, 2 or 3 axes);
* the geodesic distance ``d(v, s)`` from a mask voxel ``v`` to a seed ``s`` is the least
  number of steps of a path from ``s`` to ``v`` whose voxels all lie in the mask;
* a mask voxel with a seed at distance ``<= distance`` takes the id of its nearest seed;
  among several nearest seeds, the smallest id; every other voxel is 0 (seed voxels keep
  their own id, at distance 0; seed voxels outside the mask are ignored).

**Halo.** A path of at most ``D`` steps never leaves the box of chessboard radius ``D``
around its end, so the answer at a voxel depends only on the seeds and mask within ``D``
voxels per axis: a block read with a halo of ``D`` (clipped at the volume's edge) and
cropped back to its write region is exactly the whole-volume answer.

**Method.** A level-synchronous multi-source breadth-first search on flat indices: level
``k`` holds the voxels at distance exactly ``k`` from their nearest seed, and a voxel's id
is the minimum over its level ``k - 1`` neighbours (a voxel at distance ``k`` from seed
``s`` has a neighbour at distance ``k - 1`` from ``s`` on a shortest path, and every level
``k - 1`` neighbour's seed lies at distance ``k``; so the minimum is the smallest nearest
seed). Each level costs ``neighbours × min(open voxels, previous level)`` gathers, plus a
few dense passes over the block in all, never a dense filter per level.
Axis order (z, y, x); distances in steps (voxels).
"""

from __future__ import annotations

import itertools

import numpy as np

#: Largest number of axes in which two neighbouring voxels may differ, per connectivity.
_MAX_AXES = {6: 1, 18: 2, 26: 3}


def neighbour_offsets(connectivity: int) -> tuple[tuple[int, int, int], ...]:
    """The grid offsets of a voxel's neighbours under ``connectivity`` (6, 18 or 26)."""
    if connectivity not in _MAX_AXES:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity!r}")
    allowed = _MAX_AXES[connectivity]
    return tuple(d for d in itertools.product((-1, 0, 1), repeat=3)  # type: ignore[misc]
                 if 0 < sum(1 for c in d if c) <= allowed)


def grow(seeds: np.ndarray, mask: np.ndarray, connectivity: int, distance: int) -> np.ndarray:
    """Grow ``seeds`` (ids, 0 = none) into ``mask`` by the rule of the module docstring.

    Returns a new array of the dtype of ``seeds``, of their shape (z, y, x).
    """
    if seeds.shape != mask.shape or seeds.ndim != 3:
        raise ValueError(f"seeds {seeds.shape} and mask {mask.shape} must be the same 3-D shape")
    if not np.issubdtype(seeds.dtype, np.unsignedinteger):
        raise ValueError(f"seed ids must be unsigned integers, got {seeds.dtype}")
    inner = (slice(1, -1),) * 3
    # One voxel of padding outside the mask, so that a neighbour's flat index never wraps
    # around to the other side of the block and needs no bounds check.
    padded = tuple(s + 2 for s in seeds.shape)
    labels = np.zeros(padded, seeds.dtype)
    np.multiply(seeds, mask, out=labels[inner], casting="unsafe")  # seeds outside the mask: none
    if distance <= 0 or not labels.any():
        return np.ascontiguousarray(labels[inner])
    # ``open_`` marks mask voxels not reached yet (before the current level)
    open_ = np.zeros(padded, bool)
    np.logical_and(mask, labels[inner] == 0, out=open_[inner])
    flat_labels = labels.reshape(-1)
    flat_open = open_.reshape(-1)
    band = np.flatnonzero(flat_open)
    if band.size == 0:
        return np.ascontiguousarray(labels[inner])
    strides = (padded[1] * padded[2], padded[2], 1)
    offsets = [int(np.dot(d, strides)) for d in neighbour_offsets(connectivity)]

    # Each level is computed from whichever side is smaller: *pulled* by the open voxels
    # (each looks at its neighbours in the previous level) or *pushed* by the previous
    # level (each offers its id to its open neighbours). Level 1 is almost always a pull
    # (seeds fill most of the mask, the band is thin), later levels a push, and the last
    # ones a pull again when few voxels are left open. Both give the same ids.
    front = flat_labels != 0  # level 0: the seeds
    frontier: np.ndarray | None = None  # flat indices of the previous level (None: all seeds)
    for _level in range(1, distance + 1):
        band = band[flat_open[band]]  # the voxels still open
        if band.size == 0 or (frontier is not None and frontier.size == 0):
            break
        if frontier is None:
            reached = _level_one(band, labels, connectivity, offsets)
        elif band.size <= frontier.size:
            reached = _pull(band, flat_labels, front, offsets, seeds.dtype)
        else:
            reached = _push(frontier, flat_labels, flat_open, offsets)
        flat_open[reached] = False
        if frontier is None:
            front[:] = False
        else:
            front[frontier] = False
        front[reached] = True
        frontier = reached
    return np.ascontiguousarray(labels[inner])


def _level_one(band: np.ndarray, labels: np.ndarray, connectivity: int, offsets: list[int]) -> np.ndarray:
    """Level 1: each open voxel next to a seed takes the least neighbouring seed id.

    Seeds fill most of the mask and the band around them is thick (half the mask for a
    one-voxel contour on thin tubes), so this one level is a dense minimum over the
    padded block — separable (three passes of three) for 26-connectivity, one pass per
    neighbour otherwise — instead of ``neighbours`` gathers over the band.
    """
    # ids minus one, wrapping 0 (no seed) to the largest value: the minimum is then the
    # least seed id, and adding one back maps "no seed" to 0 again
    big = labels - labels.dtype.type(1)
    if connectivity == 26:
        # Two buffers in turn, no copies: the pass along axis ``a`` writes the planes
        # 1..-2 of that axis; its planes 0 and -1 are padding, "no seed" in ``big`` and
        # after every pass (a minimum over padding voxels only), so they are set once.
        m, out = big, np.empty_like(big)
        for a in range(3):
            centre = tuple(slice(1, -1) if b == a else slice(None) for b in range(3))
            lower = tuple(slice(0, -2) if b == a else slice(None) for b in range(3))
            upper = tuple(slice(2, None) if b == a else slice(None) for b in range(3))
            for edge in (0, -1):
                out[(slice(None),) * a + (edge,)] = np.iinfo(labels.dtype).max
            np.minimum(m[lower], m[upper], out=out[centre])
            np.minimum(out[centre], m[centre], out=out[centre])
            m, out = out, m
        near = m.reshape(-1)[band]
    else:
        flat = big.reshape(-1)
        near = np.full(band.size, np.iinfo(labels.dtype).max, labels.dtype)
        for o in offsets:
            np.minimum(near, flat[band + o], out=near)
    near += labels.dtype.type(1)
    hit = near != 0
    reached = band[hit]
    labels.reshape(-1)[reached] = near[hit]
    return reached


def _pull(open_voxels: np.ndarray, flat_labels: np.ndarray, front: np.ndarray, offsets: list[int],
          dtype: np.dtype) -> np.ndarray:
    """One level by pulling: each open voxel takes the least id among its previous-level
    neighbours; returns the voxels reached (and sets their ids)."""
    best = np.zeros(open_voxels.size, dtype)
    for o in offsets:
        u = open_voxels + o
        v = np.where(front[u], flat_labels[u], 0)
        take = (v != 0) & ((best == 0) | (v < best))
        best[take] = v[take]
    hit = best != 0
    reached = open_voxels[hit]
    flat_labels[reached] = best[hit]
    return reached


def _push(frontier: np.ndarray, flat_labels: np.ndarray, flat_open: np.ndarray, offsets: list[int]) -> np.ndarray:
    """One level by pushing: the previous level offers its ids to its open neighbours,
    the least id wins; returns the voxels reached (and sets their ids)."""
    ids = flat_labels[frontier]
    reached = []
    for o in offsets:
        # one offset maps distinct frontier voxels to distinct targets: no repeats here
        target = frontier + o
        ok = flat_open[target]
        target, candidate = target[ok], ids[ok]
        current = flat_labels[target]
        first = current == 0  # not reached by an earlier offset of this level
        reached.append(target[first])
        flat_labels[target] = np.where(first, candidate, np.minimum(current, candidate))
    return np.concatenate(reached) if reached else np.zeros(0, np.intp)
