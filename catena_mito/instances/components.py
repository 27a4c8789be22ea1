"""Connected components of one binary block (provisional labels, deterministic)."""

from __future__ import annotations

import numpy as np


def connected_components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Provisional labels ``1..n`` of a binary block (deterministic), and ``n``."""
    if not mask.any():  # skip cc3d on empty blocks, the common case in sparse volumes
        return np.zeros(mask.shape, np.uint8), 0
    if min(mask.shape) == 1:
        # cc3d 4.1 under-allocates its union-find for 26-connected blocks one voxel thick
        # ("Label 2 cannot be mapped to union-find array of length 2"), as the last block
        # is when the volume is one voxel longer than a multiple of chunk_size; such thin
        # blocks are cheap, so scipy labels them (deterministically, like cc3d)
        from scipy import ndimage

        rank = {6: 1, 18: 2, 26: 3}[connectivity]
        labels, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, rank))
        return labels.astype(np.uint32, copy=False), int(n)
    import cc3d

    labels, n = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)
    return labels, int(n)
