"""import / export: round trips for TIFF folders, TIFF stacks, HDF5 and NumPy."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import tifffile
import zarr

from catena_mito import storage
from catena_mito.convert import export_tiff, import_volume, natural_key
from catena_mito.errors import ConfigError, DataError

SHAPE = (11, 13, 9)  # odd sizes: slabs and chunks do not divide the volume


@pytest.fixture
def volume():
    return np.random.default_rng(1).integers(0, 255, SHAPE, dtype=np.uint8)


def _read(url):
    arr = storage.open_array(url)
    return np.asarray(arr[...]), storage.read_spatial(arr)


def test_natural_sort():
    names = ["s10.tif", "s2.tif", "S1.tif", "s100.tif"]
    assert sorted(names, key=natural_key) == ["S1.tif", "s2.tif", "s10.tif", "s100.tif"]


def test_tiff_folder(tmp_path, volume):
    folder = tmp_path / "slices"
    folder.mkdir()
    for z in range(SHAPE[0]):  # unpadded numbers: plain sorting would get them wrong
        tifffile.imwrite(folder / f"slice_{z}.tif", volume[z])
    (folder / "notes.txt").write_text("ignored")
    out = str(tmp_path / "d.zarr")
    url = import_volume(str(folder), out, "raw", resolution=(30, 4, 4), chunks=(4, 8, 8))
    assert url == storage.join_url(out, storage.RAW_PATH)
    data, (res, off) = _read(url)
    np.testing.assert_array_equal(data, volume)
    assert res == (30.0, 4.0, 4.0) and off == (0.0, 0.0, 0.0)
    assert storage.open_array(url).chunks == (4, 8, 8)
    # Without --resolution and without metadata, the import is refused.
    with pytest.raises(ConfigError, match="--resolution"):
        import_volume(str(folder), str(tmp_path / "e.zarr"), "raw")


def test_tiff_stack_with_our_metadata_and_export(tmp_path, volume):
    src = str(tmp_path / "v.zarr")
    arr = storage.create_array(storage.join_url(src, storage.RAW_PATH), SHAPE, np.uint8, (5, 5, 5),
                               attrs=storage.spatial_attrs((8, 6, 6), (80, 12, 0)))
    arr[...] = volume
    tif = str(tmp_path / "raw.tif")
    export_tiff(storage.join_url(src, storage.RAW_PATH), tif)
    with tifffile.TiffFile(tif) as t:
        assert len(t.pages) == SHAPE[0]
    url = import_volume(tif, str(tmp_path / "back.zarr"), "raw", chunks=(3, 13, 9))
    data, (res, off) = _read(url)
    np.testing.assert_array_equal(data, volume)
    assert res == (8.0, 6.0, 6.0) and off == (80.0, 12.0, 0.0)  # from the TIFF metadata


def test_imagej_tiff_resolution(tmp_path, volume):
    tif = tmp_path / "ij.tif"
    tifffile.imwrite(tif, volume, imagej=True, resolution=(1 / 0.004, 1 / 0.005),
                     metadata={"spacing": 0.03, "unit": "um", "axes": "ZYX"})
    url = import_volume(str(tif), str(tmp_path / "d.zarr"), "raw")
    data, (res, _) = _read(url)
    np.testing.assert_array_equal(data, volume)
    assert res == pytest.approx((30.0, 5.0, 4.0))


def test_hdf5_labels(tmp_path):
    labels = np.random.default_rng(2).integers(0, 5, SHAPE).astype(np.uint64)
    h5 = tmp_path / "cremi.hdf"
    with h5py.File(h5, "w") as f:
        ds = f.create_dataset("volumes/labels/mito", data=labels, chunks=(2, 13, 9))
        ds.attrs["resolution"] = (40.0, 4.0, 4.0)
        ds.attrs["offset"] = (400.0, 0.0, 0.0)
        f.create_dataset("other", data=np.zeros((2, 2)))
    out = str(tmp_path / "d.zarr")
    url = import_volume(f"{h5}:/volumes/labels/mito", out, "mito_ids", chunks=(4, 4, 4))
    assert url.endswith(storage.LABEL_PATHS["mito"])
    data, (res, off) = _read(url)
    np.testing.assert_array_equal(data, labels)
    assert data.dtype == np.uint64
    assert res == (40.0, 4.0, 4.0) and off == (400.0, 0.0, 0.0)
    # The only 3-D dataset is found without naming it.
    url2 = import_volume(str(h5), str(tmp_path / "e.zarr"), "neuron_ids")
    np.testing.assert_array_equal(_read(url2)[0], labels)
    with pytest.raises(DataError, match="no dataset"):
        import_volume(f"{h5}:/missing", str(tmp_path / "f.zarr"), "raw")
    # element_size_um (ilastik/Fiji) is read as micrometres.
    h5b = tmp_path / "ilastik.h5"
    with h5py.File(h5b, "w") as f:
        f.create_dataset("data", data=labels.astype(np.uint8)).attrs["element_size_um"] = (0.03, 0.004, 0.004)
    _, (res_b, _) = _read(import_volume(f"{h5b}:/data", str(tmp_path / "g.zarr"), "raw"))
    assert res_b == pytest.approx((30.0, 4.0, 4.0))


def test_npy_local_and_remote(tmp_path, volume):
    npy = tmp_path / "v.npy"
    np.save(npy, volume.astype(np.uint16))
    url = import_volume(str(npy), str(tmp_path / "d.zarr"), "raw", resolution=(8, 8, 8), chunks=(4, 4, 4))
    np.testing.assert_array_equal(_read(url)[0], volume)
    # Through fsspec (memory://), read by byte ranges.
    storage.write_bytes("memory://conv/v.npy", npy.read_bytes())
    url = import_volume("memory://conv/v.npy", "memory://conv/d.zarr", "raw", resolution=(8, 8, 8),
                        chunks=(4, 4, 4), zarr_format=2)
    data, (res, _) = _read(url)
    np.testing.assert_array_equal(data, volume)
    assert res == (8.0, 8.0, 8.0)
    assert zarr.open_group(store=storage._store("memory://conv/d.zarr", None, True), mode="r").metadata.zarr_format == 2


def test_refusals(tmp_path, volume):
    npy = tmp_path / "f.npy"
    np.save(npy, volume.astype(np.float32))
    with pytest.raises(DataError, match="integer ids"):
        import_volume(str(npy), str(tmp_path / "d.zarr"), "mito_ids", resolution=(1, 1, 1))
    with pytest.raises(ConfigError, match="--as"):
        import_volume(str(npy), str(tmp_path / "d.zarr"), "bogus", resolution=(1, 1, 1))
    np.save(tmp_path / "flat.npy", np.zeros((4, 4)))
    with pytest.raises(DataError, match="expected 3"):
        import_volume(str(tmp_path / "flat.npy"), str(tmp_path / "d.zarr"), "raw", resolution=(1, 1, 1))
    url = import_volume(str(npy), str(tmp_path / "d.zarr"), "raw", resolution=(1, 1, 1))
    with pytest.raises(DataError, match="GiB"):
        export_tiff(url, str(tmp_path / "x.tif"), max_bytes=100)
    assert not (tmp_path / "x.tif").exists()


def test_cli_import_export(tmp_path, volume):
    from catena_mito.cli import main

    npy = tmp_path / "v.npy"
    np.save(npy, volume)
    out = str(tmp_path / "c.zarr")
    main(["import", str(npy), "--to", out, "--as", "raw", "--resolution", "8", "4", "4", "--chunks", "4", "8", "8"])
    tif = str(tmp_path / "o.tif")
    main(["export", storage.join_url(out, storage.RAW_PATH), tif])
    np.testing.assert_array_equal(tifffile.imread(tif), volume)


# --- Fiji-ready export ------------------------------------------------------------------------


def _ids_dataset(tmp_path, ids, resolution=(30.0, 3.7, 4.1), offset=(60.0, 7.4, -8.2)):
    url = storage.join_url(str(tmp_path / "ids.zarr"), storage.INSTANCES_PATH)
    arr = storage.create_array(url, ids.shape, ids.dtype, (4, 8, 8), attrs=storage.spatial_attrs(resolution, offset))
    arr[...] = ids
    return url


def test_export_is_an_imagej_hyperstack_that_round_trips_its_calibration(tmp_path):
    ids = np.random.default_rng(2).integers(0, 65536, SHAPE, dtype=np.uint64).astype(np.uint32)
    ids.flat[0] = 65535  # the largest id uint16 holds
    tif = str(tmp_path / "ids.tif")
    export_tiff(_ids_dataset(tmp_path, ids), tif)
    with tifffile.TiffFile(tif) as t:
        assert t.is_imagej and t.series[0].dtype == np.uint16 and t.series[0].shape == SHAPE
        ij = t.imagej_metadata
        assert (ij["spacing"], ij["unit"], ij["slices"]) == (30.0, "nm", SHAPE[0])
        x_num, x_den = t.pages[0].tags["XResolution"].value
        assert x_den / x_num == 4.1  # pixels per nm as ImageJ reads it
        assert ij["xorigin"] == pytest.approx(2.0) and ij["zorigin"] == pytest.approx(-2.0)
        np.testing.assert_array_equal(t.asarray(), ids)
    # Both readers give back the calibration: import (a dataset) and read_tiff (label's input).
    url = import_volume(tif, str(tmp_path / "back.zarr"), "mito_instances", chunks=(4, 8, 8))
    data, (res, off) = _read(url)
    np.testing.assert_array_equal(data, ids)
    assert res == (30.0, 3.7, 4.1) and off == pytest.approx((60.0, 7.4, -8.2))
    data, meta = storage.read_tiff(tif)
    assert meta["resolution"] == [30.0, 3.7, 4.1] and meta["offset"] == pytest.approx([60.0, 7.4, -8.2])


def test_export_refuses_ids_beyond_uint16_unless_float32(tmp_path):
    from catena_mito.cli import main

    ids = np.zeros(SHAPE, np.uint64)
    ids[1, 2, 3], ids[4, 5, 6] = 70_000, 2**24  # float32 holds both exactly
    src = _ids_dataset(tmp_path, ids)
    tif = tmp_path / "big.tif"
    with pytest.raises(DataError, match=r"ids up to 16777216.*--ids float32"):
        export_tiff(src, str(tif))
    assert not tif.exists()
    main(["export", src, str(tif), "--ids", "float32"])
    with tifffile.TiffFile(tif) as t:
        assert t.is_imagej and t.series[0].dtype == np.float32
        np.testing.assert_array_equal(t.asarray().astype(np.uint64), ids)
    ids[0, 0, 0] = 2**24 + 1  # the first integer float32 would round
    with pytest.raises(DataError, match="more than any ImageJ pixel type"):
        export_tiff(_ids_dataset(tmp_path, ids), str(tmp_path / "no.tif"), ids="float32")
    assert not (tmp_path / "no.tif").exists()


def test_imagej_conversions_are_exact_or_refused():
    from catena_mito.imagej import to_imagej

    assert to_imagej(np.ones((1, 2, 2), bool)).dtype == np.uint8
    half = np.array([[[0.25, 1.0]]], np.float16)
    assert to_imagej(half).dtype == np.float32 and to_imagej(half).tolist() == half.tolist()
    with pytest.raises(DataError, match="negative"):
        to_imagej(np.array([[[-1, 2]]], np.int32))
