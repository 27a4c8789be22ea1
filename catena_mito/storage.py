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

import asyncio
import contextlib
import io
import json
import logging
import os
import posixpath
import random
import re
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.errors import ContainsArrayError, ContainsGroupError, GroupNotFoundError

try:  # zarr >= 3.1 renamed the error for a missing array
    from zarr.errors import ArrayNotFoundError
except ImportError:  # pragma: no cover
    ArrayNotFoundError = FileNotFoundError  # type: ignore[misc,assignment]

from catena_mito import ome
from catena_mito.errors import DataError, StorageError

log = logging.getLogger(__name__)

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
        return _LocalStore(path, read_only=read_only)
    get_fs(url, storage_options)  # a clear error for an unknown scheme
    try:
        return zarr.storage.FsspecStore.from_url(
            url,
            storage_options=resolve_storage_options(url, storage_options),
            read_only=read_only,
        )
    except Exception as e:  # fsspec/botocore raise many types here
        raise StorageError(f"cannot open store {redact_url(url)!r}: {_describe(e)}") from e


class _LocalStore(zarr.storage.LocalStore):
    """zarr's local store, writing each chunk and metadata file as :func:`write_bytes` does.

    Its temporary files name their host and process (zarr's own ``.<uuid>.partial`` names
    neither), so the temporaries of a writer killed mid-chunk can be told from those of a
    live one and swept when the run completes (:func:`remove_dead_temporaries`); its
    writes also survive a concurrent removal of their folder. Exclusive creates stay
    zarr's."""

    async def _set(self, key: str, value: Any, exclusive: bool = False) -> None:
        if exclusive:
            return await super()._set(key, value, exclusive=True)
        if not self._is_open:
            await self._open()
        self._check_writable()
        if not isinstance(value, zarr.core.buffer.Buffer):
            raise TypeError(f"_LocalStore.set(): `value` must be a Buffer, got {type(value)}")
        await asyncio.to_thread(_write_local, os.path.join(str(self.root), key), value.as_buffer_like(), False)


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


#: How often ``open_group(mode="a")`` retries after a concurrent creation of the same group.
_GROUP_RACE_RETRIES = 20


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
    raced = 0
    while True:
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
            # mode "a" looks for the group, then creates it: a concurrent shard (or thread)
            # may create it in between (ContainsGroupError), or be still writing its
            # metadata when we read it (a JSON error): open theirs, after a short pause
            if mode == "a" and raced < _GROUP_RACE_RETRIES and (
                    isinstance(e, ContainsGroupError) or (raced and isinstance(e, ValueError))):
                raced += 1
                time.sleep(random.uniform(0.0, 0.01 * raced))
                continue
            raise StorageError(f"cannot open Zarr group {redact_url(url)!r}: {_describe(e)}") from e


def open_array(url: str, storage_options: Mapping[str, Any] | None = None, mode: str = "r") -> zarr.Array:
    """Open an existing Zarr array (format 2 or 3) at ``url``.

    A URL naming a volume's OME-NGFF multiscale group opens its level 0 (see
    :mod:`catena_mito.ome`); a plain array (older datasets) opens as it is.
    """
    store = _store(url, storage_options, read_only=mode == "r")
    try:
        node = zarr.open(store=store, mode=mode)
    except (ArrayNotFoundError, GroupNotFoundError, FileNotFoundError, KeyError) as e:
        raise StorageError(f"no Zarr array at {redact_url(url)!r}") from e
    except Exception as e:
        raise StorageError(f"cannot open Zarr array {redact_url(url)!r}: {_describe(e)}") from e
    if isinstance(node, zarr.Group):
        level0 = level0_of(node)  # a volume's multiscale group: its full resolution
        if level0 is not None:
            return level0
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

    A (z, y, x) volume with a ``resolution`` inside a store becomes level 0 of an OME-NGFF
    multiscale group at ``url`` (see :mod:`catena_mito.ome`), which is returned; its
    coarser levels are dropped when level 0 is replaced or written by another run. A plain
    array already there (an older dataset) is kept as it is.
    """
    if _is_volume(url, shape, attrs):
        return _create_volume(url, shape, dtype, chunks, overwrite=overwrite, attrs=dict(attrs or {}),
                              storage_options=storage_options, zarr_format=zarr_format, fill_value=fill_value)
    return _create_plain(url, shape, dtype, chunks, overwrite=overwrite, attrs=attrs,
                         storage_options=storage_options, zarr_format=zarr_format, fill_value=fill_value)


def _create_plain(
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
            if attrs and any(existing.attrs.get(k) != v for k, v in attrs.items()):
                existing.attrs.update(dict(attrs))
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
        return _create_plain(
            url, shape, dtype, chunks, overwrite=False, attrs=attrs,
            storage_options=storage_options, zarr_format=zarr_format, fill_value=fill_value,
        )
    except Exception as e:
        raise StorageError(f"cannot create {redact_url(url)!r}: {_describe(e)}") from e
    if attrs:
        arr.attrs.update(dict(attrs))
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


# --- OME-NGFF layout (see catena_mito.ome) ----------------------------------------------
#
# A volume inside a ``.zarr`` store is a multiscale group at its layout path whose level 0
# (``<url>/0``) holds the full resolution; :func:`open_array` given the group's URL opens
# level 0, and a plain array at that path (a dataset of an older version) is opened as it
# is. :func:`create_array` makes (or keeps) that structure and its OME-NGFF metadata.

OME_AXES: tuple[str, str, str] = ome.AXES


def _dimension_names(zarr_format: int, ndim: int) -> dict[str, Any]:
    """``dimension_names`` for a new 3-D format-3 array (format 2 has none)."""
    return {"dimension_names": OME_AXES} if zarr_format == 3 and ndim == 3 else {}


#: Level names a multiscale group of a volume may use for its levels ("0", "s0", …): a
#: group whose first dataset is such a direct child is opened as that array. (Older
#: catena-mito datasets described several plain arrays on one group, e.g.
#: ``volumes/labels`` → ``mito_ids``; such a group is not a volume and stays a group.)
_LEVEL_NAME = re.compile(r"s?\d+")


def level0_of(group: zarr.Group) -> zarr.Array | None:
    """Level 0 of a volume's multiscale group; None for any other group."""
    paths = ome.level_paths(group.attrs.asdict(), group.metadata.zarr_format)
    if not paths or not _LEVEL_NAME.fullmatch(paths[0]):
        return None
    try:
        node = group[paths[0]]
    except KeyError:
        return None
    return node if isinstance(node, zarr.Array) else None


def _is_volume(url: str, shape: Sequence[int], attrs: Mapping[str, Any] | None) -> bool:
    """A (z, y, x) volume with a resolution inside a ``.zarr`` store: it gets the OME layout."""
    resolution = (attrs or {}).get("resolution")
    return bool(split_store_url(url)[1]) and len(shape) == 3 and resolution is not None and len(resolution) == 3


def is_label_volume(url: str, attrs: Mapping[str, Any] | None = None) -> bool:
    """Instance ids: a volume in a ``labels`` group, or one written by ``label`` elsewhere."""
    return ome.label_parent(split_store_url(url)[1]) is not None or "catena_label" in (attrs or {})


def volume_group(url: str, storage_options: Mapping[str, Any] | None = None, mode: str = "r") -> zarr.Group | None:
    """The multiscale group of the volume at ``url``; None for a plain (older) array."""
    store = _store(url, storage_options, read_only=mode == "r")
    try:
        node = zarr.open(store=store, mode=mode)
    except Exception as e:
        raise StorageError(f"no Zarr volume at {redact_url(url)!r}: {_describe(e)}") from e
    if isinstance(node, zarr.Group) and level0_of(node) is not None:
        return node
    return None


def volume_levels(url: str, storage_options: Mapping[str, Any] | None = None) -> list[tuple[int, int, int]]:
    """The reduction factor (z, y, x) of each level the volume at ``url`` records (level 0 first)."""
    group = volume_group(url, storage_options)
    if group is None:
        return [(1, 1, 1)]
    return ome.factors_of(group.attrs.asdict(), group.metadata.zarr_format) or [(1, 1, 1)]


def _update_attrs(group_url: str, make_update, storage_options: Mapping[str, Any] | None, what: str) -> None:
    """Merge ``make_update(current attrs, zarr_format)`` (None: nothing to change) into a group.

    Idempotent: shards writing the same metadata at once write the same bytes or nothing.
    Two processes adding *different* entries at the same moment could race on the
    read-modify-write, so the result is read back and the update redone if it was lost.
    """
    attempts = 5
    for attempt in range(attempts + 1):  # the last pass only checks the last write
        try:
            group = open_group(group_url, mode="a", storage_options=storage_options)
        except StorageError:
            # Another shard may be creating the same group right now.
            if attempt == attempts:
                raise
            time.sleep(0.05 * (attempt + 1) * (1 + random.random()))
            continue
        update = make_update(group.attrs.asdict(), group.metadata.zarr_format)
        if update is None:
            return
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
        f"OME-NGFF metadata for {what} kept being overwritten by concurrent writers of "
        f"{redact_url(group_url)!r}"
    )


def write_volume_metadata(
    url: str,
    factors: Sequence[Sequence[int]],
    storage_options: Mapping[str, Any] | None = None,
    *,
    label: bool | None = None,
) -> None:
    """Describe the volume at ``url`` (a multiscale group) with levels reduced by ``factors``.

    Writes its ``multiscales`` (scale and translation of each level from level 0's
    ``resolution`` and ``offset``, nm); for a label image its ``image-label`` and its
    entry in the ``labels`` list of the labels group above it; for the dataset's raw
    image the same multiscale on the groups that also describe it (see
    :mod:`catena_mito.ome`). ``label`` None: decided by :func:`is_label_volume`.
    """
    root_url, inner = split_store_url(url)
    level0 = open_array(join_url(url, ome.LEVEL0), storage_options)
    resolution, offset = read_spatial(level0)
    resolution = resolution or (1.0, 1.0, 1.0)
    if label is None:
        label = is_label_volume(url, dict(level0.attrs))
    name = inner.rsplit("/", 1)[-1]
    fmt = level0.metadata.zarr_format

    def own(attrs: Mapping[str, Any], zarr_format: int) -> dict | None:
        keys: dict[str, Any] = {"multiscales": [ome.multiscale(name, resolution, offset, factors, zarr_format)]}
        if label:
            image_label: dict[str, Any] = {"version": "0.4"} if zarr_format == 2 else {}
            if ome.label_parent(inner) is not None:
                image_label.update(ome.label_source(inner))
            keys["image_label"] = image_label
        return ome.with_ome(attrs, zarr_format, **keys)

    _update_attrs(url, own, storage_options, redact_url(url))
    if inner == ome.IMAGE_PATH:
        for host, prefix in ome.IMAGE_HOSTS.items():
            entry = ome.multiscale(name, resolution, offset, factors, fmt, prefix=prefix)
            _update_attrs(join_url(root_url, host), lambda a, f, e=entry: ome.with_ome(a, f, multiscales=[e]),
                          storage_options, redact_url(url))
    parent = ome.label_parent(inner)
    if label and parent is not None:
        def listed(attrs: Mapping[str, Any], zarr_format: int) -> dict | None:
            names = list(ome.ome_part(attrs, zarr_format).get("labels") or [])
            return ome.with_ome(attrs, zarr_format, labels=ome.ordered_labels([*names, name]))

        _update_attrs(join_url(root_url, parent, "labels"), listed, storage_options, redact_url(url))


def _create_volume(url: str, shape, dtype, chunks, *, overwrite: bool, attrs: Mapping[str, Any],
                   storage_options, zarr_format: int | None, fill_value: Any) -> zarr.Array:
    """:func:`create_array` for a volume: level 0 of a multiscale group at ``url``."""
    from catena_mito.blockwise.identity import RUN_ATTR

    store = _store(url, storage_options, read_only=False)
    try:
        node = zarr.open(store=store, mode="r")
    except Exception:  # nothing there yet
        node = None
    if isinstance(node, zarr.Array):
        # A dataset of an older version keeps its plain array (read and written in place).
        return _create_plain(url, shape, dtype, chunks, overwrite=overwrite, attrs=attrs,
                             storage_options=storage_options, zarr_format=zarr_format, fill_value=fill_value)
    before = level0_of(node) if isinstance(node, zarr.Group) else None
    old_paths = ome.level_paths(node.attrs.asdict(), node.metadata.zarr_format) if before is not None else None
    old_factors = ome.factors_of(node.attrs.asdict(), node.metadata.zarr_format) if before is not None else None
    old_attrs = dict(before.attrs) if before is not None else {}
    level_url = join_url(url, ome.LEVEL0)
    fmt = zarr_format or _store_format(url, storage_options)
    level_attrs = {**attrs, **ome.dimension_attrs(attrs["resolution"], (1, 1, 1), fmt)}
    arr = _create_plain(level_url, shape, dtype, chunks, overwrite=overwrite, attrs=level_attrs,
                        storage_options=storage_options, zarr_format=zarr_format, fill_value=fill_value)
    # Coarser levels stay only while they still derive from what level 0 holds: same array,
    # same run, same geometry. Otherwise they are stale and go (the pyramid is rebuilt).
    kept = (
        before is not None and old_factors and old_paths
        and (tuple(before.shape), before.dtype, tuple(before.chunks)) == (tuple(arr.shape), arr.dtype, tuple(arr.chunks))
        and old_attrs.get(RUN_ATTR) == dict(attrs).get(RUN_ATTR)
        and (old_attrs.get("resolution"), old_attrs.get("offset")) == (dict(attrs).get("resolution"), dict(attrs).get("offset"))
    )
    factors = old_factors if kept else [(1, 1, 1)]
    if not kept and old_paths:
        for path in old_paths[1:]:
            remove(join_url(url, path), storage_options)
    write_volume_metadata(url, factors, storage_options, label=is_label_volume(url, attrs))
    return arr


def create_level(
    url: str,
    index: int,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int],
    *,
    attrs: Mapping[str, Any],
    storage_options: Mapping[str, Any] | None = None,
) -> zarr.Array:
    """Open-or-create level ``index`` (> 0) of the volume at ``url`` (``<url>/<index>``).

    Its attributes carry its own ``resolution``/``offset`` (nm) and axis units, so it reads
    right when opened alone; one of another shape, dtype or chunks is replaced (the caller
    owns the volume's pyramid). It is listed in the OME-NGFF metadata only by
    :func:`write_volume_metadata`, once complete.
    """
    fmt = _store_format(url, storage_options)
    level_attrs = {**attrs, **ome.dimension_attrs(attrs["resolution"], (1, 1, 1), fmt)}
    return _create_plain(join_url(url, str(int(index))), shape, dtype, chunks, overwrite=True,
                         attrs=level_attrs, storage_options=storage_options, zarr_format=fmt)


def _store_format(url: str, storage_options: Mapping[str, Any] | None) -> int:
    root_url, _ = split_store_url(url)
    try:
        return open_group(root_url, mode="r", storage_options=storage_options).metadata.zarr_format
    except StorageError:
        return 3


# --- small files (configs, markers, merge state) -------------------------------------------


def write_bytes(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None,
                sync: bool = True) -> None:
    """Write ``data`` to ``url`` so that a reader sees the old object or the whole new one.

    Local files are written to a temporary name beside the target and renamed (atomic on
    POSIX); object stores publish a PUT atomically on their own. ``sync=False`` skips the
    ``fsync`` of a local file (bulk intermediates, which are no more durable than the Zarr
    chunks written beside them; markers and records keep it).
    """
    fs, path = get_fs(url, storage_options)
    try:
        if is_local(url):
            _write_local(os.path.abspath(path), data, sync)
        else:
            parent = posixpath.dirname(path)
            if parent and url_scheme(url) == "memory":
                fs.makedirs(parent, exist_ok=True)
            fs.pipe_file(path, data)
    except OSError as e:
        raise StorageError(f"cannot write {redact_url(url)!r}: {_describe(e)}") from e


#: Attempts of a local write whose folder another process removes meanwhile.
LOCAL_WRITE_ATTEMPTS = 5
#: This host in temporary file names (``-`` is the names' separator).
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
#: ``.<name>.tmp-<host>-<pid>-<tag>``: a temporary of :func:`_write_local`; the older
#: ``.<name>.tmp-<pid>-<tag>`` (no host) too.
_TEMP_NAME = re.compile(r"^\..+\.tmp-(?:(?P<host>[A-Za-z0-9_.]+)-)?(?P<pid>\d+)-[0-9a-f]{8}$")
#: zarr's own temporaries, ``<name>.<uuid4 hex>.partial``.
_ZARR_TEMP_NAME = re.compile(r"\.[0-9a-f]{32}\.partial$")
#: Age after which a temporary whose writer cannot be checked (another host) is stale:
#: no write of one file takes this long.
TEMP_STALE_SECONDS = 600.0


def _temp_path(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _write_local(path: str, data: bytes, sync: bool) -> None:
    """Write a temporary file beside ``path`` and rename it over ``path``.

    Another process may remove the folder meanwhile (a shard of the same run cleaning up
    the prefix it completed): its folder, or the temporary file listed by that removal,
    is then gone, and the write starts again in a new folder, as a PUT into a deleted
    prefix of an object store simply lands. A folder still missing after
    :data:`LOCAL_WRITE_ATTEMPTS` writes is an error."""
    directory = os.path.dirname(path)
    for attempt in range(LOCAL_WRITE_ATTEMPTS):
        tmp = _temp_path(path)  # unique per writer: threads of one process may write the same file at once
        try:
            os.makedirs(directory, exist_ok=True)  # its parent too may vanish meanwhile
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if sync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            return
        except (FileNotFoundError, FileExistsError):  # FileExistsError: makedirs lost a race
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if attempt == LOCAL_WRITE_ATTEMPTS - 1:
                raise
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def process_running(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a dead writer's files may be taken over)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or a pid this host cannot have: not ours to judge
    return True


def _dead_temporary(folder: str, name: str, now: float, stale_seconds: float) -> bool:
    own = _TEMP_NAME.match(name)
    if own is None and _ZARR_TEMP_NAME.search(name) is None:
        return False
    if own is not None and own["host"] == _HOST:
        pid = int(own["pid"])
        return pid != os.getpid() and not process_running(pid)
    try:  # another host's, an older name's or zarr's: only its age tells
        return now - os.stat(os.path.join(folder, name)).st_mtime >= stale_seconds
    except FileNotFoundError:
        return False


def remove_dead_temporaries(url: str, stale_seconds: float = TEMP_STALE_SECONDS) -> int:
    """Remove what writers killed mid-file left under the local folder ``url``; the count.

    A temporary of :func:`write_bytes` or of a Zarr array opened here names its host and
    process: on this host it is removed when that process is gone (SIGKILL, OOM); one of
    another host (a shared file system), or without a host, once it is ``stale_seconds``
    old. Object stores publish whole objects and have none; nothing is done there.
    A live writer's temporaries are never touched."""
    if not is_local(url):
        return 0
    root = local_path(url)
    now = time.time()
    removed = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if _dead_temporary(folder, name, now, stale_seconds):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(folder, name))
                    removed += 1
    if removed:
        log.info("removed %d temporary file(s) of killed writers under %s", removed, redact_url(url))
    return removed


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
