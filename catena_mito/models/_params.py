"""Small helpers shared by the model modules: validating hyper-parameters.

Every check raises :class:`~catena_mito.errors.ConfigError` with a message that names the
``model_params`` key, the value and what was expected, because these values usually come
straight from a user's YAML config.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from catena_mito.errors import ConfigError


def did_you_mean(value: str, allowed: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest allowed value, or ``""``."""
    close = difflib.get_close_matches(str(value), list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def reject_unknown_keys(model_type: str, params: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Raise ConfigError naming the first unknown key of ``params``."""
    allowed = sorted(allowed)
    for key in params:
        if key not in allowed:
            raise ConfigError(
                f"unknown model_params key {key!r} for model_type {model_type!r}"
                f"{did_you_mean(key, allowed)}; allowed keys: {', '.join(allowed)}"
            )


def as_int(key: str, value: Any, *, minimum: int | None = None) -> int:
    """Validate an integer hyper-parameter (bools are refused: ``True`` is not a width)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"model_params.{key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"model_params.{key} must be >= {minimum}, got {value!r}")
    return int(value)


def as_int_tuple(key: str, value: Any, *, length: int | None = None, minimum: int = 1) -> tuple[int, ...]:
    """Validate a sequence of positive integers and return it as a plain tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(f"model_params.{key} must be a sequence of integers, got {value!r}")
    items = tuple(value)
    if length is not None and len(items) != length:
        raise ConfigError(
            f"model_params.{key} must have {length} entries, got {len(items)}: {value!r}"
        )
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < minimum:
            raise ConfigError(
                f"model_params.{key} must contain integers >= {minimum}, got {value!r}"
            )
    return tuple(int(i) for i in items)


def as_zyx(key: str, value: Any) -> tuple[int, int, int]:
    """An int ``k`` or a (z, y, x) triple of positive ints, returned as a triple."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value, value)
    z, y, x = as_int_tuple(key, value, length=3)
    return (z, y, x)


def plain(value: Any) -> Any:
    """Turn a hyper-parameter into plain Python types (str subclasses/enums → str, lists → tuples).

    Checkpoints are loaded with ``weights_only=True``, which refuses enum classes and other
    objects, so the stored hyper-parameters must be built from plain types only.
    """
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(plain(v) for v in value)
    raise ConfigError(
        f"model_params value {value!r} of type {type(value).__name__} is not a plain "
        "bool/int/float/str/list/dict and cannot be stored in a checkpoint"
    )
