"""Storage: fsspec URLs to Zarr groups and arrays, the dataset layout, TIFF in and out.

Every path the project reads or writes is an fsspec URL: a local path, ``s3://bucket/key``
or ``memory://name``. Local paths are handed to zarr as plain paths (zarr-python 3 does
not want ``file://``); everything else goes through :class:`zarr.storage.FsspecStore`.

S3 credentials come from ``storage_options`` (``key``, ``secret``, ``endpoint_url``, …) or
from the standard AWS environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``); explicit options
win. They are never logged: error messages name the URL, not the options.

Arrays are (z, y, x); ``resolution`` (nm) and ``offset`` (nm) are kept as array
attributes and carried from inputs to outputs.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.errors import ContainsArrayError, GroupNotFoundError

try:  # zarr >= 3.1 renamed the error for a missing array
    from zarr.errors import ArrayNotFoundError
except ImportError:  # pragma: no cover
    ArrayNotFoundError = FileNotFoundError  # type: ignore[misc,assignment]

from catena_mito.errors import DataError, StorageError

# --- the dataset layout -------------------------------------------------------------------

RAW_PATH = "volumes/raw"
LABEL_PATHS = {"mito": "volumes/labels/mito_ids", "neuron": "volumes/labels/neuron_ids"}
INSTANCES_PATH = "volumes/labels/mito_instances"


def prediction_path(label_type: str) -> str:
    """Where predict writes into a dataset: ``volumes/predictions/<label_type>``."""
    return f"volumes/predictions/{label_type}"


# --- URLs and filesystems -------------------------------------------------------------------

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_CREDENTIALS_IN_URL = re.compile(r"://[^/@\s]+@")


def url_scheme(url: str) -> str:
    """The URL's scheme, ``file`` for a plain local path."""
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else "file"


def is_local(url: str) -> bool:
    return url_scheme(url) in ("file", "local")


def local_path(url: str) -> str:
    """A local URL as a plain path (``file://`` stripped)."""
    return url[len("file://") :] if url.startswith("file://") else url


def join_url(base: str, *parts: str) -> str:
    """Join path components onto a URL with ``/`` (also for local paths)."""
    out = base.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` part hidden, for messages and saved configs."""
    return _CREDENTIALS_IN_URL.sub("://***@", url)


#: botocore retry settings used for S3 unless configured otherwise: "standard" mode retries
#: connection errors, timeouts, throttling and 5xx with exponential backoff (up to 20 s per
#: wait); 8 attempts ride out an endpoint restart of ~30 s.
S3_RETRIES = {"max_attempts": 8, "mode": "standard"}


def resolve_storage_options(url: str, storage_options: Mapping[str, Any] | None = None) -> dict:
    """The fsspec options for ``url``: explicit options, completed from the environment.

    For ``s3://`` the AWS variables fill what is not given; s3fs gets key, secret and
    endpoint explicitly (no region needed for S3-compatible servers).
    """
    options = dict(storage_options or {})
    if url_scheme(url) in ("s3", "s3a"):
        env = os.environ
        if "key" not in options and "anon" not in options and env.get("AWS_ACCESS_KEY_ID"):
            options["key"] = env["AWS_ACCESS_KEY_ID"]
            if env.get("AWS_SECRET_ACCESS_KEY"):
                options.setdefault("secret", env["AWS_SECRET_ACCESS_KEY"])
            if env.get("AWS_SESSION_TOKEN"):
                options.setdefault("token", env["AWS_SESSION_TOKEN"])
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options:
            client_kwargs = options.get("client_kwargs") or {}
            if "endpoint_url" not in client_kwargs:
                options["endpoint_url"] = endpoint
        # Transient faults (a restarted endpoint, throttling, 5xx) are retried with backoff a
        # bounded number of times, then the job fails with one clear line; AWS_MAX_ATTEMPTS /
        # AWS_RETRY_MODE or storage_options.config_kwargs.retries choose otherwise.
        config_kwargs = dict(options.get("config_kwargs") or {})
        if "retries" not in config_kwargs and not (env.get("AWS_MAX_ATTEMPTS") or env.get("AWS_RETRY_MODE")):
            config_kwargs["retries"] = dict(S3_RETRIES)
            options["config_kwargs"] = config_kwargs
    return options


def get_fs(url: str, storage_options: Mapping[str, Any] | None = None):
    """``(filesystem, path)`` for a URL; an unknown scheme is a :class:`StorageError`."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **resolve_storage_options(url, storage_options))
    except (ValueError, ImportError) as e:
        raise StorageError(
            f"cannot open {redact_url(url)!r}: unsupported URL scheme "
            f"{url_scheme(url)!r} (expected a local path, s3:// or memory://): {e}"
        ) from e
    return fs, path


def _store(url: str, storage_options: Mapping[str, Any] | None, read_only: bool):
    if is_local(url):
        path = local_path(url)
        if read_only and not os.path.exists(path):
            raise StorageError(f"{url!r} does not exist")
        return zarr.storage.LocalStore(path, read_only=read_only)
    get_fs(url, storage_options)  # a clear error for an unknown scheme
    try:
        return zarr.storage.FsspecStore.from_url(
            url,
            storage_options=resolve_storage_options(url, storage_options),
            read_only=read_only,
        )
    except Exception as e:  # fsspec/botocore raise many types here
        raise StorageError(f"cannot open store {redact_url(url)!r}: {_describe(e)}") from e


def _describe(e: BaseException) -> str:
    """A one-line description of a storage exception, without credentials."""
    text = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
    return redact_url(text)


def split_store_url(url: str) -> tuple[str, str]:
    """Split ``.../name.zarr/inner/path`` into the store root and the path inside it.

    The root is the last path component that ends in ``.zarr``; a URL without one is a
    store of its own (``path == ""``).
    """
    parts = url.rstrip("/").split("/")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].endswith(".zarr"):
            return "/".join(parts[: i + 1]), "/".join(parts[i + 1 :])
    return url.rstrip("/"), ""


# --- groups and arrays ----------------------------------------------------------------------


def open_group(
    url: str,
    mode: str = "r",
    storage_options: Mapping[str, Any] | None = None,
    zarr_format: int | None = None,
) -> zarr.Group:
    """Open a Zarr group at ``url``; ``mode`` as in :func:`zarr.open_group`.

    Reading detects format 2 or 3; ``zarr_format`` chooses the format of a group that
    ``mode`` creates, and an existing group of another format is an error.
    """
    store = _store(url, storage_options, read_only=mode == "r")
    try:
        group = zarr.open_group(store=store, mode=mode, zarr_format=zarr_format)
        if zarr_format is not None and group.metadata.zarr_format != zarr_format:
            raise StorageError(
                f"{redact_url(url)!r} is Zarr format {group.metadata.zarr_format}, expected {zarr_format}"
            )
        return group
    except (GroupNotFoundError, FileNotFoundError, KeyError) as e:
        raise StorageError(f"no Zarr group at {redact_url(url)!r}") from e
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"cannot open Zarr group {redact_url(url)!r}: {_describe(e)}") from e


def open_array(url: str, storage_options: Mapping[str, Any] | None = None, mode: str = "r") -> zarr.Array:
    """Open an existing Zarr array (format 2 or 3) at ``url``."""
    store = _store(url, storage_options, read_only=mode == "r")
    try:
        node = zarr.open(store=store, mode=mode)
    except (ArrayNotFoundError, GroupNotFoundError, FileNotFoundError, KeyError) as e:
        raise StorageError(f"no Zarr array at {redact_url(url)!r}") from e
    except Exception as e:
        raise StorageError(f"cannot open Zarr array {redact_url(url)!r}: {_describe(e)}") from e
    if not isinstance(node, zarr.Array):
        raise StorageError(f"{redact_url(url)!r} is a Zarr group, expected an array")
    return node


def array_exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    try:
        open_array(url, storage_options)
    except StorageError:
        return False
    return True


def open_volume(url: str, storage_options: Mapping[str, Any] | None = None) -> zarr.Array:
    """Open a 3-D input volume, refusing anything that is not (z, y, x)."""
    arr = open_array(url, storage_options)
    if arr.ndim != 3:
        raise DataError(
            f"{redact_url(url)!r} has {arr.ndim} dimensions {list(arr.shape)}, expected 3 (z, y, x)"
        )
    if 0 in arr.shape:
        raise DataError(f"{redact_url(url)!r} is empty (shape {list(arr.shape)})")
    return arr


def create_array(
    url: str,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int],
    *,
    overwrite: bool = False,
    attrs: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    zarr_format: int | None = None,
    fill_value: Any = 0,
) -> zarr.Array:
    """Open-or-create an output array at ``url`` with a compatibility check.

    An existing array with the same shape, dtype and chunks is reused (so that shards
    running concurrently, and reruns that resume, share it); one that differs is an error
    naming what differs, unless ``overwrite``, which replaces it. Arrays inside a
    ``.zarr`` store are created through its root group so the parent groups get their
    metadata (zarr 3 has no implicit groups). ``zarr_format`` defaults to the existing
    store's format, else 3.
    """
    shape = tuple(int(s) for s in shape)
    chunks = tuple(int(c) for c in chunks)
    dtype = np.dtype(dtype)
    existed = array_exists(url, storage_options)
    if existed:
        existing = open_array(url, storage_options, mode="r+")
        problems = []
        if tuple(existing.shape) != shape:
            problems.append(f"shape {list(existing.shape)} != {list(shape)}")
        if existing.dtype != dtype:
            problems.append(f"dtype {existing.dtype} != {dtype}")
        if tuple(existing.chunks) != chunks:
            problems.append(f"chunks {list(existing.chunks)} != {list(chunks)}")
        if not problems:
            if attrs:
                existing.attrs.update(dict(attrs))
                _maybe_write_ome(url, attrs, storage_options)
            return existing
        if not overwrite:
            raise StorageError(
                f"output {redact_url(url)!r} exists and is incompatible ({'; '.join(problems)}); "
                "remove it or rerun with --overwrite"
            )

    root_url, inner = split_store_url(url)
    try:
        if inner:
            root = open_group(root_url, mode="a", storage_options=storage_options)
            if zarr_format is not None and root.metadata.zarr_format != zarr_format:
                raise StorageError(
                    f"{redact_url(root_url)!r} is Zarr format {root.metadata.zarr_format}, "
                    f"cannot add a format {zarr_format} array"
                )
            arr = root.create_array(
                name=inner, shape=shape, dtype=dtype, chunks=chunks,
                # Replace only an array seen to exist (incompatible + overwrite): a shard
                # that creates a missing array must not wipe one a concurrent shard has
                # just created and started writing into.
                fill_value=fill_value, overwrite=existed,
                **_dimension_names(root.metadata.zarr_format, len(shape)),
            )
        else:
            store = _store(url, storage_options, read_only=False)
            arr = zarr.create_array(
                store=store, shape=shape, dtype=dtype, chunks=chunks, fill_value=fill_value,
                overwrite=existed, zarr_format=zarr_format or 3,
                **_dimension_names(zarr_format or 3, len(shape)),
            )
    except StorageError:
        raise
    except ContainsArrayError:
        # A concurrent shard created it between our check and our create: use theirs.
        return create_array(
            url, shape, dtype, chunks, overwrite=False, attrs=attrs,
            storage_options=storage_options, zarr_format=zarr_format, fill_value=fill_value,
        )
    except Exception as e:
        raise StorageError(f"cannot create {redact_url(url)!r}: {_describe(e)}") from e
    if attrs:
        arr.attrs.update(dict(attrs))
        _maybe_write_ome(url, attrs, storage_options)
    return arr


# --- spatial metadata -----------------------------------------------------------------------


def spatial_attrs(
    resolution: Sequence[float] | None, offset: Sequence[float] | None = None
) -> dict[str, Any]:
    """Array attributes for a volume: ``resolution`` and ``offset``, both nm, (z, y, x)."""
    res = [float(r) for r in (resolution or (1.0, 1.0, 1.0))]
    off = [float(o) for o in (offset or (0.0, 0.0, 0.0))]
    return {"resolution": res, "offset": off}


def read_spatial(arr: zarr.Array) -> tuple[tuple[float, float, float] | None, tuple[float, float, float]]:
    """``(resolution, offset)`` of an array in nm; resolution is None when not recorded."""
    attrs = dict(arr.attrs)
    res = attrs.get("resolution")
    off = attrs.get("offset") or (0.0, 0.0, 0.0)
    resolution = tuple(float(r) for r in res) if res is not None else None
    return resolution, tuple(float(o) for o in off)  # type: ignore[return-value]


# --- OME-NGFF multiscale metadata ----------------------------------------------------------
#
# Design: the arrays stay at the fixed layout paths; the OME-NGFF ``multiscales`` metadata
# that lets napari and neuroglancer open them (axes z, y, x of type space in nanometre,
# scale = resolution, translation = offset) goes on a *host group* above each array, one
# single-level multiscale entry per array, whose dataset path is the array's path relative
# to the host. The host is the array's parent group, except for a parent named ``volumes``:
# in the dataset layout that group holds ``labels/``, and OME-NGFF reserves a child group
# named ``labels`` of an image group for label images (validators then read
# ``volumes/labels`` as a labels collection and reject it). So ``volumes/raw`` is described
# on the store root (dataset path ``volumes/raw``), and
#
#   <store root>          multiscales: [volumes/raw]
#   volumes/labels        multiscales: [mito_ids, neuron_ids, mito_instances]
#   volumes/predictions   multiscales: [mito]
#
# Zarr format 3 stores get OME-NGFF 0.5 (under the ``ome`` key; arrays carry
# ``dimension_names`` z, y, x, which 0.5 requires); format 2 stores get 0.4 (top-level
# ``multiscales``). Viewers open the first entry of a group's list, so ``napari x.zarr``
# shows raw and ``napari x.zarr/volumes/labels`` the first label array written there.

OME_AXES: tuple[str, str, str] = ("z", "y", "x")
_OME_SKIP_PARENTS = ("volumes",)


def _dimension_names(zarr_format: int, ndim: int) -> dict[str, Any]:
    """``dimension_names`` for a new 3-D format-3 array (format 2 has none)."""
    return {"dimension_names": OME_AXES} if zarr_format == 3 and ndim == 3 else {}


def ome_host(array_url: str) -> tuple[str, str] | None:
    """``(host_group_url, dataset_path)`` where the OME-NGFF entry of ``array_url`` lives.

    None for an array that is a store of its own (no group above it to describe it).
    """
    root_url, inner = split_store_url(array_url)
    parts = [p for p in inner.split("/") if p]
    if not parts:
        return None
    host, path = parts[:-1], parts[-1:]
    # Why: OME-NGFF reads a `labels` child of an image group as label images (see above).
    while host and host[-1] in _OME_SKIP_PARENTS:
        path.insert(0, host.pop())
    return join_url(root_url, *host), "/".join(path)


def ome_multiscale_entry(
    dataset_path: str,
    resolution: Sequence[float],
    offset: Sequence[float] | None = None,
    version: str = "0.5",
) -> dict[str, Any]:
    """One single-level OME-NGFF multiscale entry for a (z, y, x) array.

    ``resolution`` (scale) and ``offset`` (translation) are in nanometres, (z, y, x).
    """
    entry: dict[str, Any] = {
        "name": dataset_path,
        "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in OME_AXES],
        "datasets": [
            {
                "path": dataset_path,
                "coordinateTransformations": [
                    {"type": "scale", "scale": [float(r) for r in resolution]},
                    {"type": "translation", "translation": [float(o) for o in (offset or (0, 0, 0))]},
                ],
            }
        ],
    }
    if version == "0.4":  # 0.4 keeps the version on each entry, 0.5 on the `ome` object
        entry["version"] = "0.4"
    return entry


def _entry_path(entry: Any) -> str | None:
    try:
        return entry["datasets"][0]["path"]
    except (KeyError, IndexError, TypeError):
        return None


def _merged_multiscales(attrs: Mapping[str, Any], entry: dict, zarr_format: int) -> dict | None:
    """The attribute update that puts ``entry`` into ``attrs``; None when already there."""
    if zarr_format == 3:
        ome = dict(attrs.get("ome") or {})
        current = list(ome.get("multiscales") or [])
    else:
        current = list(attrs.get("multiscales") or [])
    path = _entry_path(entry)
    # Replace in place (keeps the order, so a viewer's "first entry" stays the same).
    merged = [entry if _entry_path(m) == path else m for m in current]
    if not any(_entry_path(m) == path for m in current):
        merged.append(entry)
    if merged == current and (zarr_format != 3 or ome.get("version") == "0.5"):
        return None
    if zarr_format == 3:
        return {"ome": {**ome, "version": "0.5", "multiscales": merged}}
    return {"multiscales": merged}


def write_ome_metadata(
    array_url: str,
    resolution: Sequence[float],
    offset: Sequence[float] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> str | None:
    """Describe the (z, y, x) array at ``array_url`` in OME-NGFF multiscale metadata.

    Merges one entry into the host group's attributes (see :func:`ome_host`) without
    dropping other entries or other attributes; returns the host group URL (None for an
    array that is a store of its own). Idempotent: an entry that is already there is not
    rewritten, so shards calling this at once write the same bytes or nothing. Two
    processes adding *different* arrays to one group at the same moment could race on the
    read-modify-write; the entry is read back and rewritten if it was lost.
    ``resolution`` and ``offset`` are in nm.
    """
    host = ome_host(array_url)
    if host is None:
        return None
    group_url, dataset_path = host
    attempts = 5
    for attempt in range(attempts + 1):  # the last pass only checks the last write
        try:
            group = open_group(group_url, mode="a", storage_options=storage_options)
        except StorageError:
            # Another shard may be creating the same array (and its parents) right now.
            if attempt == attempts:
                raise
            time.sleep(0.05 * (attempt + 1) * (1 + random.random()))
            continue
        fmt = group.metadata.zarr_format
        entry = ome_multiscale_entry(dataset_path, resolution, offset, "0.5" if fmt == 3 else "0.4")
        update = _merged_multiscales(group.attrs.asdict(), entry, fmt)
        if update is None:
            return group_url
        if attempt == attempts:
            break
        if attempt:
            time.sleep(0.05 * attempt * (1 + random.random()))
        try:
            group.attrs.update(update)
        except Exception as e:
            raise StorageError(
                f"cannot write OME-NGFF metadata to {redact_url(group_url)!r}: {_describe(e)}"
            ) from e
    raise StorageError(
        f"OME-NGFF metadata for {redact_url(array_url)!r} kept being overwritten by "
        f"concurrent writers of {redact_url(group_url)!r}"
    )


def _maybe_write_ome(url: str, attrs: Mapping[str, Any], storage_options: Mapping[str, Any] | None) -> None:
    """Called by :func:`create_array`: every volume with a resolution gets OME metadata."""
    resolution = attrs.get("resolution")
    if resolution is not None and len(resolution) == 3:
        write_ome_metadata(url, resolution, attrs.get("offset"), storage_options)


# --- small files (configs, markers, merge state) -------------------------------------------


def write_bytes(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``data`` to ``url`` so that a reader sees the old object or the whole new one.

    Local files are written to a temporary name beside the target and renamed (atomic on
    POSIX); object stores publish a PUT atomically on their own.
    """
    fs, path = get_fs(url, storage_options)
    try:
        if is_local(url):
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            # unique per writer: threads of one process may write the same file at once
            tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            parent = posixpath.dirname(path)
            if parent and url_scheme(url) == "memory":
                fs.makedirs(parent, exist_ok=True)
            fs.pipe_file(path, data)
    except OSError as e:
        raise StorageError(f"cannot write {redact_url(url)!r}: {_describe(e)}") from e


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    fs, path = get_fs(url, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as e:
        raise StorageError(f"{redact_url(url)!r} does not exist") from e
    except Exception as e:
        raise StorageError(f"cannot read {redact_url(url)!r}: {_describe(e)}") from e


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    fs, path = get_fs(url, storage_options)
    try:
        return fs.exists(path)
    except Exception as e:
        raise StorageError(f"cannot reach {redact_url(url)!r}: {_describe(e)}") from e


def write_json(url: str, obj: Any, storage_options: Mapping[str, Any] | None = None) -> None:
    write_bytes(url, json.dumps(obj, indent=1, sort_keys=True).encode(), storage_options)


def read_json(url: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    return json.loads(read_bytes(url, storage_options))


def remove(url: str, storage_options: Mapping[str, Any] | None = None, recursive: bool = True) -> None:
    """Remove ``url`` (a file or a prefix); a missing one is fine."""
    fs, path = get_fs(url, storage_options)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass


# --- TIFF -----------------------------------------------------------------------------------


def read_tiff(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[np.ndarray, dict]:
    """Read a (multi-page) TIFF into memory: ``(array, metadata)``.

    ``metadata`` holds ``resolution``/``offset`` (nm, z, y, x lists) when the file records
    them: written by :func:`write_tiff` (either form), or an ImageJ/Fiji stack with a
    physical calibration (:func:`catena_mito.imagej.calibration`).
    """
    import tifffile

    from catena_mito.imagej import calibration

    data = read_bytes(url, storage_options)
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            array = tif.asarray()
            meta = dict(tif.shaped_metadata[0]) if tif.shaped_metadata else {}
            if tif.is_imagej:
                res, off = calibration(tif)
                meta = {k: list(v) for k, v in (("resolution", res), ("offset", off)) if v is not None}
    except Exception as e:
        raise DataError(f"cannot read TIFF {redact_url(url)!r}: {_describe(e)}") from e
    return array, {k: meta[k] for k in ("resolution", "offset") if k in meta}


def write_tiff(
    url: str,
    array: np.ndarray,
    resolution: Sequence[float] | None = None,
    offset: Sequence[float] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Write a (z, y, x) array as a multi-page TIFF with its resolution/offset (nm).

    3-D uint8, uint16 and float32 volumes become ImageJ hyperstacks that Fiji opens with
    their voxel size, unit (nm) and origin (:mod:`catena_mito.imagej`); other dtypes
    (uint32 ids, float16 …), which ImageJ stacks cannot hold, keep the dtype in a plain
    TIFF whose metadata only :func:`read_tiff` reads. ``catena-mito export`` converts to
    an ImageJ type first (:func:`catena_mito.imagej.to_imagej`).
    """
    import tifffile

    from catena_mito.imagej import is_imagej_dtype, write_kwargs

    array = np.asarray(array)
    buffer = io.BytesIO()
    if array.ndim == 3 and is_imagej_dtype(array.dtype):
        # Classic TIFF even beyond 4 GiB: ImageJ stores the pixels contiguously after one IFD.
        tifffile.imwrite(buffer, array, photometric="minisblack", **write_kwargs(resolution, offset))
    else:
        meta = {"axes": "ZYX", **spatial_attrs(resolution, offset)}
        tifffile.imwrite(buffer, array, metadata=meta, photometric="minisblack", bigtiff=array.nbytes > 2**31)
    write_bytes(url, buffer.getvalue(), storage_options)
