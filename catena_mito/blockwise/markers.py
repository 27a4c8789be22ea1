"""Done markers: which blocks of one phase of one run are complete.

A marker is a small JSON object written *after* a block's data, with an atomic write
(see :func:`catena_mito.storage.write_bytes`), so a worker killed at any moment never
leaves a block marked done whose data is incomplete. Markers live in a folder of their
run (``.../runs/<run id>/<phase>/done/<block index>.json``, see
:mod:`catena_mito.blockwise.runs`), so markers of another run, or of another plan, are
never taken for this one's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from catena_mito import storage
from catena_mito.errors import StorageError


class DoneMarkers:
    """The done markers in the folder ``url``."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.url = url
        self.storage_options = dict(storage_options or {})

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

    def done_times(self) -> dict[int, float | None]:
        """Every block index marked done, with the marker's modification time (epoch
        seconds, None where the store does not say), from one listing."""
        fs, path = storage.get_fs(self.url, self.storage_options)
        try:
            fs.invalidate_cache(path)
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as e:
            raise StorageError(f"cannot list markers at {storage.redact_url(self.url)!r}: {e}") from e
        done: dict[int, float | None] = {}
        for entry in entries:
            base = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
            stem = base[: -len(".json")] if base.endswith(".json") else ""
            if stem.isdigit():
                done[int(stem)] = _mtime(entry)
        return done

    def done_indices(self) -> set[int]:
        """Every block index marked done (one listing, not one request per block)."""
        return set(self.done_times())

    def missing(self, indices: Iterable[int]) -> list[int]:
        done = self.done_indices()
        return [i for i in indices if i not in done]

    def clear(self, indices: Iterable[int] | None = None) -> None:
        """Forget markers: those of ``indices``, or all of them."""
        if indices is None:
            storage.remove(self.url, self.storage_options)
            return
        for i in indices:
            storage.remove(self._marker_url(i), self.storage_options, recursive=False)


def _mtime(entry: Mapping[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = entry.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None
