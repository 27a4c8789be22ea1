"""``catena-mito import`` / ``export``: other volume formats in and out of the dataset layout.

Import sources (every path an fsspec URL; axis order (z, y, x)):

* a **folder of 2-D TIFF slices** (``.tif``/``.tiff``), sorted naturally
  (``slice_2.tif`` before ``slice_10.tif``), one slice per z;
* a **multi-page TIFF** (one page per z);
* an **HDF5 dataset**, ``file.h5:/path/in/file`` (the path may be left out when the file
  holds exactly one 3-D dataset);
* a **NumPy** ``.npy`` array (memory-mapped when local, read by byte ranges otherwise).

The volume is copied in slabs of ``chunks[0]`` z-slices, so memory is one slab
(``chunks[0] × Y × X`` voxels), never the whole volume. The resolution (nm, z, y, x)
comes from ``--resolution``, else from the source's metadata where there is some
(TIFFs written by ``export``; ImageJ ``spacing``/``XResolution``/``unit``; HDF5
``resolution`` attributes in nm as in CREMI, or ``element_size_um`` as in ilastik/Fiji);
without either the import is refused, since every job relies on the resolution.

Export writes one Zarr array as an ImageJ hyperstack that Fiji opens calibrated (voxel
size, unit nm, origin from the offset; :mod:`catena_mito.imagej`), in a pixel type Fiji
holds exactly: instance ids as uint16 when they fit, else float32 with ``ids="float32"``
(exact up to 2^24), else refused with one line. It needs the volume in memory, so it
refuses volumes larger than ``max_bytes``.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from catena_mito import storage
from catena_mito.errors import ConfigError, DataError, StorageError
from catena_mito.imagej import ID_MODES, calibration, to_imagej

log = logging.getLogger(__name__)

#: ``--as`` choices and the layout path each one writes.
TARGETS: dict[str, str] = {
    "raw": storage.RAW_PATH,
    "mito_ids": storage.LABEL_PATHS["mito"],
    "neuron_ids": storage.LABEL_PATHS["neuron"],
    "mito_instances": storage.INSTANCES_PATH,
}

_TIFF_EXT = (".tif", ".tiff")
_H5_EXT = (".h5", ".hdf5", ".hdf", ".n5h5")


def natural_key(name: str) -> list[Any]:
    """Sort key putting ``s2`` before ``s10`` (digit runs compare as numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


@dataclass
class Source:
    """A readable (z, y, x) volume: shape, dtype, metadata resolution, and a slab reader."""

    url: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    resolution: tuple[float, float, float] | None
    offset: tuple[float, float, float] | None
    read: Any  # callable (z0, z1) -> np.ndarray of shape (z1 - z0, y, x)


# --- sources -----------------------------------------------------------------------------


def _check_3d(url: str, shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise DataError(f"{storage.redact_url(url)!r} has {len(shape)} dimensions {list(shape)}, expected 3 (z, y, x)")
    if 0 in shape:
        raise DataError(f"{storage.redact_url(url)!r} is empty (shape {list(shape)})")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def _triple(values: Any) -> tuple[float, float, float] | None:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return out if len(out) == 3 else None  # type: ignore[return-value]


def _tiff_resolution(tif) -> tuple[tuple[float, float, float] | None, tuple[float, float, float] | None]:
    """Resolution/offset (nm) of an open ``tifffile.TiffFile``: our metadata, else ImageJ's
    calibration (:func:`catena_mito.imagej.calibration`)."""
    if tif.shaped_metadata:
        meta = tif.shaped_metadata[0]
        res = _triple(meta.get("resolution")) if "resolution" in meta else None
        if res is not None:
            return res, _triple(meta.get("offset")) if "offset" in meta else None
    if tif.is_imagej:
        return calibration(tif)
    return None, None


@contextmanager
def _open_binary(url: str, storage_options: Mapping[str, Any] | None):
    fs, path = storage.get_fs(url, storage_options)
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError as e:
        raise StorageError(f"{storage.redact_url(url)!r} does not exist") from e
    except Exception as e:
        raise StorageError(f"cannot open {storage.redact_url(url)!r}: {type(e).__name__}: {e}") from e
    try:
        yield f
    finally:
        f.close()


@contextmanager
def _tiff_stack_source(url: str, storage_options: Mapping[str, Any] | None) -> Iterator[Source]:
    """A multi-page TIFF, read one page per z slice."""
    import tifffile

    with _open_binary(url, storage_options) as f:
        try:
            tif = tifffile.TiffFile(f)
        except Exception as e:
            raise DataError(f"cannot read TIFF {storage.redact_url(url)!r}: {type(e).__name__}: {e}") from e
        with tif:
            series = tif.series[0]
            shape = tuple(series.shape)
            if len(shape) == 2:
                shape = (1, *shape)
            shape = _check_3d(url, shape)
            resolution, offset = _tiff_resolution(tif)
            import zarr

            # tifffile's Zarr view reads only the pages/strips a slab needs, for plain
            # page-per-slice stacks as well as contiguous or tiled ones.
            try:
                lazy = zarr.open_array(series.aszarr(), mode="r")
            except Exception as e:
                raise DataError(f"cannot read TIFF {storage.redact_url(url)!r} lazily: {type(e).__name__}: {e}") from e

            def read(z0: int, z1: int) -> np.ndarray:
                if lazy.ndim == 2:  # a single 2-D image is a volume of one slice
                    return np.asarray(lazy[...])[None]
                return np.asarray(lazy[z0:z1])

            yield Source(url, shape, np.dtype(series.dtype), resolution, offset, read)


@contextmanager
def _tiff_folder_source(url: str, storage_options: Mapping[str, Any] | None) -> Iterator[Source]:
    """A folder of 2-D TIFF slices in natural order, one per z."""
    import tifffile

    fs, path = storage.get_fs(url, storage_options)
    names = sorted(
        (n for n in fs.ls(path, detail=False) if n.lower().endswith(_TIFF_EXT)),
        key=lambda n: natural_key(n.rstrip("/").rsplit("/", 1)[-1]),
    )
    if not names:
        raise DataError(f"folder {storage.redact_url(url)!r} holds no .tif/.tiff slices")

    def read_slice(name: str) -> np.ndarray:
        try:
            with fs.open(name, "rb") as f:
                data = tifffile.imread(io.BytesIO(f.read()))
        except Exception as e:
            raise DataError(f"cannot read TIFF slice {name!r}: {type(e).__name__}: {e}") from e
        return data

    with fs.open(names[0], "rb") as f, tifffile.TiffFile(io.BytesIO(f.read())) as tif:
        first = tif.asarray()
        resolution, offset = _tiff_resolution(tif)
    if first.ndim != 2:
        raise DataError(f"slice {names[0]!r} has shape {list(first.shape)}, expected a 2-D (y, x) image")
    shape = (len(names), *first.shape)

    def read(z0: int, z1: int) -> np.ndarray:
        out = np.empty((z1 - z0, *first.shape), first.dtype)
        for i, z in enumerate(range(z0, z1)):
            plane = read_slice(names[z])
            if plane.shape != first.shape or plane.dtype != first.dtype:
                raise DataError(
                    f"slice {names[z]!r} is {plane.dtype} {list(plane.shape)}, but the first slice "
                    f"is {first.dtype} {list(first.shape)}; all slices must match"
                )
            out[i] = plane
        return out

    # A folder of slices records the in-plane size at most; z spacing comes from ImageJ.
    yield Source(url, _check_3d(url, shape), first.dtype, resolution, offset, read)


def _split_h5(url: str) -> tuple[str, str | None]:
    """``file.h5:/inner/path`` → ``("file.h5", "/inner/path")`` (``://`` is not a split)."""
    m = re.match(r"^(.*?\.(?:h5|hdf5|hdf|n5h5)):(/.*)?$", url, flags=re.IGNORECASE)
    if m:
        return m.group(1), m.group(2)
    return url, None


@contextmanager
def _h5_file(file_url: str, storage_options: Mapping[str, Any] | None):
    """An open ``h5py.File``: by path when local, through an fsspec file object otherwise."""
    import h5py

    with ExitStack() as stack:
        if storage.is_local(file_url):  # by path: h5py reads a local file fastest itself
            source = storage.local_path(file_url)
            if not os.path.exists(source):
                raise StorageError(f"{storage.redact_url(file_url)!r} does not exist")
        else:
            source = stack.enter_context(_open_binary(file_url, storage_options))
        try:
            h5 = stack.enter_context(h5py.File(source, "r"))
        except Exception as e:
            raise DataError(f"cannot read HDF5 file {storage.redact_url(file_url)!r}: {type(e).__name__}: {e}") from e
        yield h5


@contextmanager
def _h5_source(url: str, storage_options: Mapping[str, Any] | None) -> Iterator[Source]:
    import h5py

    file_url, inner = _split_h5(url)
    with _h5_file(file_url, storage_options) as h5:
        if inner is None:
            found: list[str] = []
            h5.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) and obj.ndim == 3 else None)
            if len(found) != 1:
                raise ConfigError(
                    f"{storage.redact_url(file_url)!r}: name the dataset as FILE.h5:/path "
                    f"(3-D datasets in the file: {found or 'none'})"
                )
            inner = "/" + found[0]
        if inner not in h5 or not isinstance(h5[inner], h5py.Dataset):
            raise DataError(f"{storage.redact_url(file_url)!r} has no dataset {inner!r}")
        ds = h5[inner]
        attrs = dict(ds.attrs)
        resolution = _triple(attrs["resolution"]) if "resolution" in attrs else None
        if resolution is None and "element_size_um" in attrs:
            um = _triple(attrs["element_size_um"])
            resolution = tuple(1000.0 * v for v in um) if um else None  # type: ignore[assignment]
        offset = _triple(attrs["offset"]) if "offset" in attrs else None

        def read(z0: int, z1: int) -> np.ndarray:
            return ds[z0:z1]

        yield Source(url, _check_3d(url, ds.shape), np.dtype(ds.dtype), resolution, offset, read)


@contextmanager
def _npy_source(url: str, storage_options: Mapping[str, Any] | None) -> Iterator[Source]:
    if storage.is_local(url):
        try:
            arr = np.load(storage.local_path(url), mmap_mode="r", allow_pickle=False)
        except FileNotFoundError as e:
            raise StorageError(f"{storage.redact_url(url)!r} does not exist") from e
        except Exception as e:
            raise DataError(f"cannot read NumPy file {storage.redact_url(url)!r}: {type(e).__name__}: {e}") from e
        yield Source(url, _check_3d(url, arr.shape), arr.dtype, None, None, lambda z0, z1: np.array(arr[z0:z1]))
        return
    # Remote: parse the header, then read each slab by its byte range (C order only).
    with _open_binary(url, storage_options) as f:
        try:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(f)
        except Exception as e:
            raise DataError(f"cannot read NumPy file {storage.redact_url(url)!r}: {type(e).__name__}: {e}") from e
        if fortran:
            raise DataError(f"{storage.redact_url(url)!r} is Fortran-ordered; save it in C order to import it remotely")
        shape = _check_3d(url, shape)
        start = f.tell()
        plane = shape[1] * shape[2] * dtype.itemsize

        def read(z0: int, z1: int) -> np.ndarray:
            f.seek(start + z0 * plane)
            data = f.read((z1 - z0) * plane)
            return np.frombuffer(data, dtype).reshape(z1 - z0, shape[1], shape[2])

        yield Source(url, shape, dtype, None, None, read)


def open_source(url: str, storage_options: Mapping[str, Any] | None = None):
    """A context manager yielding the :class:`Source` for ``url`` (kind from its name)."""
    file_url, inner = _split_h5(url)
    lower = file_url.lower().rstrip("/")
    if inner is not None or lower.endswith(_H5_EXT):
        return _h5_source(url, storage_options)
    if lower.endswith(".npy"):
        return _npy_source(url, storage_options)
    if lower.endswith(_TIFF_EXT):
        return _tiff_stack_source(url, storage_options)
    fs, path = storage.get_fs(url, storage_options)
    if fs.isdir(path):
        return _tiff_folder_source(url, storage_options)
    if not fs.exists(path):
        raise StorageError(f"import source {storage.redact_url(url)!r} does not exist")
    raise ConfigError(
        f"import source {storage.redact_url(url)!r}: unknown kind; expected a folder of TIFF "
        "slices, a .tif/.tiff stack, FILE.h5:/dataset or a .npy file"
    )


# --- import ------------------------------------------------------------------------------


def import_volume(
    source: str,
    to: str,
    as_: str = "raw",
    *,
    resolution: Sequence[float] | None = None,
    offset: Sequence[float] | None = None,
    chunks: Sequence[int] = (64, 64, 64),
    overwrite: bool = False,
    zarr_format: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> str:
    """Copy ``source`` into the dataset ``to`` at the layout path of ``as_``; returns its URL.

    ``resolution`` and ``offset`` are nm (z, y, x) and override the source metadata;
    ``chunks`` is the Zarr chunk shape in voxels (its z also sets the slab thickness).
    """
    if as_ not in TARGETS:
        raise ConfigError(f"--as {as_!r}: expected one of {', '.join(TARGETS)}")
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) != 3 or any(c <= 0 for c in chunks):
        raise ConfigError(f"--chunks: expected 3 positive ints (z, y, x), got {list(chunks)}")
    if resolution is not None and (len(resolution) != 3 or any(r <= 0 for r in resolution)):
        raise ConfigError(f"--resolution: expected 3 positive values in nm (z, y, x), got {list(resolution)}")
    out_url = storage.join_url(to, TARGETS[as_])
    with open_source(source, storage_options) as src:
        res = tuple(float(r) for r in resolution) if resolution is not None else src.resolution
        if res is None:
            raise ConfigError(
                f"{storage.redact_url(source)!r} records no resolution; pass --resolution Z Y X (nm)"
            )
        off = tuple(float(o) for o in offset) if offset is not None else (src.offset or (0.0, 0.0, 0.0))
        dtype = src.dtype
        if as_ != "raw":
            if dtype == np.bool_:
                dtype = np.dtype(np.uint8)
            elif not np.issubdtype(dtype, np.integer):
                raise DataError(f"{storage.redact_url(source)!r} is {dtype}; --as {as_} needs integer ids")
        elif dtype != np.uint8:
            log.warning("raw %s is %s, not uint8; the jobs normalise it by its dtype range", storage.redact_url(source), dtype)
        if not storage.exists(to, storage_options):
            import zarr

            # A new dataset gets its root group in the requested format (create_array
            # would otherwise make a format-3 root).
            zarr.open_group(store=storage._store(to, storage_options, read_only=False), mode="a", zarr_format=zarr_format or 3)
        chunk_shape = tuple(min(c, s) for c, s in zip(chunks, src.shape))
        arr = storage.create_array(
            out_url, src.shape, dtype, chunk_shape, overwrite=overwrite,
            attrs={**storage.spatial_attrs(res, off), "source": storage.redact_url(source)},
            storage_options=storage_options, zarr_format=zarr_format,
        )
        slabs = range(0, src.shape[0], chunk_shape[0])
        if progress:
            from tqdm import tqdm

            slabs = tqdm(slabs, desc=f"importing {as_}", unit="slab")
        for z0 in slabs:
            z1 = min(z0 + chunk_shape[0], src.shape[0])
            slab = np.asarray(src.read(z0, z1))
            if slab.shape != (z1 - z0, *src.shape[1:]):
                raise DataError(f"{storage.redact_url(source)!r}: slab z {z0}:{z1} has shape {list(slab.shape)}")
            arr[z0:z1] = slab.astype(dtype, copy=False)
    return out_url


# --- export ------------------------------------------------------------------------------


def _free_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux
        return None


def export_tiff(
    array_url: str,
    out_url: str,
    *,
    max_bytes: int | None = None,
    ids: str = "uint16",
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write the Zarr array at ``array_url`` as an ImageJ hyperstack with its resolution/offset (nm).

    ``ids`` says how integers beyond uint16 are written: ``uint16`` refuses them (the
    error names the option), ``float32`` writes them as floats, exact up to 2^24 (see
    :func:`catena_mito.imagej.to_imagej`; ids are never renumbered). The TIFF is
    assembled in memory (about twice the volume), so a volume larger than ``max_bytes``
    — default: a quarter of the free memory — is refused before anything is read.
    Nothing is written when the volume is refused.
    """
    if ids not in ID_MODES:
        raise ConfigError(f"--ids {ids!r}: expected one of {', '.join(ID_MODES)}")
    arr = storage.open_volume(array_url, storage_options)
    nbytes = int(np.prod(arr.shape)) * arr.dtype.itemsize
    if max_bytes is None:
        free = _free_memory_bytes()
        max_bytes = free // 4 if free else 4 << 30
    if nbytes > max_bytes:
        raise DataError(
            f"{storage.redact_url(array_url)!r} is {nbytes / 2**30:.2f} GiB ({list(arr.shape)} {arr.dtype}), "
            f"more than the {max_bytes / 2**30:.2f} GiB a TIFF export may hold in memory; "
            "keep it in Zarr (napari/neuroglancer read it directly) or raise --max-gib"
        )
    resolution, offset = storage.read_spatial(arr)
    volume = to_imagej(np.asarray(arr[...]), ids, f"{storage.redact_url(array_url)!r}")
    storage.write_tiff(out_url, volume, resolution, offset, storage_options)
    return out_url
