"""Exact block-wise connected components: the pure parts (no I/O).

Connected components of a volume cut into blocks are found in three steps (the scheme of
igneous' ``ccl``: faces → equivalences → a global relabel table):

1. **per block**: label the block on its own (provisional labels ``1..n``), and keep for
   each label its voxel count and its first voxel in *global* C order, plus the block's
   six boundary planes of labels (:class:`BlockResult`);
2. **merge**: two provisional labels of neighbouring blocks are the same object when a
   voxel of one touches a voxel of the other across the shared boundary
   (:func:`boundary_pairs`); a union-find over all such pairs gives the global objects,
   whose size is the sum of their parts and whose first voxel is the least of their parts'
   (:func:`global_table`);
3. **relabel**: each block maps its provisional labels through its row of the table.

Which voxels touch across a boundary depends on the connectivity. Two voxels are
neighbours when their coordinates differ by at most 1 per axis and in at most
``{6: 1, 18: 2, 26: 3}[connectivity]`` axes. Blocks that share a face (k = 1 crossing
axis), an edge (k = 2) or only a corner (k = 3) each contribute; the crossing axes
already use k of the allowed differing axes, so within the shared (3 - k)-dimensional
contact region a voxel may pair with its partner shifted by ±1 in at most
``allowed - k`` further axes::

    across a face          6-conn: 1 partner   18-conn: 5   26-conn: 9
    across an edge         6-conn: none        18-conn: 1   26-conn: 3
    across a corner        6-conn: none        18-conn: none 26-conn: 1

Because everything is derived from the single-shot definition of adjacency, the result
equals one connected-components pass over the whole volume, for any block shape.
Axis order is (z, y, x); sizes and positions are in voxels.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

#: Largest number of axes in which two neighbouring voxels may differ, per connectivity.
MAX_DIFFERING_AXES = {6: 1, 18: 2, 26: 3}

#: The 13 grid offsets to a neighbouring block that comes *later* in C order (first
#: non-zero component +1). Each unordered pair of touching blocks is visited once.
FORWARD_OFFSETS: tuple[tuple[int, int, int], ...] = tuple(
    d for d in itertools.product((-1, 0, 1), repeat=3)
    if any(d) and next(c for c in d if c) == 1
)


def forward_offsets(connectivity: int) -> tuple[tuple[int, int, int], ...]:
    """The forward block offsets whose contact can join objects at ``connectivity``."""
    allowed = MAX_DIFFERING_AXES[connectivity]
    return tuple(d for d in FORWARD_OFFSETS if sum(1 for c in d if c) <= allowed)


@dataclass
class BlockResult:
    """What the ``blocks`` phase keeps of one block (everything the merge needs).

    ``sizes[i]`` and ``first[i]`` describe provisional label ``i + 1``: its voxel count and
    the global C-order linear index of its first voxel. ``lower[a]`` / ``upper[a]`` are
    the block's first / last plane of provisional labels across axis ``a`` (z, y, x).
    ``drop[i]`` (optional) marks label ``i + 1`` as part of an object that is removed
    whatever its size (see :func:`global_table`).
    """

    offset: tuple[int, int, int]
    shape: tuple[int, int, int]
    sizes: np.ndarray
    first: np.ndarray
    lower: tuple[np.ndarray, np.ndarray, np.ndarray]
    upper: tuple[np.ndarray, np.ndarray, np.ndarray]
    drop: np.ndarray | None = None

    @property
    def num_labels(self) -> int:
        return int(self.sizes.shape[0])

    @classmethod
    def from_labels(
        cls, labels: np.ndarray, num_labels: int, offset: Sequence[int], volume_shape: Sequence[int]
    ) -> BlockResult:
        """Summarise a block's provisional ``labels`` (``1..num_labels``, 0 = background)."""
        offset = tuple(int(o) for o in offset)
        shape = tuple(int(s) for s in labels.shape)
        if num_labels == 0:
            sizes = np.zeros(0, np.int64)
            first = np.zeros(0, np.int64)
        else:
            import fastremap

            uniq, index, counts = fastremap.unique(labels, return_index=True, return_counts=True)
            if uniq[0] == 0:
                uniq, index, counts = uniq[1:], index[1:], counts[1:]
            if len(uniq) != num_labels or uniq[-1] != num_labels:
                raise ValueError(f"labels are not 1..{num_labels} (found {len(uniq)} distinct)")
            local = np.unravel_index(np.asarray(index, np.int64), shape)
            first = np.ravel_multi_index(
                tuple(np.asarray(c, np.int64) + o for c, o in zip(local, offset)),
                tuple(int(s) for s in volume_shape),
            ).astype(np.int64)
            sizes = np.asarray(counts, np.int64)
        dtype = _label_dtype(num_labels)
        lower = tuple(np.ascontiguousarray(np.take(labels, 0, axis=a)).astype(dtype) for a in range(3))
        upper = tuple(np.ascontiguousarray(np.take(labels, -1, axis=a)).astype(dtype) for a in range(3))
        return cls(offset, shape, sizes, first, lower, upper)  # type: ignore[arg-type]

    def to_npz_dict(self) -> dict[str, np.ndarray]:
        out = {
            "offset": np.asarray(self.offset, np.int64),
            "shape": np.asarray(self.shape, np.int64),
            "sizes": self.sizes,
            "first": self.first,
        }
        for a in range(3):
            out[f"lower{a}"] = self.lower[a]
            out[f"upper{a}"] = self.upper[a]
        if self.drop is not None:
            out["drop"] = np.asarray(self.drop, bool)
        return out

    @classmethod
    def from_npz_dict(cls, d) -> BlockResult:
        return cls(
            tuple(int(v) for v in d["offset"]),  # type: ignore[arg-type]
            tuple(int(v) for v in d["shape"]),  # type: ignore[arg-type]
            np.asarray(d["sizes"], np.int64),
            np.asarray(d["first"], np.int64),
            tuple(np.asarray(d[f"lower{a}"]) for a in range(3)),  # type: ignore[arg-type]
            tuple(np.asarray(d[f"upper{a}"]) for a in range(3)),  # type: ignore[arg-type]
            np.asarray(d["drop"], bool) if "drop" in d else None,
        )


def _label_dtype(num_labels: int) -> np.dtype:
    """The smallest unsigned dtype holding ``0..num_labels`` (keeps face planes small)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_labels <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def _contact(planes: tuple[np.ndarray, np.ndarray, np.ndarray], d: Sequence[int], ahead: bool) -> np.ndarray:
    """A block's voxels on its contact with a block at forward grid offset ``d``.

    With ``ahead`` the neighbour lies at ``+d`` and ``planes`` are the block's ``upper``
    planes; otherwise the neighbour lies at ``-d`` and ``planes`` are its ``lower`` ones
    (forward offsets are +1 on their first crossing axis, so one plane always holds the
    whole contact). The result is indexed by the axes where ``d`` is 0, in order: a
    plane, a line or a single voxel.
    """
    first_axis = next(a for a in range(3) if d[a])
    plane = planes[first_axis]
    index: list[slice | int] = []
    for a in range(3):
        if a == first_axis:
            continue
        if d[a] == 0:
            index.append(slice(None))
        else:
            # the row facing the neighbour: the last one when the neighbour lies further on
            toward = d[a] if ahead else -d[a]
            index.append(-1 if toward > 0 else 0)
    return plane[tuple(index)]


def boundary_pairs(
    a: BlockResult, b: BlockResult, d: Sequence[int], connectivity: int
) -> np.ndarray:
    """Pairs ``(label in a, label in b)`` of provisional labels that touch, ``(n, 2)`` int64.

    ``b`` is the block at grid offset ``d`` from ``a`` (a forward offset, see
    :data:`FORWARD_OFFSETS`); labels are the blocks' local ids (1-based). Duplicates are
    removed.
    """
    k = sum(1 for c in d if c)
    spare = MAX_DIFFERING_AXES[connectivity] - k
    if spare < 0:
        return np.zeros((0, 2), np.int64)
    sa = _contact(a.upper, d, ahead=True)
    sb = _contact(b.lower, d, ahead=False)
    if sa.size == 0 or sb.size == 0:
        return np.zeros((0, 2), np.int64)
    if sa.shape != sb.shape:
        raise ValueError(f"contact shapes differ: {sa.shape} vs {sb.shape} (offset {tuple(d)})")
    m = sa.ndim
    keys: list[np.ndarray] = []
    for shift in itertools.product((-1, 0, 1), repeat=m):
        if sum(1 for s in shift if s) > spare:
            continue
        ia = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, sa.shape))
        ib = tuple(slice(max(0, s), n - max(0, -s)) for s, n in zip(shift, sa.shape))
        va, vb = sa[ia], sb[ib]
        both = (va != 0) & (vb != 0)
        if both.any():
            keys.append((va[both].astype(np.uint64) << np.uint64(32)) | vb[both].astype(np.uint64))
    if not keys:
        return np.zeros((0, 2), np.int64)
    uniq = np.unique(np.concatenate(keys))
    return np.stack(
        [(uniq >> np.uint64(32)).astype(np.int64), (uniq & np.uint64(0xFFFFFFFF)).astype(np.int64)],
        axis=1,
    )


@dataclass
class GlobalTable:
    """The merge's answer: final id of every provisional label, block by block.

    ``final`` is indexed by global provisional label (block ``i``'s label ``j`` is
    ``offsets[i] + j - 1``); ``num_objects`` is K, the number of final ids ``1..K``;
    ``num_removed`` counts objects dropped for being smaller than the size threshold.
    """

    final: np.ndarray
    offsets: np.ndarray
    num_objects: int
    num_removed: int

    def block_mapping(self, i: int, dtype: np.dtype) -> np.ndarray:
        """Block ``i``'s lookup table: ``table[local label] = final id`` (``table[0] = 0``)."""
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        out = np.zeros(stop - start + 1, dtype)
        out[1:] = self.final[start:stop]
        return out


def global_table(
    sizes: Sequence[np.ndarray],
    first: Sequence[np.ndarray],
    pairs: Iterable[np.ndarray],
    min_size: int,
    drop: Sequence[np.ndarray] | None = None,
) -> GlobalTable:
    """Join provisional labels into objects and number the kept ones deterministically.

    ``sizes[i]`` / ``first[i]`` are block ``i``'s per-label voxel counts and first-voxel
    linear indices; ``pairs`` are ``(n, 2)`` arrays of *global* provisional labels
    (0-based) known to be one object. Objects with fewer than ``min_size`` voxels in
    total are removed (final id 0); the rest get ids ``1..K`` in increasing order of their
    first voxel in C order, which is independent of how the volume was cut into blocks.
    ``drop[i]`` (bool per label of block ``i``, optional): an object with any dropped part
    is removed too, and not counted in ``num_removed``.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    counts = np.asarray([len(s) for s in sizes], np.int64)
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    n = int(offsets[-1])
    all_sizes = np.concatenate(list(sizes)).astype(np.int64) if n else np.zeros(0, np.int64)
    all_first = np.concatenate(list(first)).astype(np.int64) if n else np.zeros(0, np.int64)
    edges = [p for p in pairs if len(p)]
    if n == 0:
        return GlobalTable(np.zeros(0, np.int64), offsets, 0, 0)
    if edges:
        e = np.concatenate(edges)
        graph = coo_matrix((np.ones(len(e), np.int8), (e[:, 0], e[:, 1])), shape=(n, n))
        num_comp, comp = connected_components(graph, directed=False)
        comp = comp.astype(np.int64)
    else:
        num_comp, comp = n, np.arange(n, dtype=np.int64)
    comp_size = np.zeros(num_comp, np.int64)
    np.add.at(comp_size, comp, all_sizes)
    comp_first = np.full(num_comp, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(comp_first, comp, all_first)
    comp_drop = np.zeros(num_comp, bool)
    if drop is not None:
        all_drop = np.concatenate([np.asarray(d, bool) for d in drop])
        if len(all_drop) != n:
            raise ValueError(f"drop flags for {len(all_drop)} labels, expected {n}")
        np.logical_or.at(comp_drop, comp, all_drop)
    keep = np.flatnonzero((comp_size >= min_size) & ~comp_drop)
    order = keep[np.argsort(comp_first[keep], kind="stable")]
    final_of_comp = np.zeros(num_comp, np.int64)
    final_of_comp[order] = np.arange(1, len(order) + 1, dtype=np.int64)
    return GlobalTable(final_of_comp[comp], offsets, len(order),
                       int(num_comp - int(comp_drop.sum()) - len(order)))
