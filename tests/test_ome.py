"""OME-NGFF multiscale metadata on every volume written through storage.create_array."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zarr

from catena_mito import storage

LAYOUT = [
    (storage.RAW_PATH, np.uint8),
    (storage.LABEL_PATHS["mito"], np.uint32),
    (storage.INSTANCES_PATH, np.uint64),
    (storage.prediction_path("mito"), np.uint8),
]


def _write_layout(url: str, zarr_format: int, resolution=(8.0, 4.0, 4.0), offset=(16.0, 0.0, 8.0)):
    zarr.open_group(url, mode="w", zarr_format=zarr_format)  # root only; create_array makes the rest
    for path, dtype in LAYOUT:
        storage.create_array(
            storage.join_url(url, path), (6, 10, 12), dtype, (3, 5, 6),
            attrs=storage.spatial_attrs(resolution, offset), zarr_format=zarr_format,
        )


def _image_cls(zarr_format: int):
    pytest.importorskip("ome_zarr_models")
    if zarr_format == 3:
        from ome_zarr_models.v05.image import Image
    else:
        from ome_zarr_models.v04.image import Image
    return Image


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_layout_validates_as_ome_images(tmp_path, zarr_format):
    url = str(tmp_path / "d.zarr")
    _write_layout(url, zarr_format)
    Image = _image_cls(zarr_format)
    expected = {
        "": ["volumes/raw"],
        "volumes/labels": ["mito_ids", "mito_instances"],
        "volumes/predictions": ["mito"],
    }
    for group_path, paths in expected.items():
        image = Image.from_zarr(zarr.open_group(storage.join_url(url, group_path), mode="r"))
        assert [d.path for ms in image.datasets for d in ms] == paths
        for ms in image.ome_attributes.multiscales if zarr_format == 3 else image.attributes.multiscales:
            assert [a.name for a in ms.axes] == ["z", "y", "x"]
            assert {a.type for a in ms.axes} == {"space"}
            assert {a.unit for a in ms.axes} == {"nanometer"}
            scale, translation = ms.datasets[0].coordinateTransformations
            assert list(scale.scale) == [8.0, 4.0, 4.0]
            assert list(translation.translation) == [16.0, 0.0, 8.0]


def test_merge_keeps_other_attributes_and_is_idempotent(tmp_path):
    url = str(tmp_path / "d.zarr")
    root = storage.open_group(url, mode="a")
    root.attrs["keep_me"] = {"a": 1}
    labels = root.require_group("volumes").require_group("labels")
    labels.attrs["other"] = 5
    a = storage.join_url(url, storage.LABEL_PATHS["mito"])
    storage.create_array(a, (4, 4, 4), np.uint32, (2, 2, 2), attrs=storage.spatial_attrs((1, 2, 3)))
    group_url = storage.join_url(url, "volumes/labels")
    before = storage.read_bytes(storage.join_url(group_url, "zarr.json"))
    # Reopening (as every shard does) rewrites nothing.
    storage.create_array(a, (4, 4, 4), np.uint32, (2, 2, 2), attrs=storage.spatial_attrs((1, 2, 3)))
    assert storage.write_ome_metadata(a, (1, 2, 3)) == group_url
    assert storage.read_bytes(storage.join_url(group_url, "zarr.json")) == before
    attrs = storage.open_group(group_url).attrs.asdict()
    assert attrs["other"] == 5
    assert len(attrs["ome"]["multiscales"]) == 1
    assert storage.open_group(url).attrs["keep_me"] == {"a": 1}
    # A changed resolution replaces the entry in place.
    storage.write_ome_metadata(a, (4, 4, 4), (1, 1, 1))
    (entry,) = storage.open_group(group_url).attrs["ome"]["multiscales"]
    assert entry["datasets"][0]["coordinateTransformations"][0]["scale"] == [4.0, 4.0, 4.0]


def test_concurrent_writers_of_the_same_metadata(tmp_path):
    url = str(tmp_path / "d.zarr")
    storage.open_group(url, mode="a")
    a = storage.join_url(url, storage.prediction_path("mito"))
    storage.create_array(a, (8, 8, 8), np.uint8, (4, 4, 4), attrs=storage.spatial_attrs((8, 8, 8)))
    errors = []

    def shard():
        try:
            for _ in range(5):
                storage.create_array(a, (8, 8, 8), np.uint8, (4, 4, 4), attrs=storage.spatial_attrs((8, 8, 8)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=shard) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ms = storage.open_group(storage.join_url(url, "volumes/predictions")).attrs["ome"]["multiscales"]
    assert [m["datasets"][0]["path"] for m in ms] == ["mito"]


def test_memory_store_and_standalone_array():
    url = "memory://ome-test.zarr"
    storage.open_group(url, mode="a")
    storage.create_array(storage.join_url(url, storage.RAW_PATH), (4, 4, 4), np.uint8, (2, 2, 2),
                         attrs=storage.spatial_attrs((5, 5, 5)))
    ms = storage.open_group(url).attrs["ome"]["multiscales"]
    assert ms[0]["datasets"][0]["path"] == "volumes/raw"
    # An array that is a store of its own has no group above it: nothing to describe.
    assert storage.ome_host("memory://standalone") is None
    arr = storage.create_array("memory://standalone", (4, 4, 4), np.uint8, (2, 2, 2),
                               attrs=storage.spatial_attrs((5, 5, 5)))
    assert arr.metadata.dimension_names == ("z", "y", "x")


def test_ome_host_rule():
    assert storage.ome_host("s3://b/x.zarr/volumes/raw") == ("s3://b/x.zarr", "volumes/raw")
    assert storage.ome_host("/d/x.zarr/volumes/labels/mito_ids") == ("/d/x.zarr/volumes/labels", "mito_ids")
    assert storage.ome_host("/d/x.zarr/probs") == ("/d/x.zarr", "probs")


def test_synthetic_dataset_validates(tmp_path):
    from catena_mito.synthetic import write_synthetic_dataset

    url = str(tmp_path / "s.zarr")
    write_synthetic_dataset(url, shape=(16, 16, 16), seed=0, resolution=(8, 8, 8), chunks=(8, 8, 8))
    Image = _image_cls(3)
    for group_path in ("", "volumes/labels"):
        Image.from_zarr(zarr.open_group(storage.join_url(url, group_path), mode="r"))
