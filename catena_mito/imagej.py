"""ImageJ/Fiji hyperstack TIFFs: the pixel types Fiji holds and the calibration it reads.

ImageJ stacks hold 8-bit, 16-bit and 32-bit float pixels only; a uint32 or uint64
instance volume is not one of them (ImageJ would open it as float, rounding ids above
2^24). :func:`to_imagej` converts a volume to a type Fiji holds *exactly* or refuses:

* ``uint8``, ``uint16``, ``float32``: as they are; ``bool`` → ``uint8``, ``float16`` →
  ``float32`` (exact);
* ``float64`` → ``float32`` (probabilities; logged, since it rounds);
* any other integer type (instance ids): ``uint16`` when every value is in 0..65535;
  otherwise, with ``ids="float32"``, ``float32`` when every value is in 0..2^24 (each
  integer there is a float32 exactly); otherwise an error naming the way out. Ids are
  never renumbered: the TIFF's ids are the Zarr volume's ids.

Calibration (what Fiji's *Image ▸ Properties* shows): ``XResolution``/``YResolution``
tags in pixels per ``unit`` (nm here), ``spacing`` = z voxel size and ``unit`` in the
ImageJ description, and ``xorigin``/``yorigin``/``zorigin`` in pixels (ImageJ's origin is
the pixel position of the physical origin, so ``origin = -offset / voxel size``).
:func:`calibration` reads them back, from our files and from Fiji's own (``µm``,
``micron``, ``nm`` …).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from catena_mito.errors import DataError

log = logging.getLogger(__name__)

#: Pixel types an ImageJ hyperstack holds natively.
IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
#: The largest integer below which float32 holds every integer exactly.
FLOAT32_EXACT_MAX = 2**24
#: ``--ids`` choices: how integer volumes beyond uint16 are written.
ID_MODES = ("uint16", "float32")

UNIT_TO_NM = {
    "nm": 1.0, "nanometer": 1.0, "nanometre": 1.0,
    "um": 1000.0, "µm": 1000.0, "μm": 1000.0, "\\u00b5m": 1000.0, "micron": 1000.0,
    "micrometer": 1000.0, "micrometre": 1000.0,
    "mm": 1e6, "millimeter": 1e6, "millimetre": 1e6,
}


def is_imagej_dtype(dtype: Any) -> bool:
    return np.dtype(dtype) in IMAGEJ_DTYPES


def to_imagej(array: np.ndarray, ids: str = "uint16", name: str = "volume") -> np.ndarray:
    """``array`` in a pixel type Fiji holds exactly (see the module docstring).

    Raises:
        DataError: integer values outside what ``ids`` allows, or an unsupported dtype.
    """
    if ids not in ID_MODES:
        raise ValueError(f"ids must be one of {ID_MODES}, got {ids!r}")
    array = np.asarray(array)
    dtype = array.dtype
    if dtype in IMAGEJ_DTYPES:
        return array
    if dtype == np.bool_:
        return array.astype(np.uint8)
    if dtype == np.float16:
        return array.astype(np.float32)
    if np.issubdtype(dtype, np.floating):
        log.warning("%s is %s; Fiji holds float32, so values are rounded to float32", name, dtype)
        return array.astype(np.float32)
    if not np.issubdtype(dtype, np.integer):
        raise DataError(f"{name} has dtype {dtype}, which an ImageJ TIFF cannot hold")
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if lo < 0:
        raise DataError(f"{name} holds negative values ({lo}); an ImageJ TIFF holds ids 0..65535 as uint16")
    if hi <= np.iinfo(np.uint16).max:
        return array.astype(np.uint16)
    if ids == "float32" and hi <= FLOAT32_EXACT_MAX:
        return array.astype(np.float32)
    if hi <= FLOAT32_EXACT_MAX:
        raise DataError(
            f"{name} holds ids up to {hi}, beyond uint16 (65535), the largest integer type of ImageJ; "
            f"pass --ids float32 to write them as 32-bit float (exact up to {FLOAT32_EXACT_MAX})"
        )
    raise DataError(
        f"{name} holds ids up to {hi}, more than any ImageJ pixel type holds exactly "
        f"(float32: {FLOAT32_EXACT_MAX}); keep it in Zarr (Fiji opens Zarr/N5 with its N5 plugins)"
    )


def write_kwargs(resolution: Sequence[float] | None, offset: Sequence[float] | None) -> dict[str, Any]:
    """``tifffile.imwrite`` arguments of a (z, y, x) ImageJ hyperstack with its calibration (nm)."""
    metadata: dict[str, Any] = {"axes": "ZYX"}
    kwargs: dict[str, Any] = {"imagej": True, "metadata": metadata}
    if resolution is not None:
        z, y, x = (float(r) for r in resolution)
        kwargs["resolution"] = (1.0 / x, 1.0 / y)
        kwargs["resolutionunit"] = "NONE"  # as ImageJ writes it: the unit is in the description
        metadata.update(spacing=z, unit="nm")
        if offset is not None:
            oz, oy, ox = (float(o) for o in offset)
            metadata.update(xorigin=-ox / x + 0.0, yorigin=-oy / y + 0.0, zorigin=-oz / z + 0.0)
    return kwargs


def _pixel_size(tag_value: Any) -> float | None:
    try:
        num, den = tag_value
        return float(den) / float(num) if num else None
    except (TypeError, ValueError):
        return None


def calibration(tif: Any) -> tuple[tuple[float, float, float] | None, tuple[float, float, float] | None]:
    """``(resolution, offset)`` in nm (z, y, x) of an open ImageJ ``tifffile.TiffFile``.

    ``(None, None)`` when the file has no physical calibration (no known ``unit`` or no
    ``spacing``: pixels-per-inch defaults carry no physical size). The offset is ``None``
    when no origin is recorded.
    """
    ij = tif.imagej_metadata or {}
    unit = str(ij.get("unit", "")).strip().lower()
    spacing = ij.get("spacing")
    tags = tif.pages[0].tags
    if unit not in UNIT_TO_NM or spacing is None or "XResolution" not in tags or "YResolution" not in tags:
        return None, None
    factor = UNIT_TO_NM[unit]
    x, y = _pixel_size(tags["XResolution"].value), _pixel_size(tags["YResolution"].value)
    if x is None or y is None:
        return None, None
    # Scale by the unit only when it is not 1, so that nm values come back bit for bit.
    res = tuple(v if factor == 1.0 else v * factor for v in (float(spacing), y, x))
    origins = [ij.get(k) for k in ("zorigin", "yorigin", "xorigin")]
    if all(o is None for o in origins):
        return res, None  # type: ignore[return-value]
    offset = tuple(-float(o or 0.0) * r + 0.0 for o, r in zip(origins, res))
    return res, offset  # type: ignore[return-value]
