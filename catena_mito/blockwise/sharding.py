"""Which shard this process is: from flags, else from the scheduler's environment.

The rule is built so that a process never computes a wrong shard silently: either the
index and the count are both known, or it is an error (:class:`ShardError`, exit 2).

Index
    ``--shard-index``, else ``JOB_COMPLETION_INDEX`` (Kubernetes Indexed Job), else
    ``SLURM_ARRAY_TASK_ID`` *as is*, else none. Slurm task ids are shard indexes: the
    array of N shards is ``--array=0-(N-1)``, and resubmitting failed tasks
    (``sbatch --array=5`` or ``--array=3,5``) runs those shards of the same N.
Count
    ``--num-shards``, else ``CATENA_NUM_SHARDS``, else ``SLURM_ARRAY_TASK_COUNT`` but only
    when the index is Slurm's and the array is exactly ``0..COUNT-1``
    (``SLURM_ARRAY_TASK_MIN`` = 0 and ``SLURM_ARRAY_TASK_MAX`` = COUNT-1): a partial array
    (a resubmitted task, ``--array=3,5``, ``--array=1-4``) says nothing about N.
No index, no count
    One process for the whole volume: ``(0, 1)``.

Anything else is a :class:`ShardError`: an index with no count, a count above 1 from the
environment with no index (``CATENA_NUM_SHARDS=8`` alone would quietly run shard 0 of 8),
an index outside ``[0, count)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from catena_mito.blockwise.geometry import check_shard
from catena_mito.errors import ShardError

#: Environment variables read for the shard index, in order of precedence.
INDEX_ENV = ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID")
#: The environment variable that states the shard count (Kubernetes, Slurm, anywhere).
COUNT_ENV = "CATENA_NUM_SHARDS"
#: What to do when the count is unknown, for the error messages.
_HOW_TO_COUNT = f"set {COUNT_ENV} or --num-shards to the number of shards"


def _from_env(names: tuple[str, ...], environ: Mapping[str, str]) -> tuple[int, str] | None:
    for name in names:
        raw = environ.get(name)
        if raw is not None and raw.strip() != "":
            try:
                return int(raw), name
            except ValueError as e:
                raise ShardError(f"environment variable {name}={raw!r} is not an integer") from e
    return None


def _count_from_slurm_array(environ: Mapping[str, str]) -> int | None:
    """``SLURM_ARRAY_TASK_COUNT`` when the array is exactly ``0..COUNT-1``, else None."""
    values = {}
    for name in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX"):
        found = _from_env((name,), environ)
        if found is None:
            return None
        values[name] = found[0]
    count = values["SLURM_ARRAY_TASK_COUNT"]
    if values["SLURM_ARRAY_TASK_MIN"] == 0 and values["SLURM_ARRAY_TASK_MAX"] == count - 1:
        return count
    return None


def resolve_shard(
    shard_index: int | None = None,
    num_shards: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[int, int]:
    """Return ``(shard_index, num_shards)`` by the rule in the module docstring.

    ``environ`` defaults to ``os.environ``. Raises :class:`ShardError` when the count
    cannot be known for sure or the index is outside ``[0, count)``; never wraps or
    guesses.
    """
    env = os.environ if environ is None else environ
    index_source: str | None = "--shard-index"
    if shard_index is None:
        found = _from_env(INDEX_ENV, env)
        shard_index, index_source = (None, None) if found is None else found

    count_source = "--num-shards"
    if num_shards is None:
        found = _from_env((COUNT_ENV,), env)
        if found is not None:
            num_shards, count_source = found
        elif index_source == "SLURM_ARRAY_TASK_ID":
            num_shards = _count_from_slurm_array(env)
            count_source = "SLURM_ARRAY_TASK_COUNT"
            if num_shards is None:
                raise ShardError(
                    f"SLURM_ARRAY_TASK_ID={shard_index} is shard {shard_index}, but the array "
                    f"(tasks {env.get('SLURM_ARRAY_TASK_MIN', '?')}.."
                    f"{env.get('SLURM_ARRAY_TASK_MAX', '?')}, "
                    f"{env.get('SLURM_ARRAY_TASK_COUNT', '?')} of them) is not 0..N-1, so it "
                    f"does not give the shard count: {_HOW_TO_COUNT}"
                )
        elif index_source is not None:
            raise ShardError(
                f"shard index {shard_index} from {index_source} but no shard count: {_HOW_TO_COUNT}"
            )
        else:
            num_shards, count_source = 1, "default"

    if shard_index is None:
        if num_shards > 1 and count_source != "--num-shards":
            raise ShardError(
                f"{count_source}={num_shards} but no shard index: pass --shard-index, or run "
                "as a Kubernetes Indexed Job (JOB_COMPLETION_INDEX) or a Slurm array "
                "(SLURM_ARRAY_TASK_ID)"
            )
        shard_index, index_source = 0, "default"
    try:
        check_shard(shard_index, num_shards)
    except ShardError as e:
        raise ShardError(
            f"{e} (shard index from {index_source}, count from {count_source})"
        ) from None
    return shard_index, num_shards
