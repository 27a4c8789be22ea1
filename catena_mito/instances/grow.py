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
seed). The work is about ``2 × neighbours × (mask voxels not in a seed)`` array
operations plus a few dense passes over the block, never a dense filter per level.
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
    labels[inner] = seeds
    labels[inner][~mask] = 0
    if distance <= 0 or not labels.any():
        return np.ascontiguousarray(labels[inner])
    # ``open_`` marks mask voxels not reached yet (before the current level)
    open_ = np.zeros(padded, bool)
    open_[inner] = mask
    open_ &= labels == 0
    flat_labels = labels.reshape(-1)
    flat_open = open_.reshape(-1)
    band = np.flatnonzero(flat_open)
    if band.size == 0:
        return np.ascontiguousarray(labels[inner])
    strides = (padded[1] * padded[2], padded[2], 1)
    offsets = [int(np.dot(d, strides)) for d in neighbour_offsets(connectivity)]

    # Level 1, pulled from the band (mask voxels outside seeds) rather than pushed from
    # every seed voxel: seeds fill most of the mask, the band is thin.
    best = np.zeros(band.size, seeds.dtype)
    for o in offsets:
        v = flat_labels[band + o]
        take = (v != 0) & ((best == 0) | (v < best))
        best[take] = v[take]
    hit = best != 0
    frontier = band[hit]
    flat_labels[frontier] = best[hit]
    flat_open[frontier] = False
    del band, best, hit

    for _level in range(2, distance + 1):
        if frontier.size == 0:
            break
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
        frontier = np.concatenate(reached) if reached else np.zeros(0, np.intp)
        flat_open[frontier] = False
    return np.ascontiguousarray(labels[inner])
