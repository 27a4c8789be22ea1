"""Probabilities → foreground, compared exactly (``values > threshold``) for every dtype."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from catena_mito.errors import DataError


def foreground(values: np.ndarray, threshold: float, where: str = "input") -> np.ndarray:
    """``values > threshold`` evaluated exactly, for probabilities of any supported dtype.

    * float inputs compare in their own precision against the largest value of that dtype
      not above ``threshold``, which for every representable value gives the same answer
      as comparing in exact arithmetic (and as ``values.astype(float64) > threshold``);
    * uint8 inputs are probabilities ``value / 255``: ``value / 255 > threshold`` exactly,
      i.e. ``value > floor(255 * threshold)`` with the threshold's exact binary value;
    * bool inputs are probabilities 0 and 1.

    NaN or infinite probabilities are a :class:`DataError` naming ``where``.
    """
    dt = values.dtype
    if dt == np.bool_:
        return values.copy() if threshold < 1 else np.zeros(values.shape, bool)
    if dt == np.uint8:
        cutoff = math.floor(Fraction(threshold) * 255)
        return values > np.uint8(min(cutoff, 255))
    if np.issubdtype(dt, np.floating):
        if not np.isfinite(values).all():
            bad = "NaN" if np.isnan(values).any() else "infinite"
            raise DataError(f"{where}: {bad} probabilities (expected values in [0, 1])")
        t = dt.type(threshold)
        if float(t) > threshold:  # rounded up: step down one value so that v > t == v > threshold
            t = np.nextafter(t, dt.type(-np.inf))
        return values > t
    raise DataError(
        f"{where}: dtype {dt} is not a probability volume (expected float, uint8 read as "
        "value/255, or bool)"
    )
