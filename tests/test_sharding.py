"""Shard index and count: flags, then the scheduler's environment, then defaults."""

from __future__ import annotations

import pytest

from catena_mito.errors import ShardError
from catena_mito.blockwise.sharding import resolve_shard


@pytest.mark.parametrize(
    "flags,env,expected",
    [
        ((None, None), {}, (0, 1)),
        ((2, 4), {"JOB_COMPLETION_INDEX": "1", "CATENA_NUM_SHARDS": "8"}, (2, 4)),
        ((None, None), {"JOB_COMPLETION_INDEX": "3", "CATENA_NUM_SHARDS": "5"}, (3, 5)),
        ((None, None), {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}, (2, 3)),
        # Kubernetes wins over Slurm, CATENA_NUM_SHARDS over SLURM_ARRAY_TASK_COUNT
        ((None, None), {"JOB_COMPLETION_INDEX": "0", "SLURM_ARRAY_TASK_ID": "2",
                        "CATENA_NUM_SHARDS": "2", "SLURM_ARRAY_TASK_COUNT": "9"}, (0, 2)),
        # a Slurm array that starts at 1 still maps onto shards 0..N-1
        ((None, None), {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1",
                        "SLURM_ARRAY_TASK_COUNT": "4"}, (3, 4)),
        ((1, None), {"CATENA_NUM_SHARDS": "2"}, (1, 2)),
    ],
)
def test_resolution_order(flags, env, expected):
    assert resolve_shard(*flags, environ=env) == expected


@pytest.mark.parametrize(
    "flags,env,match",
    [
        ((4, 4), {}, r"shard_index must be in \[0, 4\), got 4"),
        ((-1, 2), {}, "got -1"),
        ((0, 0), {}, "num_shards must be >= 1"),
        ((None, None), {"JOB_COMPLETION_INDEX": "5", "CATENA_NUM_SHARDS": "5"}, "JOB_COMPLETION_INDEX"),
        ((None, None), {"JOB_COMPLETION_INDEX": "x"}, "not an integer"),
    ],
)
def test_invalid_shards(flags, env, match):
    with pytest.raises(ShardError, match=match):
        resolve_shard(*flags, environ=env)
