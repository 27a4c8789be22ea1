"""Done markers: which blocks of a task are complete, kept beside the output.

A marker is a small JSON object written *after* a block's data, with an atomic write
(see :func:`catena_mito.storage.write_bytes`), so a worker killed at any moment never
leaves a block marked done whose data is incomplete. A rerun skips marked blocks;
``clear`` (``--overwrite``) forgets them so they are recomputed.

Layout: ``<root>/.catena/<task>/done/<block index>.json``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from catena_mito import storage
from catena_mito.errors import StorageError

MARKER_DIR = ".catena"


class DoneMarkers:
    """Done markers of one task (e.g. ``predict``, ``label-blocks``) under ``root_url``."""

    def __init__(self, root_url: str, task: str, storage_options: Mapping[str, Any] | None = None):
        self.root_url = root_url
        self.task = task
        self.storage_options = dict(storage_options or {})
        self.url = storage.join_url(root_url, MARKER_DIR, task, "done")

    def _marker_url(self, index: int) -> str:
        return storage.join_url(self.url, f"{int(index)}.json")

    def is_done(self, index: int) -> bool:
        return storage.exists(self._marker_url(index), self.storage_options)

    def mark_done(self, index: int, info: Mapping[str, Any] | None = None) -> None:
        """Record block ``index`` as complete; call only after its data is written."""
        payload = {"block": int(index), "time": time.time(), **dict(info or {})}
        storage.write_json(self._marker_url(index), payload, self.storage_options)

    def read(self, index: int) -> dict:
        return storage.read_json(self._marker_url(index), self.storage_options)

    def done_indices(self) -> set[int]:
        """Every block index marked done (one listing, not one request per block)."""
        fs, path = storage.get_fs(self.url, self.storage_options)
        try:
            fs.invalidate_cache(path)
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            return set()
        except Exception as e:
            raise StorageError(f"cannot list markers at {storage.redact_url(self.url)!r}: {e}") from e
        done = set()
        for name in names:
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(".json") and base[: -len(".json")].isdigit():
                done.add(int(base[: -len(".json")]))
        return done

    def missing(self, indices: Iterable[int]) -> list[int]:
        done = self.done_indices()
        return [i for i in indices if i not in done]

    def clear(self, indices: Iterable[int] | None = None) -> None:
        """Forget markers: those of ``indices``, or all of this task's."""
        if indices is None:
            storage.remove(self.url, self.storage_options)
            return
        for i in indices:
            storage.remove(self._marker_url(i), self.storage_options, recursive=False)
