"""preview: PNGs exist with the expected sizes, colours are deterministic, outlines sit on borders."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from catena_mito import storage
from catena_mito.errors import DataError
from catena_mito.preview import FILL_ALPHA, boundaries, id_colours, preview

SHAPE = (6, 20, 30)  # z, y, x; resolution 16 x 4 x 8 nm


@pytest.fixture
def dataset(tmp_path):
    url = str(tmp_path / "p.zarr")
    attrs = storage.spatial_attrs((16.0, 4.0, 8.0))
    raw = np.full(SHAPE, 100, np.uint8)
    prob = np.zeros(SHAPE, np.float32)
    prob[:, 5:15, 10:20] = 1.0
    inst = np.zeros(SHAPE, np.uint32)
    inst[:, 5:15, 10:20] = 7  # one box, y 5..14, x 10..19
    inst[:, 0:3, 0:3] = 123456789  # one touching the corner
    for path, data in ((storage.RAW_PATH, raw), (storage.prediction_path("mito"), prob), (storage.INSTANCES_PATH, inst)):
        storage.create_array(storage.join_url(url, path), SHAPE, data.dtype, (3, 10, 10), attrs=attrs)[...] = data
    return url


def _load(url):
    data = storage.read_bytes(url)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture
def native_size(monkeypatch):
    """Previews at one pixel per voxel, so pixel positions are voxel positions."""
    import catena_mito.preview as module

    monkeypatch.setattr(module, "MIN_PREVIEW_SIDE", 1)


def test_small_planes_are_enlarged_by_whole_pixels(dataset, tmp_path):
    import catena_mito.preview as module

    out = str(tmp_path / "big") + "/"
    preview(dataset, out, z=[1], orthogonal=False)
    image = np.asarray(_load(out + "z00001_raw.png"))
    factor = -(-module.MIN_PREVIEW_SIDE // 20)
    assert image.shape == (20 * factor, 30 * factor)
    small = image[::factor, ::factor]
    np.testing.assert_array_equal(np.repeat(np.repeat(small, factor, 0), factor, 1), image)


def test_files_sizes_and_outlines(dataset, tmp_path, native_size):
    out = str(tmp_path / "prev") + "/"
    urls = preview(dataset, out, z=[1, 4])
    names = sorted(u[len(out):] for u in urls)
    expected = sorted(f"{p}_{k}.png" for p in ("z00001", "z00004", "yz", "xz") for k in ("raw", "prob", "instances"))
    assert names == expected
    for name in names:
        image = _load(out + name)
        if name.startswith("z"):
            assert image.size == (30, 20)  # (width x, height y)
        elif name.startswith("yz"):
            assert image.size == (20, 6 * 4)  # width y; z stretched by 16/4
        else:
            assert image.size == (30, 6 * 2)  # width x; z stretched by 16/8
    assert _load(out + "z00001_raw.png").mode == "L"
    prob = np.asarray(_load(out + "z00001_prob.png"))
    assert prob[10, 15] == 255 and prob[0, 29] == 0

    inst = np.asarray(_load(out + "z00001_instances.png"))
    assert inst.shape == (20, 30, 3)
    colour = id_colours(np.array([7]))[0]
    border = [(5, 10), (5, 15), (14, 19), (10, 10), (10, 19)]
    for y, x in border:
        np.testing.assert_array_equal(inst[y, x], colour)
    tint = np.round((1 - FILL_ALPHA) * 100 + FILL_ALPHA * colour.astype(float))
    np.testing.assert_array_equal(inst[10, 15], tint)  # interior: tinted, not outlined
    np.testing.assert_array_equal(inst[18, 25], [100, 100, 100])  # background: raw
    # The corner object is outlined along the image edge too.
    np.testing.assert_array_equal(inst[0, 1], id_colours(np.array([123456789]))[0])


def test_colours_are_deterministic_and_distinct():
    ids = np.arange(0, 2000, dtype=np.uint64)
    a, b = id_colours(ids), id_colours(ids.copy())
    np.testing.assert_array_equal(a, b)
    assert (a[0] == 0).all()
    assert len({tuple(c) for c in a[1:]}) > 1900  # nearly all distinct
    # Bright enough to stand out on grey: the brightest channel is always 255.
    assert (a[1:].max(axis=1) == 255).all()
    # Stable across processes and versions: pinned values.
    assert id_colours(np.array([1, 2, 7])).tolist() == [[89, 255, 117], [36, 255, 44], [255, 131, 72]]


def test_boundaries():
    lab = np.zeros((5, 5), np.uint8)
    lab[1:4, 1:4] = 3
    edge = boundaries(lab)
    assert edge.sum() == 8 and not edge[2, 2] and edge[1, 1]


def test_defaults_and_errors(dataset, tmp_path):
    urls = preview(dataset, str(tmp_path / "m_"), orthogonal=False)
    assert [u.rsplit("/", 1)[1] for u in urls] == ["m_z00003_raw.png", "m_z00003_prob.png", "m_z00003_instances.png"]
    with pytest.raises(DataError, match="outside"):
        preview(dataset, str(tmp_path / "x_"), z=[6])
    with pytest.raises(DataError, match="nothing to preview"):
        preview(str(tmp_path / "empty.zarr"), str(tmp_path / "y_"))


def test_cli_preview_to_memory(dataset):
    from catena_mito.cli import main

    main(["preview", dataset, "--out", "memory://previews/a_", "--z", "2", "--z", "3"])
    for name in ("z00002_raw", "z00003_instances", "yz_prob", "xz_instances"):
        assert storage.exists(f"memory://previews/a_{name}.png")


def test_contour_prediction_beside_the_foreground_is_shown(dataset, tmp_path, native_size):
    contour = np.zeros(SHAPE, np.uint8)
    contour[:, 5, 10:20] = 255  # the box's top rim, as predict writes uint8 (p × 255)
    url = storage.join_url(dataset, storage.prediction_path("mito") + "_contour")
    storage.create_array(url, SHAPE, np.uint8, (3, 10, 10), attrs=storage.spatial_attrs((16.0, 4.0, 8.0)))[...] = contour
    out = str(tmp_path / "c_")
    urls = preview(dataset, out, z=[2], orthogonal=False)
    assert out + "z00002_contour.png" in urls
    np.testing.assert_array_equal(np.asarray(_load(out + "z00002_contour.png")), contour[2])
    # without a contour prediction there is no contour image
    other = str(tmp_path / "n_")
    assert not any(u.endswith("_contour.png") for u in preview(dataset, other, z=[2], orthogonal=False,
                                                    prediction=storage.join_url(dataset, storage.RAW_PATH)))
