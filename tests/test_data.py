"""Training data: patch grid, targets, selection, sampling, augmentation, read-once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from catena_mito import data, storage
from catena_mito.data import (
    Augmenter,
    EpochSampler,
    PatchDataset,
    PatchRef,
    TrainingVolume,
    VolumeCache,
    binary_target,
    neuron_boundaries,
    patch_starts,
    plan_patches,
    read_training_volume,
)
from catena_mito.errors import DataError, StorageError


def _write_dataset(url: str, raw: np.ndarray, mito: np.ndarray, neuron: np.ndarray | None = None,
                   resolution=(8.0, 8.0, 8.0), chunks=(8, 8, 8)) -> str:
    attrs = storage.spatial_attrs(resolution) if resolution is not None else None
    storage.open_group(url, mode="a").require_group("volumes").require_group("labels")
    arrays = {storage.RAW_PATH: raw, storage.LABEL_PATHS["mito"]: mito}
    if neuron is not None:
        arrays[storage.LABEL_PATHS["neuron"]] = neuron
    for path, arr in arrays.items():
        out = storage.create_array(storage.join_url(url, path), arr.shape, arr.dtype, chunks, attrs=attrs)
        out[...] = arr
    return url


def _volume(shape=(16, 16, 16), label=None) -> TrainingVolume:
    raw = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    lab = np.zeros(shape, np.uint8) if label is None else label
    return TrainingVolume(url="mem", raw=raw, label=lab, resolution=(8.0, 8.0, 8.0))


# --- patch grid -----------------------------------------------------------------------------


def test_patch_starts_cover_far_edge_flush():
    starts = patch_starts((100, 64, 40), (32, 32, 32), (32, 16, 32))
    zs = sorted({s[0] for s in starts})
    ys = sorted({s[1] for s in starts})
    xs = sorted({s[2] for s in starts})
    assert zs == [0, 32, 64, 68]  # last one flush: 68 + 32 = 100
    assert ys == [0, 16, 32]  # exact fit: no duplicate
    assert xs == [0, 8]
    assert len(starts) == 4 * 3 * 2
    covered = np.zeros((100, 64, 40), bool)
    for z, y, x in starts:
        covered[z:z + 32, y:y + 32, x:x + 32] = True
    assert covered.all()


def test_patch_starts_single_patch_and_too_small():
    assert patch_starts((32, 32, 32), 32, 16) == [(0, 0, 0)]
    with pytest.raises(DataError, match="smaller than patch_size"):
        patch_starts((20, 64, 64), 32, 16)


# --- targets --------------------------------------------------------------------------------


def test_neuron_boundaries_are_six_connected_interfaces():
    ids = np.ones((4, 6, 6), np.uint32)
    ids[:, :, 3:] = 2
    b = neuron_boundaries(ids)
    assert b.dtype == np.uint8
    expected = np.zeros_like(b)
    expected[:, :, 2:4] = 1  # both sides of the interface
    np.testing.assert_array_equal(b, expected)
    # a diagonal-only contact is not a boundary
    d = np.zeros((1, 2, 2), np.uint32)
    d[0, 0, 0] = d[0, 1, 1] = 5
    d[0, 0, 1] = d[0, 1, 0] = 5
    assert neuron_boundaries(d).sum() == 0


def test_binary_target():
    ids = np.array([[[0, 3, 7]]], np.uint32)
    np.testing.assert_array_equal(binary_target(ids, "mito"), [[[0, 1, 1]]])
    np.testing.assert_array_equal(binary_target(ids, "neuron"), [[[1, 1, 1]]])


# --- selection ------------------------------------------------------------------------------


def test_plan_patches_balance_and_subsample():
    label = np.zeros((32, 32, 32), np.uint8)
    label[:8, :8, :8] = 1  # 512 foreground voxels in one corner
    vols = [_volume((32, 32, 32), label), _volume((32, 32, 32))]
    everything = plan_patches(vols, 16, 8)
    assert len(everything) == 2 * 27
    balanced = plan_patches(vols, 16, 8, balance_patches=True, min_positive_pixels=100)
    assert balanced == [PatchRef(0, (0, 0, 0))]
    # one foreground voxel suffices with the default threshold: every patch touching the cube
    touching = plan_patches(vols, 16, 8, balance_patches=True)
    assert {r.start for r in touching} == {(0, 0, 0)} | {
        s for s in patch_starts((32,) * 3, 16, 8) if all(c < 8 for c in s)
    }
    with pytest.raises(DataError, match="min_positive_pixels"):
        plan_patches(vols, 16, 8, balance_patches=True, min_positive_pixels=10_000)

    half = plan_patches(vols, 16, 8, subsample_frac=0.5, subsample_seed=3)
    assert len(half) == 27 and half == sorted(half, key=lambda r: (r.volume, r.start))
    assert half == plan_patches(vols, 16, 8, subsample_frac=0.5, subsample_seed=3)
    assert half != plan_patches(vols, 16, 8, subsample_frac=0.5, subsample_seed=4)
    assert set(map(tuple, [(r.volume, r.start) for r in half])) <= {(r.volume, r.start) for r in everything}
    assert len(plan_patches(vols, 16, 8, subsample_frac=0.5, subsample_number=5)) == 5
    assert len(plan_patches(vols, 16, 8, subsample_number=100)) == 54


# --- sampling -------------------------------------------------------------------------------


def test_epoch_sampler_one_pass_split_between_ranks():
    n = 11
    single = EpochSampler(n, seed=1)
    single.set_epoch(0)
    keys = list(single)
    assert len(keys) == len(single) == n
    assert sorted(k[2] for k in keys) == list(range(n))  # every patch once
    assert [k[1] for k in keys] == list(range(n))
    single.set_epoch(1)
    assert [k[2] for k in single] != [k[2] for k in keys]  # a fresh order each epoch

    ranks = [EpochSampler(n, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(0)
    parts = [list(s) for s in ranks]
    assert len(parts[0]) == len(parts[1]) == 6  # padded to equal length
    draws = sorted(k[1] for p in parts for k in p)
    assert draws == list(range(12))  # disjoint draws
    assert {k[2] for p in parts for k in p} == set(range(n))


def test_epoch_sampler_steps_per_epoch_cycles():
    s = EpochSampler(3, seed=0, draws_per_rank=8)
    s.set_epoch(2)
    keys = list(s)
    assert len(keys) == 8
    assert sorted(k[2] for k in keys[:3]) == [0, 1, 2]
    assert sorted(k[2] for k in keys[3:6]) == [0, 1, 2]
    assert all(k[0] == 2 for k in keys)


# --- augmentation ---------------------------------------------------------------------------


def test_rotation_augs_keep_image_and_label_aligned():
    rng = np.random.default_rng(0)
    label = (rng.random((8, 12, 12)) > 0.5).astype(np.uint8)
    aug = Augmenter(rotation=True, contrast=False)
    seen = set()
    for i in range(20):
        image, lab = aug(label.astype(np.float32), label, np.random.default_rng(i))
        np.testing.assert_array_equal(image, lab)
        assert image.flags.c_contiguous and image.dtype == np.float32
        seen.add(lab.tobytes())
    assert len(seen) > 5  # it does transform
    # a patch that is not square in (y, x) keeps its shape (only 180° rotations)
    image, lab = aug(np.zeros((4, 8, 12), np.float32), np.zeros((4, 8, 12), np.uint8), np.random.default_rng(1))
    assert image.shape == lab.shape == (4, 8, 12)


def test_contrast_augs_change_image_only_and_are_reproducible():
    aug = Augmenter(rotation=False, contrast=True)
    image = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    label = (image > 0.5).astype(np.uint8)
    outs = [aug(image, label, np.random.default_rng(s)) for s in (7, 7, 8)]
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], label)
    changed = [not np.array_equal(aug(image, label, np.random.default_rng(s))[0], image) for s in range(10)]
    assert any(changed)
    assert outs[0][0].dtype == np.float32 and isinstance(outs[0][0], np.ndarray)


def test_patch_dataset_items():
    vol = _volume((16, 16, 16))
    ds = PatchDataset([vol], [PatchRef(0, (8, 0, 4))], (8, 8, 8), Augmenter(False, False))
    image, label = ds[(0, 0, 0)]
    assert image.shape == label.shape == (1, 8, 8, 8)
    assert image.dtype == torch.float32 and label.dtype == torch.uint8
    np.testing.assert_array_equal(image[0].numpy(), vol.raw[8:16, 0:8, 4:12])
    # the same key gives the same augmented patch
    ds_aug = PatchDataset([vol], [PatchRef(0, (0, 0, 0))], (8, 8, 8), Augmenter(True, True), seed=5)
    a, b = ds_aug[(3, 4, 0)], ds_aug[(3, 4, 0)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --- reading --------------------------------------------------------------------------------


def test_read_training_volume_labels_and_resampling(tmp_path):
    raw = np.full((8, 16, 16), 255, np.uint8)
    mito = np.zeros((8, 16, 16), np.uint32)
    mito[2:6, 4:12, 4:12] = 9
    neuron = np.ones((8, 16, 16), np.uint32)
    neuron[:, :, 8:] = 2
    url = _write_dataset(str(tmp_path / "a.zarr"), raw, mito, neuron, resolution=(16.0, 8.0, 8.0))

    vol = read_training_volume(url, "mito")
    assert vol.raw.dtype == np.float32 and vol.raw.max() == pytest.approx(1.0)
    assert vol.resolution == (16.0, 8.0, 8.0)
    np.testing.assert_array_equal(vol.label, (mito > 0).astype(np.uint8))
    np.testing.assert_array_equal(read_training_volume(url, "neuron").label, neuron_boundaries(neuron))

    # target_res: raw and labels resampled onto the same grid (original_res from the attribute)
    iso = read_training_volume(url, "mito", target_res=(8.0, 8.0, 8.0))
    assert iso.raw.shape == iso.label.shape == (16, 16, 16)
    assert iso.resolution == (8.0, 8.0, 8.0)
    assert iso.label.sum() == 2 * mito.astype(bool).sum()
    # an explicit original_res wins over the attribute
    assert read_training_volume(url, "mito", original_res=(8, 8, 8), target_res=(16, 16, 16)).raw.shape == (4, 8, 8)


def test_read_training_volume_errors(tmp_path):
    raw = np.zeros((8, 8, 8), np.uint8)
    url = _write_dataset(str(tmp_path / "nores.zarr"), raw, np.zeros((8, 8, 8), np.uint32), resolution=None)
    with pytest.raises(DataError, match="original_res"):
        read_training_volume(url, "mito", target_res=(4, 4, 4))
    with pytest.raises(StorageError, match="neuron_ids"):
        read_training_volume(url, "neuron")
    bad = _write_dataset(str(tmp_path / "bad.zarr"), raw, np.zeros((8, 8, 4), np.uint32))
    with pytest.raises(DataError, match="must match"):
        read_training_volume(bad, "mito")


def test_volume_cache_reads_each_chunk_once(monkeypatch):
    """From object storage (memory:// here) every chunk is fetched once per run."""
    rng = np.random.default_rng(0)
    url = _write_dataset(
        "memory://cache-test/a.zarr", rng.integers(0, 255, (16, 16, 16), dtype=np.uint8),
        (rng.random((16, 16, 16)) > 0.7).astype(np.uint32),
    )
    gets: list[tuple[str, str]] = []
    original = zarr.storage.FsspecStore.get

    async def counting_get(self, key, *args, **kwargs):
        gets.append((self.path, key))
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.FsspecStore, "get", counting_get)
    cache = VolumeCache("mito")
    first = cache.get(url)
    # patches, epochs and the validation list reuse the same in-memory volume
    for _ in range(5):
        assert cache.get(url) is first
        assert cache.get(url + "/") is first
    vols = [cache.get(url)]
    ds = PatchDataset(vols, plan_patches(vols, 8, 4), 8, Augmenter(True, True))
    for i in range(len(ds)):
        ds[(0, i, i)]
    # chunk keys of level 0 inside each volume's multiscale group (plain arrays: "c/...")
    chunk_gets = [(p, k) for p, k in gets if k.startswith(("c/", "0/c/"))]
    assert cache.reads == 1
    assert len(chunk_gets) == len(set(chunk_gets)) == 2 * 8  # raw + labels, 2×2×2 chunks each
    storage.remove("memory://cache-test")


def test_read_whole_is_the_only_reader(monkeypatch, tmp_path):
    calls = []
    original = data._read_whole
    monkeypatch.setattr(data, "_read_whole", lambda arr: calls.append(arr.shape) or original(arr))
    url = _write_dataset(str(tmp_path / "c.zarr"), np.zeros((8, 8, 8), np.uint8), np.zeros((8, 8, 8), np.uint32))
    VolumeCache("mito").get(url)
    assert len(calls) == 2


# --- balance with negatives kept, EM augmentations -------------------------------------------


def test_balance_keeps_negative_patches_at_their_weight():
    label = np.zeros((32, 32, 32), np.uint8)
    label[:8, :8, :8] = 1
    vols = [_volume((32, 32, 32), label), _volume((32, 32, 32))]
    refs = plan_patches(vols, 16, 8, balance_patches=True, min_positive_pixels=100, negative_patch_weight=0.25)
    assert len(refs) == 54  # nothing dropped
    positive = [r for r in refs if r.weight == 1.0]
    assert [(r.volume, r.start) for r in positive] == [(0, (0, 0, 0))]
    assert all(r.weight == 0.25 for r in refs if r not in positive)
    # weighted draws: the positive patch gets 1 / (1 + 53 · 0.25) of them
    sampler = EpochSampler(len(refs), seed=0, draws_per_rank=20_000, weights=[r.weight for r in refs])
    sampler.set_epoch(0)
    drawn = np.array([k[2] for k in sampler])
    share = np.mean(drawn == refs.index(positive[0]))
    assert share == pytest.approx(1 / (1 + 53 * 0.25), rel=0.1)
    first = [k for k in sampler]
    assert [k for k in sampler] == first  # reproducible from (seed, epoch)
    sampler.set_epoch(1)
    assert [k for k in sampler] != first
    # equal weights keep the exact one-pass permutation
    flat = EpochSampler(5, seed=0, weights=[1.0] * 5)
    flat.set_epoch(0)
    assert sorted(k[2] for k in flat) == list(range(5))


def _patch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.random((8, 24, 24)).astype(np.float32)
    label = np.zeros((8, 24, 24), np.uint8)
    label[:, 6:14, 6:14] = 1
    return image, label


@pytest.mark.parametrize("name", ["missing_section", "misalignment", "blur", "elastic"])
def test_em_augmentations(name):
    image, label = _patch()
    aug = Augmenter(False, False, **{name: 1.0})
    out, lab = aug(image, label, np.random.default_rng(3))
    again = aug(image, label, np.random.default_rng(3))
    np.testing.assert_array_equal(out, again[0])  # reproducible from the draw's generator
    assert out.shape == image.shape and out.dtype == np.float32 and lab.dtype == np.uint8
    assert not np.array_equal(out, image)
    if name in ("missing_section", "blur"):
        np.testing.assert_array_equal(lab, label)  # image only
    if name == "missing_section":
        flat = [z for z in range(8) if np.all(out[z] == out[z].flat[0])]
        assert 1 <= len(flat) <= 2
    if name == "misalignment":
        shifted = [aug(image, label, np.random.default_rng(s))[1] for s in range(10)]
        assert any(not np.array_equal(s_, label) for s_ in shifted)
        assert all(set(np.unique(s_)) <= {0, 1} for s_ in shifted)
    if name == "elastic":
        assert set(np.unique(lab)) <= {0, 1} and abs(int(lab.sum()) - int(label.sum())) < 0.4 * label.sum()
        # image and label move together: warp the label as an image
        warped, warped_label = aug(label.astype(np.float32), label, np.random.default_rng(3))
        assert np.mean((warped > 0.5) == (warped_label > 0)) > 0.97
    # probability 0 draws nothing: the random stream of older versions is unchanged
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    Augmenter(True, False)(image, label, rng_a)
    Augmenter(True, False, **{name: 0.0})(image, label, rng_b)
    assert rng_a.random() == rng_b.random()
