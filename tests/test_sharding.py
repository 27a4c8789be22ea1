"""Shard index and count: flags, then the scheduler's environment, then defaults.

The rule must never produce a wrong shard silently: a known (index, count) or a
ShardError (exit 2), never a guess.
"""

from __future__ import annotations

import pytest

from catena_mito.blockwise.sharding import resolve_shard
from catena_mito.errors import ShardError


def slurm(task_id: int, *tasks: int) -> dict[str, str]:
    """The variables Slurm sets in one task of an array made of ``tasks``."""
    return {
        "SLURM_ARRAY_TASK_ID": str(task_id),
        "SLURM_ARRAY_TASK_COUNT": str(len(tasks)),
        "SLURM_ARRAY_TASK_MIN": str(min(tasks)),
        "SLURM_ARRAY_TASK_MAX": str(max(tasks)),
        "SLURM_ARRAY_JOB_ID": "1000",
    }


@pytest.mark.parametrize(
    "flags,env,expected",
    [
        ((None, None), {}, (0, 1)),
        ((2, 4), {"JOB_COMPLETION_INDEX": "1", "CATENA_NUM_SHARDS": "8"}, (2, 4)),
        ((None, None), {"JOB_COMPLETION_INDEX": "3", "CATENA_NUM_SHARDS": "5"}, (3, 5)),
        # a whole array 0..N-1: the count may come from Slurm
        ((None, None), slurm(2, 0, 1, 2), (2, 3)),
        ((None, None), slurm(0, 0), (0, 1)),
        # Kubernetes wins over Slurm, CATENA_NUM_SHARDS over SLURM_ARRAY_TASK_COUNT
        ((None, None), {"JOB_COMPLETION_INDEX": "0", "CATENA_NUM_SHARDS": "2", **slurm(2, *range(9))},
         (0, 2)),
        ((None, None), {**slurm(5, *range(8)), "CATENA_NUM_SHARDS": "16"}, (5, 16)),
        # one failed task resubmitted (`sbatch --array=5`): shard 5 of the same 8
        ((None, None), {**slurm(5, 5), "CATENA_NUM_SHARDS": "8"}, (5, 8)),
        # `--array=3,5`: task ids are shard ids
        ((None, None), {**slurm(3, 3, 5), "CATENA_NUM_SHARDS": "8"}, (3, 8)),
        ((None, None), {**slurm(5, 3, 5), "CATENA_NUM_SHARDS": "8"}, (5, 8)),
        # an array from 1 is not shifted down: task 4 is shard 4
        ((None, None), {**slurm(4, 1, 2, 3, 4), "CATENA_NUM_SHARDS": "5"}, (4, 5)),
        ((None, 8), slurm(5, 5), (5, 8)),
        ((1, None), {"CATENA_NUM_SHARDS": "2"}, (1, 2)),
        ((1, 3), {}, (1, 3)),
        # a count of one needs no index; an explicit --num-shards is the user's word
        ((None, None), {"CATENA_NUM_SHARDS": "1"}, (0, 1)),
        ((None, 4), {}, (0, 4)),
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
        ((None, None), {"CATENA_NUM_SHARDS": "eight"}, "CATENA_NUM_SHARDS='eight' is not an integer"),
        # `sbatch --array=5` with no count: once "shard 0 of 1", the whole volume
        ((None, None), slurm(5, 5), "CATENA_NUM_SHARDS or --num-shards"),
        ((None, None), slurm(3, 3, 5), "not 0..N-1"),
        ((None, None), slurm(4, 1, 2, 3, 4), "not 0..N-1"),
        # a Slurm environment without MIN/MAX cannot prove the array is whole
        ((None, None), {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}, "CATENA_NUM_SHARDS"),
        # an Indexed Job without the count: Kubernetes does not tell the pod `completions`
        ((None, None), {"JOB_COMPLETION_INDEX": "0"}, "JOB_COMPLETION_INDEX but no shard count"),
        ((None, None), {"JOB_COMPLETION_INDEX": "0", **slurm(0, 0, 1)}, "no shard count"),
        ((2, None), {}, "--shard-index but no shard count"),
        # a count from the environment with no index would be shard 0 of 8, quietly
        ((None, None), {"CATENA_NUM_SHARDS": "8"}, "CATENA_NUM_SHARDS=8 but no shard index"),
        # the index from Slurm, the count from CATENA_NUM_SHARDS: a task beyond it fails
        ((None, None), {**slurm(9, *range(16)), "CATENA_NUM_SHARDS": "8"},
         r"got 9 \(shard index from SLURM_ARRAY_TASK_ID, count from CATENA_NUM_SHARDS\)"),
    ],
)
def test_invalid_shards(flags, env, match):
    with pytest.raises(ShardError, match=match):
        resolve_shard(*flags, environ=env)


def test_shard_errors_are_config_errors_with_exit_2():
    with pytest.raises(ShardError) as info:
        resolve_shard(environ=slurm(5, 5))
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)


def test_reads_os_environ_by_default(monkeypatch):
    for name in ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID", "CATENA_NUM_SHARDS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")
    monkeypatch.setenv("CATENA_NUM_SHARDS", "7")
    assert resolve_shard() == (6, 7)
