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


def seeds_and_mask(fg: np.ndarray, contour: np.ndarray | None, s: InstanceSettings,
                   where: str = "input") -> tuple[np.ndarray, np.ndarray]:
    """The seeds of ``s.mode`` and the foreground mask, on a whole volume (or a block read
    with its halo)."""
    mask = foreground(fg, s.thres_foreground, where)
    if s.mode == CONTOUR:
        if contour is None:
            raise ValueError("instance mode 'contour' needs a contour volume")
        high = mask if s.thres_seed <= s.thres_foreground else foreground(fg, s.thres_seed, where)
        return seed_rules.contour_seeds(mask, high, ~foreground(contour, s.thres_contour, where)), mask
    if s.mode == DISTANCE:
        return seed_rules.distance_seeds(mask, s.seed_distance, s.resolution), mask
    raise ValueError(f"no seeds in instance mode {s.mode!r}")


def seed_mask(fg: np.ndarray, contour: np.ndarray | None, s: InstanceSettings, where: str = "input") -> np.ndarray:
    """The seeds of ``s.mode`` (see :func:`seeds_and_mask`)."""
    return seeds_and_mask(fg, contour, s, where)[0]


def instances_whole_volume(fg: np.ndarray, contour: np.ndarray | None, s: InstanceSettings) -> np.ndarray:
    """Instance ids (uint32, z y x) of probabilities ``fg`` (and ``contour``) under ``s``
    (the rules in :mod:`catena_mito.instances.settings`)."""
    mask = foreground(fg, s.thres_foreground)
    if s.mode == CONNECTED_COMPONENTS:
        labels, _ = connected_components(mask, s.connectivity)
        return number_by_first_voxel(labels, s.thres_small_instances)
    seeds, _ = connected_components(seed_mask(fg, contour, s), s.connectivity)
    numbered = number_by_first_voxel(seeds, s.thres_small_seeds)
    grown = grow(numbered, mask, s.connectivity, s.grow_distance).astype(np.int64, copy=False)
    num_seeds = int(numbered.max()) if numbered.size else 0
    if s.unseeded_components:
        # the connected components of the foreground that hold no grown voxel (no seed
        # reached them), after the seed ids, by first voxel
        comp, _ = connected_components(mask, s.connectivity)
        seeded = np.unique(comp[grown > 0])
        rest = number_by_first_voxel(np.where(np.isin(comp, seeded), 0, comp), 0)
        grown = np.where(rest > 0, rest.astype(np.int64) + num_seeds, grown)
    # survivors keep the order of their ids (seeds, then unseeded components)
    counts = np.bincount(grown.ravel(), minlength=num_seeds + 1)
    keep = counts >= s.thres_small_instances
    keep[0] = False
    table = np.zeros(len(counts), np.uint32)
    table[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return table[grown]
