"""Tests of the synthetic FIB-SEM volumes (catena_mito.synthetic)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from catena_mito import storage
from catena_mito.errors import CatenaError, ConfigError, DataError
from catena_mito.synthetic import (
    SyntheticVolume,
    best_global_threshold_iou,
    generate_block,
    make_volume,
    write_synthetic_dataset,
)

KEYS = ("raw", "mito_ids", "neuron_ids")


def _render_tiled(vol: SyntheticVolume, block: tuple[int, int, int]) -> dict[str, np.ndarray]:
    out = {k: np.zeros(vol.shape, dtype=np.uint8 if k == "raw" else np.uint32) for k in KEYS}
    for z in range(0, vol.shape[0], block[0]):
        for y in range(0, vol.shape[1], block[1]):
            for x in range(0, vol.shape[2], block[2]):
                off = (z, y, x)
                shp = tuple(min(b, s - o) for b, s, o in zip(block, vol.shape, off))
                got = vol.render(off, shp)
                sl = tuple(slice(o, o + s) for o, s in zip(off, shp))
                for k in KEYS:
                    assert got[k].shape == shp
                    out[k][sl] = got[k]
    return out


@pytest.fixture(scope="module")
def odd_volume() -> dict[str, np.ndarray]:
    return make_volume((37, 70, 51), seed=3)


def test_dtypes_shapes_and_layout_of_labels(odd_volume):
    v = odd_volume
    assert v["raw"].dtype == np.uint8 and v["raw"].shape == (37, 70, 51)
    assert v["mito_ids"].dtype == np.uint32 and v["neuron_ids"].dtype == np.uint32
    assert v["neuron_ids"].min() >= 1  # every voxel belongs to a neuron
    assert len(np.unique(v["neuron_ids"])) >= 2
    assert (v["mito_ids"] > 0).any()
    # a mitochondrion lies inside one neuron
    mito, neuron = v["mito_ids"], v["neuron_ids"]
    for i in np.unique(mito[mito > 0]):
        assert len(np.unique(neuron[mito == i])) == 1


def test_block_shape_does_not_change_a_single_byte():
    vol = SyntheticVolume((37, 70, 51), seed=5, resolution=(8, 8, 8))
    whole = vol.render((0, 0, 0), vol.shape)
    for block in [(16, 32, 20), (13, 70, 7), (37, 9, 51)]:
        tiled = _render_tiled(vol, block)
        for k in KEYS:
            assert np.array_equal(whole[k], tiled[k]), (block, k)


def test_block_independence_with_anisotropic_voxels():
    vol = SyntheticVolume((24, 40, 40), seed=2, resolution=(30, 6, 6))
    whole = vol.render((0, 0, 0), vol.shape)
    tiled = _render_tiled(vol, (5, 17, 23))
    for k in KEYS:
        assert np.array_equal(whole[k], tiled[k]), k


def test_deterministic_per_seed_and_different_across_seeds():
    a = generate_block((3, 10, 5), (20, 24, 28), (40, 48, 48), seed=11)
    b = SyntheticVolume((40, 48, 48), seed=11).render((3, 10, 5), (20, 24, 28))
    c = generate_block((3, 10, 5), (20, 24, 28), (40, 48, 48), seed=12)
    for k in KEYS:
        assert np.array_equal(a[k], b[k]), k
    assert not np.array_equal(a["raw"], c["raw"])
    assert not np.array_equal(a["neuron_ids"], c["neuron_ids"])


def test_make_volume_matches_generate_block():
    v = make_volume((20, 30, 40), seed=4)
    part = generate_block((5, 6, 7), (10, 11, 12), (20, 30, 40), seed=4)
    for k in KEYS:
        assert np.array_equal(v[k][5:15, 6:17, 7:19], part[k]), k


@pytest.fixture(scope="module")
def medium_volume() -> dict[str, np.ndarray]:
    return make_volume((96, 96, 96), seed=0)


def test_best_global_threshold_iou_matches_brute_force():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(12, 13, 14), dtype=np.uint8)
    fg = (raw.astype(int) + rng.integers(-60, 60, size=raw.shape)) < 90
    iou, polarity, level = best_global_threshold_iou(raw, fg)
    brute = max(
        max(np.sum((raw <= t) & fg) / np.sum((raw <= t) | fg) for t in range(256)),
        max(np.sum((raw >= t) & fg) / np.sum((raw >= t) | fg) for t in range(256)),
    )
    assert iou == pytest.approx(brute)
    pred = raw <= level if polarity == "<=" else raw >= level
    assert np.sum(pred & fg) / np.sum(pred | fg) == pytest.approx(iou)


def test_global_threshold_cannot_segment_mitochondria(medium_volume):
    raw, fg = medium_volume["raw"], medium_volume["mito_ids"] > 0
    iou, polarity, level = best_global_threshold_iou(raw, fg)
    assert iou < 0.5, (iou, polarity, level)


def test_mitochondria_are_distinctive_and_plentiful(medium_volume):
    raw, mito = medium_volume["raw"], medium_volume["mito_ids"]
    fraction = np.mean(mito > 0)
    assert 0.04 <= fraction <= 0.18, fraction
    assert len(np.unique(mito)) - 1 >= 10
    # mitochondria are darker on average than what surrounds them, but overlap it
    inside, outside = raw[mito > 0].astype(float), raw[mito == 0].astype(float)
    assert inside.mean() + 20 < outside.mean()
    assert np.percentile(inside, 90) > np.percentile(outside, 10)
    # some mitochondria touch each other (face-adjacent voxels with different ids)
    touching = 0
    for ax in range(3):
        m = np.moveaxis(mito, ax, -1)
        a, b = m[..., :-1], m[..., 1:]
        touching += int(((a > 0) & (b > 0) & (a != b)).sum())
    assert touching > 0


def test_mitochondria_do_not_pass_through_each_other():
    """Each id away from the volume's faces is one 26-connected object, so a perfect
    instance method can recover it; touching pairs stay (touching, not interpenetrating)."""
    import cc3d

    for seed in (0, 1):
        mito = make_volume((128, 128, 128), seed=seed)["mito_ids"]
        inner = np.zeros_like(mito, dtype=bool)
        inner[1:-1, 1:-1, 1:-1] = True
        on_face = np.unique(mito[~inner])
        pieces = cc3d.connected_components(mito, connectivity=26)  # splits at id changes
        ids = np.setdiff1d(np.unique(mito), np.append(on_face, 0))
        assert len(ids) >= 10
        per_id = {int(i): len(np.unique(pieces[mito == i])) for i in ids}
        assert all(n == 1 for n in per_id.values()), {i: n for i, n in per_id.items() if n > 1}


def test_elongated_mitochondria(medium_volume):
    mito = medium_volume["mito_ids"]
    ids, counts = np.unique(mito[mito > 0], return_counts=True)
    elongations = []
    for i in ids[counts > 300]:
        pts = np.argwhere(mito == i).astype(float)
        ev = np.sort(np.linalg.eigvalsh(np.cov(pts.T)))
        elongations.append(np.sqrt(ev[-1] / ev[0]))
    assert np.median(elongations) > 1.8


def test_write_dataset_local_and_memory(tmp_path):
    url = write_synthetic_dataset(
        str(tmp_path / "s.zarr"),
        shape=(20, 33, 18),
        seed=1,
        resolution=(10, 8, 8),
        chunks=(8, 16, 16),
    )
    raw = storage.open_volume(storage.join_url(url, storage.RAW_PATH))  # level 0 of its multiscale group
    assert raw.dtype == np.uint8 and raw.shape == (20, 33, 18) and raw.chunks == (8, 16, 16)
    assert list(raw.attrs["resolution"]) == [10, 8, 8]
    assert list(raw.attrs["offset"]) == [0, 0, 0]
    mito = storage.open_volume(storage.join_url(url, storage.LABEL_PATHS["mito"]))
    neuron = storage.open_volume(storage.join_url(url, storage.LABEL_PATHS["neuron"]))
    assert mito.dtype == np.uint32 and neuron.dtype == np.uint32
    expected = make_volume((20, 33, 18), seed=1, resolution=(10, 8, 8))
    assert np.array_equal(raw[:], expected["raw"])
    assert np.array_equal(mito[:], expected["mito_ids"])
    assert np.array_equal(neuron[:], expected["neuron_ids"])

    mem = write_synthetic_dataset(
        "memory://synthetic-test.zarr", shape=(16, 16, 16), seed=1, progress=True
    )
    raw = storage.open_volume(storage.join_url(mem, storage.RAW_PATH))
    assert raw.shape == (16, 16, 16)
    assert np.array_equal(raw[:], make_volume((16, 16, 16), seed=1)["raw"])


def test_write_dataset_zarr_v2(tmp_path):
    url = write_synthetic_dataset(
        str(tmp_path / "v2.zarr"), shape=(10, 12, 14), chunks=(5, 6, 7), zarr_format=2
    )
    root = zarr.open_group(url, mode="r")
    assert root.metadata.zarr_format == 2
    assert storage.open_volume(storage.join_url(url, storage.RAW_PATH)).shape == (10, 12, 14)


@pytest.mark.parametrize(
    "shape",
    [(0, 10, 10), (10, -1, 10), (10, 10), (10, 10, 10, 10), (10.5, 10, 10), "abc"],
)
def test_bad_shapes_are_clear_errors(shape):
    with pytest.raises(DataError, match="shape"):
        SyntheticVolume(shape)
    with pytest.raises(DataError, match="shape"):
        make_volume(shape)


def test_bad_parameters_are_clear_errors():
    with pytest.raises(ConfigError, match="resolution"):
        SyntheticVolume((8, 8, 8), resolution=(8, 0, 8))
    with pytest.raises(ConfigError, match="seed"):
        SyntheticVolume((8, 8, 8), seed=-1)
    vol = SyntheticVolume((8, 8, 8))
    with pytest.raises(DataError, match="roi"):
        vol.render((4, 0, 0), (8, 8, 8))
    with pytest.raises(DataError, match="roi_shape"):
        vol.render((0, 0, 0), (0, 8, 8))
    with pytest.raises(CatenaError, match="chunks"):
        write_synthetic_dataset("memory://bad-chunks.zarr", shape=(8, 8, 8), chunks=(0, 8, 8))
    with pytest.raises(ConfigError, match="zarr_format"):
        write_synthetic_dataset("memory://bad-format.zarr", shape=(8, 8, 8), zarr_format=4)
