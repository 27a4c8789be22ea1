"""The OME-NGFF layout of a dataset: multiscale images, label images, their registries.

Every (z, y, x) volume written into a ``.zarr`` store is a *multiscale group* at its layout
path, its resolution levels ``0``, ``1``, … inside it (level 0 is the full resolution)::

    <name>.zarr/                  multiscales → volumes/raw/0, … (so `napari x.zarr` shows raw)
      volumes/                    multiscales → raw/0, …: the dataset's image, whose
        raw/                        `labels` child below is its OME-NGFF labels group
          0  1  2 …               levels of raw (mean-downsampled)
        predictions/
          mito/       0 1 …       a probability image (multiscales)
          mito_contour/ 0 1 …     another one: any number of prediction images
        labels/                   labels: [mito_instances, mito_ids, neuron_ids]
          mito_instances/ 0 1 …   multiscales + image-label (source: the image ../../)
          mito_ids/       0 1 …   ground truth: also a label image, listed after predictions

Why this shape: OME-NGFF (and ome-zarr-py, which napari-ome-zarr uses) finds label images
only in a ``labels`` child of an image group. The layout's ``volumes/labels`` is such a
child once ``volumes`` describes raw, so every user URL (``volumes/raw``,
``volumes/labels/mito_instances``, ``volumes/predictions/mito``) names the same thing as
before — now a group whose level 0 :func:`catena_mito.storage.open_array` opens — and
older datasets, whose volumes are plain arrays at those paths, are read as they are.

Zarr format 3 stores get OME-NGFF 0.5 (under the ``ome`` attribute key; arrays carry
``dimension_names``); format 2 stores get 0.4 (top-level keys; arrays carry the xarray
``_ARRAY_DIMENSIONS``). Every level array also carries ``dimension_units`` (e.g.
``["8 nm", "4 nm", "4 nm"]``), which neuroglancer's zarr datasource reads for an array
opened on its own.

Level geometry (:func:`level_transform`): level ``k`` is level 0 reduced by an integer
``factor`` per axis; a level-k voxel covers ``factor`` level-0 voxels, so its scale is
``resolution * factor`` and its centre (the OME translation) sits half of the extra
extent past level 0's first voxel centre: ``offset + (factor - 1) * resolution / 2``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Axis order of every volume.
AXES: tuple[str, str, str] = ("z", "y", "x")
#: OME-NGFF unit name of the axes (resolutions are nm throughout the project).
UNIT = "nanometer"
#: The name of level 0 inside a multiscale group.
LEVEL0 = "0"
#: The dataset's image (raw) and the groups that also describe it (see the module doc).
IMAGE_PATH = "volumes/raw"
IMAGE_HOSTS: dict[str, str] = {"volumes": "raw/", "": "volumes/raw/"}
#: Label images of ground truth: listed after those written by ``label``, so a viewer that
#: takes the first label image shows the predicted instances.
GROUND_TRUTH_LABELS = ("mito_ids", "neuron_ids")


def version_for(zarr_format: int) -> str:
    """The OME-NGFF version a store of ``zarr_format`` gets: 0.5 (format 3) or 0.4 (format 2)."""
    return "0.5" if zarr_format == 3 else "0.4"


def ome_part(attrs: Mapping[str, Any], zarr_format: int) -> dict[str, Any]:
    """The OME-NGFF keys of a group's attributes (0.5: under ``ome``; 0.4: top level)."""
    if zarr_format == 3:
        return dict(attrs.get("ome") or {})
    return {k: v for k, v in attrs.items() if k in ("multiscales", "labels", "image-label")}


def level_paths(attrs: Mapping[str, Any], zarr_format: int) -> list[str] | None:
    """The dataset paths of a group's first multiscale (level 0 first); None if it has none."""
    multiscales = ome_part(attrs, zarr_format).get("multiscales")
    try:
        return [str(d["path"]) for d in multiscales[0]["datasets"]]
    except (KeyError, IndexError, TypeError):
        return None


def level_transform(
    resolution: Sequence[float], offset: Sequence[float], factor: Sequence[int]
) -> tuple[list[float], list[float]]:
    """``(scale, translation)`` in nm of a level reduced by ``factor`` (see the module doc)."""
    scale = [float(r) * int(f) for r, f in zip(resolution, factor)]
    translation = [float(o) + (int(f) - 1) * float(r) / 2 for o, r, f in zip(offset, resolution, factor)]
    return scale, translation


def dimension_attrs(resolution: Sequence[float], factor: Sequence[int], zarr_format: int) -> dict[str, Any]:
    """Array attributes naming the axes and their units, for viewers that open a level alone."""
    attrs: dict[str, Any] = {
        "dimension_units": [f"{float(r) * int(f):g} nm" for r, f in zip(resolution, factor)]
    }
    if zarr_format == 2:  # format 3 arrays carry `dimension_names` in their metadata instead
        attrs["_ARRAY_DIMENSIONS"] = list(AXES)
    return attrs


def multiscale(
    name: str,
    resolution: Sequence[float],
    offset: Sequence[float],
    factors: Sequence[Sequence[int]],
    zarr_format: int,
    prefix: str = "",
) -> dict[str, Any]:
    """One OME-NGFF multiscale: level ``i`` at ``prefix + str(i)``, reduced by ``factors[i]``."""
    datasets = []
    for i, factor in enumerate(factors):
        scale, translation = level_transform(resolution, offset, factor)
        datasets.append({
            "path": f"{prefix}{i}",
            "coordinateTransformations": [
                {"type": "scale", "scale": scale},
                {"type": "translation", "translation": translation},
            ],
        })
    entry: dict[str, Any] = {
        "name": name,
        "axes": [{"name": a, "type": "space", "unit": UNIT} for a in AXES],
        "datasets": datasets,
    }
    if zarr_format == 2:  # 0.4 keeps the version on each multiscale, 0.5 on the `ome` object
        entry["version"] = "0.4"
    return entry


def factors_of(attrs: Mapping[str, Any], zarr_format: int) -> list[tuple[int, int, int]] | None:
    """The reduction factor of each level recorded in a group's first multiscale."""
    multiscales = ome_part(attrs, zarr_format).get("multiscales")
    try:
        scales = [d["coordinateTransformations"][0]["scale"] for d in multiscales[0]["datasets"]]
    except (KeyError, IndexError, TypeError):
        return None
    return [tuple(int(round(s / b)) for s, b in zip(scale, scales[0])) for scale in scales]  # type: ignore[misc]


def with_ome(attrs: Mapping[str, Any], zarr_format: int, **keys: Any) -> dict[str, Any] | None:
    """The attribute update that sets OME-NGFF ``keys`` (``image-label`` spelt
    ``image_label``), keeping the others; None when ``attrs`` already hold exactly that,
    so concurrent writers of the same metadata write nothing."""
    keys = {k.replace("_", "-"): v for k, v in keys.items()}
    current = ome_part(attrs, zarr_format)
    wanted = {**current, **keys}
    if zarr_format == 3:
        wanted["version"] = "0.5"
        return None if wanted == current else {"ome": wanted}
    return None if wanted == current else keys


def label_parent(inner_path: str) -> str | None:
    """The image group of a label image at ``inner_path`` (``<image>/labels/<name>``), else None."""
    parts = [p for p in inner_path.split("/") if p]
    if len(parts) >= 2 and parts[-2] == "labels":
        return "/".join(parts[:-2])
    return None


def label_source(inner_path: str) -> dict[str, Any]:
    """The ``image-label`` metadata of a label image: its ``source`` is the image two levels up."""
    return {"source": {"image": "../../"}}


def ordered_labels(names: Sequence[str]) -> list[str]:
    """Label names with ground truth last (stable otherwise)."""
    return sorted(dict.fromkeys(names), key=lambda n: n in GROUND_TRUTH_LABELS)
