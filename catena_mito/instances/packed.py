"""Named arrays in one byte string: the per-block intermediates of the seeded label phases.

The blocks phase of ``contour`` / ``distance`` keeps each block's provisional seed labels
and its foreground, and the grow phase reads them back, with a halo of ``grow_distance``
voxels from the blocks around; the grow phase keeps each block's grown ids for relabel.
These are written once and read a few times by our own code, so they do not need to be
Zarr arrays: each array is compressed on its own (zstd, level 1, after casting to the
smallest unsigned dtype that holds its values), behind a small JSON header, so that a
reader decodes only the arrays it asks for (a neighbour's face slab, not its whole
block), with no per-chunk overhead.

Layout: ``MAGIC``, a 4-byte little-endian header length, the JSON header
``{"meta": {...}, "arrays": {name: [offset, nbytes, dtype, shape]}}`` (offsets from the
end of the header), then the compressed arrays.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

MAGIC = b"CATENA-ARRAYS-1\n"
#: zstd level 1: labels compress about as well as at level 3, faster (measured on 128³ blocks)
_LEVEL = 1


def _codec() -> Any:
    from numcodecs import Zstd

    return Zstd(level=_LEVEL)


def smallest_uint(largest: int) -> np.dtype:
    """The smallest unsigned dtype holding ``0..largest``."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if largest <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"{largest} does not fit in 64 bits")


def pack(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> bytes:
    """``arrays`` (name → array, any shape and dtype) and ``meta`` (JSON) as one byte string."""
    codec = _codec()
    index: dict[str, list] = {}
    parts: list[bytes] = []
    offset = 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        data = bytes(codec.encode(a)) if a.size else b""  # zstd cannot decode an empty frame
        index[name] = [offset, len(data), a.dtype.str, list(a.shape)]
        parts.append(data)
        offset += len(data)
    header = json.dumps({"meta": dict(meta or {}), "arrays": index}, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *parts])


class Packed:
    """Reads what :func:`pack` wrote; ``where`` names the source in error messages."""

    def __init__(self, data: bytes, where: str = "packed arrays"):
        self.where = where
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
            raise ValueError(f"{where}: not a packed array file")
        (n,) = struct.unpack_from("<I", data, len(MAGIC))
        start = len(MAGIC) + 4
        header = json.loads(data[start:start + n])
        self.meta: dict[str, Any] = header["meta"]
        self._index: dict[str, list] = header["arrays"]
        self._data = memoryview(data)[start + n:]

    def names(self) -> list[str]:
        return list(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def get(self, name: str) -> np.ndarray:
        """Array ``name``, decoded (read-only)."""
        if name not in self._index:
            raise KeyError(f"{self.where}: no array {name!r} (has {', '.join(self._index)})")
        offset, nbytes, dtype, shape = self._index[name]
        if not nbytes:
            return np.zeros(shape, np.dtype(dtype))
        raw = _codec().decode(self._data[offset:offset + nbytes])
        return np.frombuffer(raw, np.dtype(dtype)).reshape(shape)
