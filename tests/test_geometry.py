"""Block grid, chunk alignment and shard selection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catena_mito.blockwise.geometry import BlockGrid, Roi, check_chunk_alignment, select_shard
from catena_mito.errors import ConfigError, ShardError

triples = st.tuples(*(st.integers(1, 40),) * 3)


def test_roi_operations():
    roi = Roi((2, 3, 4), (5, 6, 7))
    assert roi.end == (7, 9, 11)
    assert roi.grow(1) == Roi((1, 2, 3), (7, 8, 9))
    assert roi.intersect(Roi((0, 0, 0), (4, 4, 4))) == Roi((2, 3, 4), (2, 1, 0))
    assert roi.intersect(Roi((0, 0, 0), (4, 4, 4))).empty
    assert roi.to_slices() == (slice(2, 7), slice(3, 9), slice(4, 11))
    assert roi.to_slices(relative_to=Roi((1, 1, 1), (10, 10, 10))) == (slice(1, 6), slice(2, 8), slice(3, 10))
    assert Roi.from_shape((3, 3, 3)).contains(Roi((1, 1, 1), (2, 2, 2)))
    assert not Roi.from_shape((3, 3, 3)).contains(Roi((1, 1, 1), (3, 2, 2)))


@settings(max_examples=60, deadline=None)
@given(volume=triples, block=triples, context=st.tuples(*(st.integers(0, 5),) * 3))
def test_write_regions_tile_the_volume_exactly_once(volume, block, context):
    grid = BlockGrid(volume, block, context)
    count = np.zeros(volume, dtype=np.int32)
    for b in grid.blocks():
        count[b.write_roi.to_slices()] += 1
        # the read region holds the write region plus the context, clipped to the volume
        assert b.read_roi.contains(b.write_roi)
        assert b.read_roi == b.write_roi.grow(context).intersect(grid.volume_roi)
        assert grid.block_at(b.grid_position) == b
    assert (count == 1).all()


@settings(max_examples=60, deadline=None)
@given(volume=triples, block=triples, num_shards=st.integers(1, 7))
def test_shards_cover_every_block_exactly_once(volume, block, num_shards):
    blocks = BlockGrid(volume, block).blocks()
    seen = [b.index for i in range(num_shards) for b in select_shard(blocks, i, num_shards)]
    assert sorted(seen) == [b.index for b in blocks]
    # deterministic: the same plan in another "process"
    again = BlockGrid(volume, block).blocks()
    assert [b.index for b in select_shard(again, 0, num_shards)] == [
        b.index for b in select_shard(blocks, 0, num_shards)
    ]


def test_block_index_is_c_order():
    grid = BlockGrid((10, 10, 10), (5, 5, 5))
    assert grid.grid_shape == (2, 2, 2)
    assert [b.grid_position for b in grid.blocks()][:3] == [(0, 0, 0), (0, 0, 1), (0, 1, 0)]
    assert grid.block(7).write_roi == Roi((5, 5, 5), (5, 5, 5))
    assert grid.block_at((2, 0, 0)) is None


def test_edge_blocks_are_clipped():
    grid = BlockGrid((10, 7, 3), (4, 4, 4), context=(2, 2, 2))
    last = grid.blocks()[-1]
    assert last.write_roi == Roi((8, 4, 0), (2, 3, 3))
    assert last.read_roi == Roi((6, 2, 0), (4, 5, 3))


@pytest.mark.parametrize("block,chunks", [((128, 128, 128), (64, 64, 64)), ((64, 32, 32), (64, 32, 16))])
def test_chunk_aligned_block_shapes_pass(block, chunks):
    check_chunk_alignment(block, chunks)


def test_block_not_multiple_of_chunks_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"block_shape=\[100, 128, 128\].*axes z.*\[128, 128, 128\]"):
        check_chunk_alignment((100, 128, 128), (64, 64, 64))


def test_aligned_blocks_never_share_a_chunk():
    volume, block, chunks = (100, 70, 33), (32, 32, 16), (16, 16, 16)
    check_chunk_alignment(block, chunks)
    owner = {}
    for b in BlockGrid(volume, block).blocks():
        for z in range(b.write_roi.begin[0], b.write_roi.end[0]):
            for y in range(b.write_roi.begin[1], b.write_roi.end[1], 8):
                for x in range(b.write_roi.begin[2], b.write_roi.end[2], 8):
                    chunk = (z // chunks[0], y // chunks[1], x // chunks[2])
                    assert owner.setdefault(chunk, b.index) == b.index


@pytest.mark.parametrize("index,count", [(3, 3), (-1, 2), (0, 0), (0, -1)])
def test_invalid_shards_are_errors(index, count):
    with pytest.raises(ShardError):
        select_shard(BlockGrid((4, 4, 4), (2, 2, 2)).blocks(), index, count)


def test_invalid_grid_inputs():
    with pytest.raises(ConfigError, match="block_shape"):
        BlockGrid((4, 4, 4), (0, 2, 2))
    with pytest.raises(ConfigError, match="volume shape"):
        BlockGrid((4, 0, 4), (2, 2, 2))
