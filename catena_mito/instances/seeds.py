"""Seed masks of the instance modes, and the halo each needs to be exact block by block.

``contour`` (foreground + contour predictions; pytorch_connectomics' ``bc_watershed``
seeds)::

    seed = (foreground > thres_foreground) and (foreground > thres_seed)
           and (contour <= thres_contour)

pointwise, so a block needs no halo. ``distance`` (foreground-only models)::

    seed = mask voxel with no background voxel at Euclidean distance < seed_distance (nm)

with ``mask = foreground > thres_foreground``, distances between voxel centres scaled by
the volume's resolution (z, y, x nm), so anisotropic data is measured in nm. Voxels
outside the volume count as foreground (an object cut by the volume's edge may go on
beyond it, as in :func:`catena_mito.targets.instance_contour`). The distance transform
is only ever compared with ``seed_distance``, so it is capped there: a background voxel
further away than that along one axis cannot matter, and a halo of
``ceil(seed_distance / resolution)`` voxels per axis makes a block exact. Seeds are then
numbered by exact connected components and grown (:mod:`catena_mito.instances.grow`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def contour_seeds(mask: np.ndarray, high: np.ndarray, low_contour: np.ndarray) -> np.ndarray:
    """``mask & high & low_contour`` (each a bool array: the three conditions above)."""
    return mask & high & low_contour


def distance_halo(seed_distance: float, resolution: Sequence[float]) -> tuple[int, int, int]:
    """Voxels per axis (z, y, x) beyond which background cannot be closer than ``seed_distance``."""
    return tuple(int(math.ceil(seed_distance / float(r))) for r in resolution)  # type: ignore[return-value]


def distance_seeds(mask: np.ndarray, seed_distance: float, resolution: Sequence[float]) -> np.ndarray:
    """Mask voxels whose nearest background voxel is at least ``seed_distance`` nm away.

    Outside the array counts as foreground: a caller that reads a block with the halo of
    :func:`distance_halo` gets, inside the block, the answer of the whole volume.
    """
    from scipy import ndimage

    mask = np.ascontiguousarray(mask, dtype=bool)
    if mask.all():  # no background within reach: every voxel is far enough
        return mask.copy()
    if not mask.any():
        return mask.copy()
    edt = ndimage.distance_transform_edt(mask, sampling=[float(r) for r in resolution])
    return mask & (edt >= seed_distance)
