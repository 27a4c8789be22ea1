"""Block geometry: regions of interest, the block grid, chunk alignment and shards.

Everything here is pure (no I/O) and in voxels, axis order ``(z, y, x)``.

A volume is cut into a regular grid of *write regions* of ``block_shape``; the last block
in each axis is clipped to the volume. Each block may read more than it writes: its *read
region* is the write region grown by a ``context`` (halo) on every side, clipped to the
volume::

      read_roi
    +-----------------------+
    |  context              |
    |    +-------------+    |
    |    |  write_roi  |    |     write regions tile the volume exactly once;
    |    +-------------+    |     read regions of neighbours overlap.
    |                       |
    +-----------------------+

Blocks get a deterministic index from their grid position (C order), so a plan is the
same in every process and a shard is just a subset of indices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from catena_mito.errors import ConfigError, ShardError

Coord = tuple[int, int, int]


def as_coord(value: Iterable[int] | int, name: str = "value") -> Coord:
    """Return ``value`` as a 3-tuple of ints; a scalar is broadcast to all axes."""
    if isinstance(value, int):
        return (value, value, value)
    items = tuple(int(v) for v in value)
    if len(items) != 3:
        raise ConfigError(f"{name}: expected 3 values (z, y, x), got {list(items)}")
    return items  # type: ignore[return-value]


@dataclass(frozen=True, order=True)
class Roi:
    """An axis-aligned box: ``offset`` (first voxel) and ``shape``, in voxels (z, y, x)."""

    offset: Coord
    shape: Coord

    def __post_init__(self) -> None:
        if any(s < 0 for s in self.shape):
            raise ValueError(f"Roi shape must be non-negative, got {self.shape}")

    @classmethod
    def from_shape(cls, shape: Sequence[int]) -> Roi:
        return cls((0, 0, 0), as_coord(shape))

    @classmethod
    def from_bounds(cls, begin: Sequence[int], end: Sequence[int]) -> Roi:
        b, e = as_coord(begin), as_coord(end)
        return cls(b, tuple(max(0, hi - lo) for lo, hi in zip(b, e)))  # type: ignore[arg-type]

    @property
    def begin(self) -> Coord:
        return self.offset

    @property
    def end(self) -> Coord:
        return tuple(o + s for o, s in zip(self.offset, self.shape))  # type: ignore[return-value]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def empty(self) -> bool:
        return self.size == 0

    def grow(self, amount: Iterable[int] | int) -> Roi:
        """Grow by ``amount`` voxels on both sides of each axis (negative shrinks)."""
        a = as_coord(amount, "amount")
        return Roi.from_bounds(
            [o - g for o, g in zip(self.offset, a)], [e + g for e, g in zip(self.end, a)]
        )

    def intersect(self, other: Roi) -> Roi:
        return Roi.from_bounds(
            [max(a, b) for a, b in zip(self.begin, other.begin)],
            [min(a, b) for a, b in zip(self.end, other.end)],
        )

    def contains(self, other: Roi) -> bool:
        return all(a <= b for a, b in zip(self.begin, other.begin)) and all(
            a >= b for a, b in zip(self.end, other.end)
        )

    def shift(self, delta: Iterable[int]) -> Roi:
        d = as_coord(delta, "delta")
        return Roi(tuple(o + x for o, x in zip(self.offset, d)), self.shape)  # type: ignore[arg-type]

    def to_slices(self, relative_to: Roi | None = None) -> tuple[slice, slice, slice]:
        """Slices selecting this region, in absolute coordinates or inside ``relative_to``."""
        base = relative_to.offset if relative_to is not None else (0, 0, 0)
        return tuple(slice(b - o, e - o) for b, e, o in zip(self.begin, self.end, base))  # type: ignore[return-value]


@dataclass(frozen=True)
class Block:
    """One unit of work: it reads ``read_roi`` and writes exactly ``write_roi``.

    ``index`` is the C-order position of the block in its grid, ``grid_position`` the
    (z, y, x) position itself.
    """

    index: int
    grid_position: Coord
    write_roi: Roi
    read_roi: Roi


@dataclass(frozen=True)
class BlockGrid:
    """A regular grid of blocks over a volume (all sizes in voxels, z, y, x).

    ``context`` is the halo each block reads around its write region (clipped to the
    volume).
    """

    volume_shape: Coord
    block_shape: Coord
    context: Coord = (0, 0, 0)

    def __post_init__(self) -> None:
        for name in ("volume_shape", "block_shape", "context"):
            object.__setattr__(self, name, as_coord(getattr(self, name), name))
        if any(s <= 0 for s in self.volume_shape):
            raise ConfigError(f"volume shape must be positive in every axis, got {list(self.volume_shape)}")
        if any(s <= 0 for s in self.block_shape):
            raise ConfigError(f"block_shape must be 3 positive ints, got {list(self.block_shape)}")
        if any(c < 0 for c in self.context):
            raise ConfigError(f"context must be non-negative, got {list(self.context)}")

    @property
    def grid_shape(self) -> Coord:
        return tuple(-(-v // b) for v, b in zip(self.volume_shape, self.block_shape))  # type: ignore[return-value]

    @property
    def num_blocks(self) -> int:
        return math.prod(self.grid_shape)

    @property
    def volume_roi(self) -> Roi:
        return Roi.from_shape(self.volume_shape)

    def block(self, index: int) -> Block:
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"block index {index} outside [0, {self.num_blocks})")
        gz, gy, gx = self.grid_shape
        pos = (index // (gy * gx), (index // gx) % gy, index % gx)
        begin = [p * b for p, b in zip(pos, self.block_shape)]
        write = Roi.from_bounds(begin, [b + s for b, s in zip(begin, self.block_shape)])
        write = write.intersect(self.volume_roi)
        read = write.grow(self.context).intersect(self.volume_roi)
        return Block(index=index, grid_position=pos, write_roi=write, read_roi=read)

    def blocks(self) -> list[Block]:
        return [self.block(i) for i in range(self.num_blocks)]

    def block_at(self, grid_position: Sequence[int]) -> Block | None:
        """The block at a grid position, or None outside the grid."""
        pos = as_coord(grid_position)
        if any(not 0 <= p < g for p, g in zip(pos, self.grid_shape)):
            return None
        _, gy, gx = self.grid_shape
        return self.block(pos[0] * gy * gx + pos[1] * gx + pos[2])


def check_chunk_alignment(
    block_shape: Sequence[int],
    chunk_shape: Sequence[int],
    *,
    field: str = "block_shape",
) -> None:
    """Refuse a block shape that would let two blocks write one output chunk.

    Write regions start at multiples of ``block_shape``; they cover whole chunks iff each
    block axis is a multiple of the chunk axis (the clipped last block ends at the volume
    edge, which is also the end of the last chunk).
    """
    b, c = as_coord(block_shape, field), as_coord(chunk_shape, "chunks")
    bad = [axis for axis, (bb, cc) in zip("zyx", zip(b, c)) if bb % cc != 0]
    if bad:
        suggestion = [(-(-bb // cc)) * cc for bb, cc in zip(b, c)]
        raise ConfigError(
            f"{field}={list(b)} is not a multiple of the output chunk shape {list(c)} "
            f"(axes {', '.join(bad)}): two blocks would write the same chunk; "
            f"use a multiple such as {suggestion}"
        )


#: How blocks are dealt to shards (see :func:`select_shard`).
ASSIGNMENTS = ("round_robin", "contiguous")


def shard_of(index: int, num_blocks: int, num_shards: int, assignment: str = "round_robin") -> int:
    """The shard that owns block ``index`` of ``num_blocks`` (see :func:`select_shard`)."""
    if assignment == "round_robin":
        return index % num_shards
    if assignment == "contiguous":
        return (index * num_shards) // num_blocks
    raise ValueError(f"assignment: expected one of {ASSIGNMENTS}, got {assignment!r}")


def select_shard(blocks: Sequence[Block], shard_index: int, num_shards: int,
                 assignment: str = "round_robin") -> list[Block]:
    """The blocks of shard ``shard_index`` of ``num_shards``.

    ``round_robin``: every ``num_shards``-th block, which keeps shards balanced when the cost
    of a block varies smoothly across the volume. ``contiguous``: one run of consecutive
    indices per shard (sizes differ by at most one), in shard order, so a block's
    lower-index neighbours belong to the same or a lower shard: a phase that waits for them
    (predict's blend) never waits for a shard that a scheduler starts only later (an
    Indexed Job or Slurm array runs its lower indices first). Either way the shards cover
    every block exactly once.
    """
    check_shard(shard_index, num_shards)
    return [b for b in blocks if shard_of(b.index, len(blocks), num_shards, assignment) == shard_index]


def check_shard(shard_index: int, num_shards: int) -> None:
    if num_shards < 1:
        raise ShardError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ShardError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
