"""Which shard this process is: from flags, else from the scheduler's environment."""

from __future__ import annotations

import os
from collections.abc import Mapping

from catena_mito.errors import ShardError
from catena_mito.blockwise.geometry import check_shard

#: Environment variables read for the shard index, in order of precedence.
INDEX_ENV = ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID")
#: Environment variables read for the shard count, in order of precedence.
COUNT_ENV = ("CATENA_NUM_SHARDS", "SLURM_ARRAY_TASK_COUNT")


def _from_env(names: tuple[str, ...], environ: Mapping[str, str]) -> tuple[int, str] | None:
    for name in names:
        raw = environ.get(name)
        if raw is not None and raw.strip() != "":
            try:
                return int(raw), name
            except ValueError as e:
                raise ShardError(f"environment variable {name}={raw!r} is not an integer") from e
    return None


def resolve_shard(
    shard_index: int | None = None,
    num_shards: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[int, int]:
    """Return ``(shard_index, num_shards)``.

    The index comes from ``--shard-index``, else ``JOB_COMPLETION_INDEX`` (Kubernetes
    Indexed Job), else ``SLURM_ARRAY_TASK_ID``, else 0; the count from ``--num-shards``,
    else ``CATENA_NUM_SHARDS``, else ``SLURM_ARRAY_TASK_COUNT``, else 1. An index outside
    ``[0, count)`` is an error, never silently wrapped.

    Slurm arrays may start at an offset (``--array=1-4``); ``SLURM_ARRAY_TASK_MIN`` is
    subtracted so such an array still maps onto shards 0..N-1.
    """
    env = os.environ if environ is None else environ
    index_source = "--shard-index"
    if shard_index is None:
        found = _from_env(INDEX_ENV, env)
        if found is None:
            shard_index, index_source = 0, "default"
        else:
            shard_index, index_source = found
            if index_source == "SLURM_ARRAY_TASK_ID":
                minimum = _from_env(("SLURM_ARRAY_TASK_MIN",), env)
                if minimum is not None:
                    shard_index -= minimum[0]
    if num_shards is None:
        found = _from_env(COUNT_ENV, env)
        num_shards = 1 if found is None else found[0]
    try:
        check_shard(shard_index, num_shards)
    except ShardError as e:
        raise ShardError(f"{e} (shard index from {index_source})") from None
    return shard_index, num_shards
