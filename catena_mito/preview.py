"""``catena-mito preview``: PNG snapshots of raw, probabilities and instances.

For each chosen z slice (default: the middle one) and for two orthogonal planes through
the volume centre — ``yz`` (at the centre x) and ``xz`` (at the centre y) — it writes:

* ``<prefix><plane>_raw.png``: raw, grey (uint8 as is; other dtypes stretched to the
  slice's min..max);
* ``<prefix><plane>_prob.png``: probability, grey (0 black, 1 white);
* ``<prefix><plane>_contour.png``: the contour probability of a model with a contour
  target (``<prediction>_contour``, written by ``predict`` beside the foreground), grey
  like the probability: what ``label``'s contour mode cuts touching objects apart with;
* ``<prefix><plane>_instances.png``: raw with each instance tinted and outlined in a
  colour that depends only on its id (:func:`id_colours`), so the same object has the
  same colour in every image and every run.

``<plane>`` is ``z00040`` for slice z = 40, ``yz`` or ``xz``. In the orthogonal planes the
z axis is stretched by the voxel anisotropy (nearest neighbour) so that objects keep
their physical proportions. Only the needed planes are read (whole chunks that cross
them, never the volume). Images go through fsspec, so ``--out`` may be ``s3://…``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from catena_mito import storage
from catena_mito.blockwise.runs import check_input
from catena_mito.errors import DataError

#: Tint strength of an instance's interior over raw (outlines are drawn opaque).
FILL_ALPHA = 0.35


def id_colours(ids: np.ndarray) -> np.ndarray:
    """A deterministic RGB colour (uint8, shape ``ids.shape + (3,)``) for every id.

    Ids are hashed (splitmix64) to a hue; saturation and value stay high so every colour
    stands out on grey. Id 0 (background) is black.
    """
    x = np.asarray(ids).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = x + np.uint64(0x9E3779B97F4A7C15)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
    hue = (h & np.uint64(0xFFFF)).astype(np.float64) / 65536.0
    sat = 0.65 + 0.35 * ((h >> np.uint64(16)) & np.uint64(0xFF)).astype(np.float64) / 255.0
    val = np.full_like(hue, 1.0)
    rgb = _hsv_to_rgb(hue, sat, val)
    out = np.round(rgb * 255).astype(np.uint8)
    out[x == 0] = 0
    return out


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros((*h.shape, 3))
    for k, (r, g, b) in enumerate(choices):
        m = i == k
        out[m] = np.stack([r[m], g[m], b[m]], axis=-1)
    return out


def boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels of a 2-D label image whose 4-neighbour (or the image edge) has another id."""
    lab = np.asarray(labels)
    edge = np.zeros(lab.shape, bool)
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    return edge & (lab != 0)


def grey(plane: np.ndarray) -> np.ndarray:
    """A raw plane as uint8 grey: uint8 as is, anything else stretched to its min..max."""
    plane = np.asarray(plane)
    if plane.dtype == np.uint8:
        return plane
    lo, hi = float(plane.min()), float(plane.max())
    if hi <= lo:
        return np.zeros(plane.shape, np.uint8)
    return np.round((plane.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def probability_grey(plane: np.ndarray) -> np.ndarray:
    """A probability plane as uint8 grey: uint8 holds p × 255, floats are p in [0, 1]."""
    plane = np.asarray(plane)
    if plane.dtype == np.uint8:
        return plane
    return np.round(np.clip(plane.astype(np.float64), 0, 1) * 255).astype(np.uint8)


def overlay_instances(raw_grey: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """RGB image: raw, instances tinted by :data:`FILL_ALPHA` and outlined opaque."""
    rgb = np.repeat(raw_grey[..., None].astype(np.float64), 3, axis=-1)
    colours = id_colours(labels).astype(np.float64)
    inside = labels != 0
    rgb[inside] = (1 - FILL_ALPHA) * rgb[inside] + FILL_ALPHA * colours[inside]
    edge = boundaries(labels)
    rgb[edge] = colours[edge]
    return np.round(rgb).astype(np.uint8)


def _stretch_z(image: np.ndarray, factor: float) -> np.ndarray:
    """Repeat rows (the z axis of an orthogonal plane) to undo voxel anisotropy."""
    rows = max(1, int(round(image.shape[0] * factor)))
    index = np.minimum((np.arange(rows) / factor).astype(int), image.shape[0] - 1)
    return image[index]


#: Small planes are enlarged by whole pixels (nearest neighbour, so voxels stay crisp and
#: outlines stay one voxel wide) until their short side reaches this many pixels.
MIN_PREVIEW_SIDE = 384


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    factor = max(1, -(-MIN_PREVIEW_SIDE // max(1, min(image.shape[:2]))))
    if factor > 1:
        image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def _resolve(dataset: str | None, explicit: str | None, default_path: str, storage_options) -> str | None:
    if explicit is not None:
        return explicit
    if dataset is None:
        return None
    url = storage.join_url(dataset, default_path)
    return url if storage.array_exists(url, storage_options) else None


def _beside(prediction: str | None, storage_options: Mapping[str, Any] | None) -> str | None:
    """The contour prediction beside a foreground prediction, when there is one."""
    from catena_mito.targets import CONTOUR, prediction_url

    if prediction is None:
        return None
    url = prediction_url(prediction, CONTOUR)
    return url if storage.array_exists(url, storage_options) else None


def preview(
    dataset: str | None,
    out: str,
    *,
    raw: str | None = None,
    prediction: str | None = None,
    instances: str | None = None,
    contour: str | None = None,
    z: Sequence[int] = (),
    orthogonal: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    allow_incomplete: bool = False,
) -> list[str]:
    """Write preview PNGs to ``out`` + name; returns the URLs written.

    ``dataset`` supplies defaults for the arrays (``volumes/raw``,
    ``volumes/predictions/mito``, ``volumes/labels/mito_instances``, each used if
    present; the contour probability beside the prediction, ``<prediction>_contour``, too);
    ``raw``/``prediction``/``instances``/``contour`` name arrays explicitly. ``z`` lists
    slice indices (voxels); empty means the middle slice. Probabilities or instances
    written by catena-mito that are incomplete or stale are refused unless
    ``allow_incomplete``.
    """
    urls = {
        "raw": _resolve(dataset, raw, storage.RAW_PATH, storage_options),
        "prob": _resolve(dataset, prediction, storage.prediction_path("mito"), storage_options),
        "instances": _resolve(dataset, instances, storage.INSTANCES_PATH, storage_options),
    }
    urls["contour"] = contour if contour is not None else _beside(urls["prob"], storage_options)
    arrays = {k: storage.open_volume(u, storage_options) for k, u in urls.items() if u is not None}
    for key, arr in arrays.items():
        if key != "raw":
            what = {"prob": "prediction", "contour": "contour prediction"}.get(key, key)
            check_input(arr, urls[key], f"{what} {storage.redact_url(urls[key])!r}", storage_options,
                        allow_incomplete=allow_incomplete)
    if not arrays:
        raise DataError(
            f"nothing to preview in {storage.redact_url(dataset or '')!r}: no volumes/raw, "
            "predictions or instances; name arrays with --raw/--prediction/--instances"
        )
    shapes = {k: tuple(a.shape) for k, a in arrays.items()}
    shape = next(iter(shapes.values()))
    if any(s != shape for s in shapes.values()):
        raise DataError(f"preview needs arrays of one shape (z, y, x); got {shapes}")
    zs = list(z) if z else [shape[0] // 2]
    for zi in zs:
        if not 0 <= zi < shape[0]:
            raise DataError(f"--z {zi} is outside the volume (0 <= z < {shape[0]})")

    first = next(iter(arrays.values()))
    res, _ = storage.read_spatial(arrays.get("raw", first))
    rz, ry, rx = res if res is not None else (1.0, 1.0, 1.0)
    planes: list[tuple[str, tuple, float]] = [(f"z{zi:05d}", (zi, slice(None), slice(None)), 1.0) for zi in zs]
    if orthogonal:
        planes.append(("yz", (slice(None), slice(None), shape[2] // 2), rz / ry))
        planes.append(("xz", (slice(None), shape[1] // 2, slice(None)), rz / rx))

    written = []
    for name, index, stretch in planes:
        data = {k: np.asarray(a[index]) for k, a in arrays.items()}
        raw_grey = grey(data["raw"]) if "raw" in data else None
        images = {}
        if raw_grey is not None:
            images["raw"] = raw_grey
        if "prob" in data:
            images["prob"] = probability_grey(data["prob"])
        if "contour" in data:
            images["contour"] = probability_grey(data["contour"])
        if "instances" in data:
            base = raw_grey if raw_grey is not None else np.zeros(data["instances"].shape, np.uint8)
            images["instances"] = overlay_instances(base, data["instances"])
        for kind, image in images.items():
            if stretch != 1.0:
                image = _stretch_z(image, stretch)
            url = f"{out}{name}_{kind}.png"
            storage.write_bytes(url, _png(image), storage_options)
            written.append(url)
    return written
