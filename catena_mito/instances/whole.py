"""The instance modes on a whole volume in memory: what ``label`` writes, block by block.

For callers that hold a small volume anyway (``evaluate`` on a crop, the demo, sweeps):
:func:`instances_whole_volume` gives the same ids as ``label`` with the same settings, for
any block shape and shard count (tested), without writing anything.
"""

from __future__ import annotations

import numpy as np

from catena_mito.instances import seeds as seed_rules
from catena_mito.instances.components import connected_components
from catena_mito.instances.grow import grow
from catena_mito.instances.settings import CONNECTED_COMPONENTS, CONTOUR, DISTANCE, InstanceSettings
from catena_mito.instances.threshold import foreground


def number_by_first_voxel(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Relabel ``labels`` to ``1..K``: objects of ``>= min_size`` voxels, by first voxel (C order)."""
    import fastremap

    ids, first, counts = fastremap.unique(labels, return_index=True, return_counts=True)
    keep = (ids != 0) & (counts >= min_size)
    order = ids[keep][np.argsort(first[keep], kind="stable")]
    table = np.zeros(int(ids.max()) + 1 if ids.size else 1, np.uint32)
    table[order] = np.arange(1, len(order) + 1, dtype=np.uint32)
    return table[labels]


def seed_mask(fg: np.ndarray, contour: np.ndarray | None, s: InstanceSettings, where: str = "input") -> np.ndarray:
    """The seeds of ``s.mode`` on a whole volume (or a block read with its halo)."""
    mask = foreground(fg, s.thres_foreground, where)
    if s.mode == CONTOUR:
        if contour is None:
            raise ValueError("instance mode 'contour' needs a contour volume")
        return seed_rules.contour_seeds(mask, foreground(fg, s.thres_seed, where),
                                        ~foreground(contour, s.thres_contour, where))
    if s.mode == DISTANCE:
        return seed_rules.distance_seeds(mask, s.seed_distance, s.resolution)
    raise ValueError(f"no seeds in instance mode {s.mode!r}")


def instances_whole_volume(fg: np.ndarray, contour: np.ndarray | None, s: InstanceSettings) -> np.ndarray:
    """Instance ids (uint32, z y x) of probabilities ``fg`` (and ``contour``) under ``s``."""
    mask = foreground(fg, s.thres_foreground)
    if s.mode == CONNECTED_COMPONENTS:
        labels, _ = connected_components(mask, s.connectivity)
        return number_by_first_voxel(labels, s.thres_small_instances)
    seeds, _ = connected_components(seed_mask(fg, contour, s), s.connectivity)
    numbered = number_by_first_voxel(seeds, s.thres_small_seeds)
    grown = grow(numbered, mask, s.connectivity, s.grow_distance)
    # survivors keep the order of their seed ids
    counts = np.bincount(grown.ravel(), minlength=int(numbered.max()) + 1)
    keep = counts >= s.thres_small_instances
    keep[0] = False
    table = np.zeros(len(counts), np.uint32)
    table[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return table[grown]
