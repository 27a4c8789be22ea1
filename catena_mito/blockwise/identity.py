"""Run identities: what a block-wise output was computed from, as a fingerprint.

A run is *described* by a plain JSON-able dict of everything that determines its output
(see :class:`catena_mito.blockwise.runs.RunSpec`): the settings that change values, the
block plan, and the identity of every input. The run id is a hash of that description,
so every shard of one run computes the same id on its own, at any moment, with no
coordination; any change to a setting, the plan or an input gives another id.

The identity of an input:

* a checkpoint: the SHA-256 of its bytes (:func:`bytes_digest`);
* a volume catena-mito wrote (its array carries a ``catena_run`` attribute): the task
  and run id of the run that wrote it, and whether that run was complete when read;
* any other ("foreign") volume, e.g. raw data: what can be known cheaply, its shape,
  dtype, chunks and a hash of its attributes. Rewriting a foreign volume in place with
  the same metadata is not detected (reading every chunk would be the only way).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

#: Length of the hex run ids shown to users (64 bits: collisions are not a concern).
ID_LENGTH = 16
#: The array attribute that names the run which wrote a catena-mito output.
RUN_ATTR = "catena_run"


def canonical_json(value: Any) -> str:
    """``value`` as JSON with sorted keys and no whitespace: equal data, equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_plain)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"not JSON-able in a run description: {type(value).__name__}")


def fingerprint(value: Any) -> str:
    """A short, stable hash of a JSON-able value."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:ID_LENGTH]


def bytes_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def normalise(value: Any) -> Any:
    """The JSON round trip of ``value`` (tuples become lists): what a stored record holds."""
    return json.loads(canonical_json(value))


def foreign_identity(shape: Any, dtype: Any, chunks: Any, attrs: Mapping[str, Any]) -> dict[str, Any]:
    return normalise({
        "kind": "foreign",
        "shape": list(shape),
        "dtype": str(dtype),
        "chunks": list(chunks) if chunks is not None else None,
        "attrs": fingerprint(dict(attrs)),
    })


def differences(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """Human-readable ``key: old -> new`` lines for where two descriptions differ."""
    if isinstance(recorded, Mapping) and isinstance(current, Mapping):
        if "kind" in recorded and recorded.get("kind") != current.get("kind"):  # another kind of input
            return [f"{prefix}.kind: {recorded.get('kind')} -> {current.get('kind')}"]
        out: list[str] = []
        for key in sorted(set(recorded) | set(current)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in recorded:
                out.append(f"{name}: (none) -> {_short(current[key])}")
            elif key not in current:
                out.append(f"{name}: {_short(recorded[key])} -> (none)")
            else:
                out.extend(differences(recorded[key], current[key], name))
        return out
    if normalise(recorded) != normalise(current):
        return [f"{prefix or 'value'}: {_short(recorded)} -> {_short(current)}"]
    return []


def _short(value: Any, limit: int = 60) -> str:
    text = canonical_json(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."
