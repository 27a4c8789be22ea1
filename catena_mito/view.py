"""``catena-mito view DATASET``: a neuroglancer link and a napari command line for a dataset.

Neuroglancer runs in the browser and reads the Zarr volumes itself, so it needs them over
HTTP(S): a local dataset is served by ``--serve PORT`` (a static file server that adds
the CORS header neuroglancer needs) and its layers point at ``http://127.0.0.1:PORT/…``;
an ``s3://`` dataset is read by neuroglancer straight from the bucket (``s3://`` for AWS)
or, when an endpoint is configured (``endpoint_url`` in storage options or
``AWS_ENDPOINT_URL``: MinIO, SeaweedFS, Ceph), from ``<endpoint>/<bucket>/<key>``.

Layers (:func:`neuroglancer_state`): raw as an image, every prediction volume as an image,
every label image (predicted instances first, ground truth hidden) as a segmentation.
Each source names a volume's OME-NGFF multiscale group, from which neuroglancer reads
every level and its scale; the global dimensions are raw's voxel size in metres.

napari (napari-ome-zarr) opens ``<dataset>/volumes`` — raw with every label image as
labels layers, which it adds hidden: tick them on — and each prediction volume.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import urllib.parse
from collections.abc import Mapping
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from catena_mito import ome, storage
from catena_mito.errors import ConfigError, DataError, StorageError

log = logging.getLogger(__name__)

#: Where the link opens neuroglancer (any deployment of the client works).
NEUROGLANCER_APP = "https://neuroglancer-demo.appspot.com"
PREDICTIONS = "volumes/predictions"
LABELS = "volumes/labels"


def dataset_volumes(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, list[str]]:
    """The volumes of a dataset by role: ``{"image": [raw], "predictions": [...], "labels": [...]}``
    as paths inside it. Older datasets (plain arrays) are found too."""
    opts = dict(storage_options or {})
    if not storage.array_exists(storage.join_url(url, storage.RAW_PATH), opts):
        raise DataError(f"{storage.redact_url(url)!r} has no {storage.RAW_PATH}; expected a catena-mito dataset")
    out: dict[str, list[str]] = {"image": [storage.RAW_PATH], "predictions": [], "labels": []}
    for role, group_path in (("predictions", PREDICTIONS), ("labels", LABELS)):
        try:
            group = storage.open_group(storage.join_url(url, group_path), storage_options=opts)
        except StorageError:
            continue
        names = list(ome.ome_part(group.attrs.asdict(), group.metadata.zarr_format).get("labels") or [])
        names += sorted(name for name, _ in _members(group))
        for name in ome.ordered_labels(names) if role == "labels" else dict.fromkeys(names):
            if storage.array_exists(storage.join_url(url, group_path, name), opts):
                out[role].append(f"{group_path}/{name}")
    return out


def _members(group: Any) -> list[tuple[str, Any]]:
    import warnings

    with warnings.catch_warnings():  # zarr warns about the .catena record folders
        warnings.simplefilter("ignore")
        return list(group.members())


def http_base(url: str, port: int, storage_options: Mapping[str, Any] | None = None) -> str:
    """The URL neuroglancer fetches ``url`` from (see the module doc)."""
    scheme = storage.url_scheme(url)
    if storage.is_local(url):
        root = os.path.dirname(os.path.abspath(storage.local_path(url)))
        rel = os.path.relpath(os.path.abspath(storage.local_path(url)), root)
        return f"http://127.0.0.1:{port}/{urllib.parse.quote(rel)}"
    if scheme in ("s3", "s3a"):
        options = storage.resolve_storage_options(url, storage_options)
        endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
        key = url.split("://", 1)[1]
        return f"{endpoint.rstrip('/')}/{key}" if endpoint else f"s3://{key}"
    if scheme in ("http", "https", "gs"):
        return url.rstrip("/")
    raise ConfigError(f"view: {storage.redact_url(url)!r}: neuroglancer cannot read {scheme}:// "
                      "(expected a local path, s3://, gs:// or http(s)://)")


def neuroglancer_state(url: str, *, port: int = 8000, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The neuroglancer viewer state (JSON-able) for the dataset at ``url``."""
    volumes = dataset_volumes(url, storage_options)
    raw = storage.open_volume(storage.join_url(url, storage.RAW_PATH), storage_options)
    resolution, _ = storage.read_spatial(raw)
    resolution = resolution or (1.0, 1.0, 1.0)
    fmt = raw.metadata.zarr_format
    base = http_base(url, port, storage_options)

    def source(path: str) -> str:
        return f"zarr{fmt}://{base}/{path}"

    layers: list[dict[str, Any]] = [{"type": "image", "source": source(storage.RAW_PATH), "name": "raw"}]
    for path in volumes["predictions"]:
        layers.append({"type": "image", "source": source(path), "name": path.rsplit("/", 1)[-1],
                       "opacity": 0.5, "shader": _PROBABILITY_SHADER})
    for path in volumes["labels"]:
        name = path.rsplit("/", 1)[-1]
        layers.append({"type": "segmentation", "source": source(path), "name": name,
                       "visible": name not in ome.GROUND_TRUTH_LABELS})
    return {
        "dimensions": {a: [r * 1e-9, "m"] for a, r in zip(ome.AXES, resolution)},
        "position": [s / 2 for s in raw.shape],
        "crossSectionScale": 1,
        "layers": layers,
        "selectedLayer": {"layer": "raw"},
        "layout": "4panel",
    }


#: Probabilities in green, transparent where low (uint8 0..255 or float 0..1 alike).
_PROBABILITY_SHADER = ("#uicontrol invlerp normalized\n"
                       "void main() { float v = normalized(); emitRGBA(vec4(0.0, 1.0, 0.0, v)); }")


def neuroglancer_url(state: Mapping[str, Any], app: str = NEUROGLANCER_APP) -> str:
    """A link that opens ``state`` in the neuroglancer client at ``app``."""
    text = json.dumps(state, separators=(",", ":"))
    return f"{app.rstrip('/')}/#!{urllib.parse.quote(text, safe='')}"


def napari_command(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The napari command line that opens the dataset with napari-ome-zarr."""
    volumes = dataset_volumes(url, storage_options)
    paths = [storage.join_url(url, "volumes")] + [storage.join_url(url, p) for p in volumes["predictions"]]
    return "napari --plugin napari-ome-zarr " + " ".join(paths)


def view_text(url: str, *, port: int = 8000, storage_options: Mapping[str, Any] | None = None) -> str:
    """What ``catena-mito view`` prints."""
    state = neuroglancer_state(url, port=port, storage_options=storage_options)
    lines = [f"neuroglancer: {neuroglancer_url(state)}"]
    if storage.is_local(url):
        lines.append(f"  (the data must be served: catena-mito view {url} --serve {port})")
    lines += [f"napari:       {napari_command(url, storage_options)}",
              "  (napari adds the label images hidden: tick them on in the layer list)",
              "state JSON:", json.dumps(state, indent=1)]
    return "\n".join(lines)


class _CorsHandler(SimpleHTTPRequestHandler):
    """Static files with the CORS header neuroglancer (a page on another origin) needs."""

    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("http: " + format, *args)


def make_server(url: str, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """A static server of the folder holding the local dataset ``url`` (not started)."""
    if not storage.is_local(url):
        raise ConfigError(f"--serve: {storage.redact_url(url)!r} is not local; neuroglancer reads it directly")
    folder = os.path.dirname(os.path.abspath(storage.local_path(url)))
    handler = functools.partial(_CorsHandler, directory=folder)
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise ConfigError(f"--serve {port}: cannot listen on {host}:{port}: {e}") from e
