"""The OME-NGFF layout of every volume written through storage.create_array (catena_mito.ome):
validated with ome-zarr-models, read back with ome-zarr-py's reader (what napari-ome-zarr
uses), and older datasets (plain arrays at the layout paths) still read and written."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zarr

from catena_mito import storage
from catena_mito.blockwise.identity import RUN_ATTR

RES, OFF = (8.0, 4.0, 4.0), (16.0, 0.0, 8.0)
LAYOUT = [
    (storage.RAW_PATH, np.uint8),
    (storage.LABEL_PATHS["mito"], np.uint32),
    (storage.INSTANCES_PATH, np.uint64),
    (storage.prediction_path("mito"), np.uint8),
    (storage.prediction_path("mito_contour"), np.float32),
]


def _write_layout(url: str, zarr_format: int):
    zarr.open_group(url, mode="w", zarr_format=zarr_format)  # root only; create_array makes the rest
    for i, (path, dtype) in enumerate(LAYOUT):
        arr = storage.create_array(storage.join_url(url, path), (6, 10, 12), dtype, (3, 5, 6),
                                   attrs=storage.spatial_attrs(RES, OFF), zarr_format=zarr_format)
        arr[...] = i


def _models(zarr_format: int):
    pytest.importorskip("ome_zarr_models")
    if zarr_format == 3:
        from ome_zarr_models.v05.image import Image
        from ome_zarr_models.v05.image_label import ImageLabel
    else:
        from ome_zarr_models.v04.image import Image
        from ome_zarr_models.v04.image_label import ImageLabel
    return Image, ImageLabel


def _nodes(url: str):
    """What napari-ome-zarr gets for ``url``: ome-zarr-py's reader nodes."""
    pytest.importorskip("ome_zarr")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    out = []
    for node in Reader(parse_url(url))():
        if node.load(Multiscales) is None:
            continue
        kind = "labels" if node.load(Label) is not None else "image"
        out.append((str(node.zarr.path).rstrip("/").split(".zarr")[-1].strip("/"), kind, node))
    return out


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_layout_validates_and_reads_as_napari_does(tmp_path, zarr_format):
    url = str(tmp_path / "d.zarr")
    _write_layout(url, zarr_format)
    Image, ImageLabel = _models(zarr_format)
    for path in ("", "volumes", storage.RAW_PATH, storage.prediction_path("mito"), storage.prediction_path("mito_contour")):
        Image.from_zarr(zarr.open_group(storage.join_url(url, path), mode="r"))
    for path in (storage.INSTANCES_PATH, storage.LABEL_PATHS["mito"]):
        ImageLabel.from_zarr(zarr.open_group(storage.join_url(url, path), mode="r"))
    labels = storage.open_group(storage.join_url(url, "volumes/labels")).attrs.asdict()
    listed = labels["ome"]["labels"] if zarr_format == 3 else labels["labels"]
    assert listed == ["mito_instances", "mito_ids"]  # predictions first, ground truth reachable

    # The dataset's image: raw, with every instance volume as a label layer.
    nodes = _nodes(storage.join_url(url, "volumes"))
    assert [(p, k) for p, k, _ in nodes] == [
        ("volumes", "image"), ("volumes/labels/mito_instances", "labels"), ("volumes/labels/mito_ids", "labels")]
    for _, _, node in nodes:
        scale, translation = node.metadata["coordinateTransformations"][0]
        assert scale["scale"] == list(RES) and translation["translation"] == list(OFF)
    assert np.asarray(nodes[1][2].data[0]).max() == 2  # the instances' own values
    # Each prediction opens as an image; an instance volume opened directly as labels.
    for i, name in ((3, "mito"), (4, "mito_contour")):
        ((path, kind, node),) = _nodes(storage.join_url(url, storage.prediction_path(name)))
        assert (path, kind) == (storage.prediction_path(name), "image")
        assert np.asarray(node.data[0]).min() == i
    direct = {p: k for p, k, _ in _nodes(storage.join_url(url, storage.INSTANCES_PATH))}
    assert direct[storage.INSTANCES_PATH] == "labels"
    # The layout URLs still name the volumes: their level 0.
    for i, (path, _) in enumerate(LAYOUT):
        arr = storage.open_volume(storage.join_url(url, path))
        assert str(arr.store_path).endswith(f"{path}/0") and int(arr[0, 0, 0]) == i
        assert arr.attrs["dimension_units"] == ["8 nm", "4 nm", "4 nm"]
        if zarr_format == 3:
            assert arr.metadata.dimension_names == ("z", "y", "x")
        else:
            assert arr.attrs["_ARRAY_DIMENSIONS"] == ["z", "y", "x"]
    # Groups that are not one volume stay groups (evaluate/preview tell datasets from arrays).
    for path in ("", "volumes", "volumes/labels"):
        assert not storage.array_exists(storage.join_url(url, path))


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_older_datasets_are_read_and_written_in_place(tmp_path, zarr_format):
    url = str(tmp_path / "old.zarr")
    root = zarr.open_group(url, mode="w", zarr_format=zarr_format)
    # What earlier versions wrote: plain arrays at the layout paths, described on hosts.
    raw = root.create_array("volumes/raw", shape=(4, 6, 6), chunks=(2, 3, 3), dtype="uint8")
    raw[...] = 7
    raw.attrs.update(storage.spatial_attrs(RES))
    gt = root.create_array("volumes/labels/mito_ids", shape=(4, 6, 6), chunks=(2, 3, 3), dtype="uint32")
    gt.attrs.update(storage.spatial_attrs(RES))
    root["volumes/labels"].attrs["multiscales"] = [{"datasets": [{"path": "mito_ids"}]}]
    assert int(storage.open_volume(storage.join_url(url, storage.RAW_PATH))[0, 0, 0]) == 7
    assert not storage.array_exists(storage.join_url(url, "volumes/labels"))
    # Rewriting an old volume keeps its plain array; a new one gets the OME layout.
    again = storage.create_array(storage.join_url(url, storage.RAW_PATH), (4, 6, 6), np.uint8, (2, 3, 3),
                                 attrs=storage.spatial_attrs(RES))
    assert str(again.store_path).endswith("volumes/raw") and int(again[0, 0, 0]) == 7
    new = storage.create_array(storage.join_url(url, storage.INSTANCES_PATH), (4, 6, 6), np.uint32, (2, 3, 3),
                               attrs=storage.spatial_attrs(RES))
    assert str(new.store_path).endswith("volumes/labels/mito_instances/0")
    assert str(storage.open_volume(storage.join_url(url, storage.INSTANCES_PATH)).store_path) == str(new.store_path)


def test_coarser_levels_go_when_level0_is_rewritten_by_another_run(tmp_path):
    url = str(tmp_path / "d.zarr")
    vol = storage.join_url(url, storage.prediction_path("mito"))
    attrs = {**storage.spatial_attrs(RES, OFF), RUN_ATTR: {"run_id": "a"}}
    storage.create_array(vol, (4, 8, 8), np.uint8, (2, 4, 4), attrs=attrs)
    storage.create_array(storage.join_url(vol, "1"), (4, 4, 4), np.uint8, (2, 4, 4))
    storage.write_volume_metadata(vol, [(1, 1, 1), (1, 2, 2)])
    assert storage.volume_levels(vol) == [(1, 1, 1), (1, 2, 2)]
    storage.create_array(vol, (4, 8, 8), np.uint8, (2, 4, 4), attrs=attrs)  # a shard of the same run
    assert storage.volume_levels(vol) == [(1, 1, 1), (1, 2, 2)]
    storage.create_array(vol, (4, 8, 8), np.uint8, (2, 4, 4), attrs={**attrs, RUN_ATTR: {"run_id": "b"}})
    assert storage.volume_levels(vol) == [(1, 1, 1)]
    assert not storage.exists(storage.join_url(vol, "1"))


def test_concurrent_writers_of_the_same_metadata(tmp_path):
    url = str(tmp_path / "d.zarr")
    storage.open_group(url, mode="a")
    errors = []

    def shard(path):
        try:
            for _ in range(3):
                storage.create_array(storage.join_url(url, path), (8, 8, 8), np.uint32, (4, 4, 4),
                                     attrs=storage.spatial_attrs((8, 8, 8)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    # two shards of each of two label volumes: both end up listed in the one labels group
    paths = [storage.INSTANCES_PATH, storage.LABEL_PATHS["mito"]] * 2
    threads = [threading.Thread(target=shard, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert storage.open_group(storage.join_url(url, "volumes/labels")).attrs["ome"]["labels"] == [
        "mito_instances", "mito_ids"]


def test_memory_store_and_standalone_array():
    url = "memory://ome-test.zarr"
    storage.open_group(url, mode="a")
    storage.create_array(storage.join_url(url, storage.RAW_PATH), (4, 4, 4), np.uint8, (2, 2, 2),
                         attrs=storage.spatial_attrs((5, 5, 5)))
    ms = storage.open_group(url).attrs["ome"]["multiscales"]
    assert ms[0]["datasets"][0]["path"] == "volumes/raw/0"
    # An array that is a store of its own has no group to describe it: it stays an array.
    arr = storage.create_array("memory://standalone", (4, 4, 4), np.uint8, (2, 2, 2),
                               attrs=storage.spatial_attrs((5, 5, 5)))
    assert arr.metadata.dimension_names == ("z", "y", "x")
    assert storage.open_volume("memory://standalone").shape == (4, 4, 4)


def test_synthetic_dataset_validates(tmp_path):
    from catena_mito.synthetic import write_synthetic_dataset

    url = str(tmp_path / "s.zarr")
    write_synthetic_dataset(url, shape=(16, 16, 16), seed=0, resolution=(8, 8, 8), chunks=(8, 8, 8))
    Image, ImageLabel = _models(3)
    for group_path in ("", "volumes", storage.RAW_PATH):
        Image.from_zarr(zarr.open_group(storage.join_url(url, group_path), mode="r"))
    for path in storage.LABEL_PATHS.values():
        ImageLabel.from_zarr(zarr.open_group(storage.join_url(url, path), mode="r"))
    assert storage.open_group(url).attrs["synthetic"]["seed"] == 0
