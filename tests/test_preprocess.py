"""Preprocessing: fixed normalisation, whole-slice CLAHE, block-consistent resampling."""

from __future__ import annotations

import numpy as np
import pytest

from catena_mito.blockwise.geometry import BlockGrid, Roi
from catena_mito.errors import ConfigError, DataError
from catena_mito.preprocess import (
    GridMap,
    Preprocessor,
    clahe,
    normalize,
    preprocess_volume,
    resample,
    resample_labels,
    target_shape,
)


def test_normalize_by_dtype_not_by_statistics():
    u8 = np.array([0, 51, 255], np.uint8)
    np.testing.assert_allclose(normalize(u8), [0, 0.2, 1.0], rtol=1e-7)
    u16 = np.array([0, 65535], np.uint16)
    np.testing.assert_allclose(normalize(u16), [0, 1])
    i16 = np.array([-32768, 32767], np.int16)
    np.testing.assert_allclose(normalize(i16), [0, 1])
    f = np.array([-3.0, 7.5], np.float64)
    out = normalize(f)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [-3.0, 7.5])
    # a sub-block normalises exactly like the whole
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 256, (6, 7, 8), dtype=np.uint8)
    np.testing.assert_array_equal(normalize(vol)[1:3, 2:5], normalize(vol[1:3, 2:5]))
    with pytest.raises(DataError, match="dtype"):
        normalize(np.array(["a"]))


def test_clahe_is_per_slice_and_in_unit_range():
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 120, (3, 32, 40), dtype=np.uint8)
    out = clahe(vol)
    assert out.dtype == np.float32 and out.shape == vol.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(out[1], clahe(vol[1:2])[0])
    # constant slices stay defined
    const = np.full((2, 16, 16), 7, np.uint8)
    np.testing.assert_allclose(clahe(const), 7 / 255, rtol=1e-6)


@pytest.mark.parametrize("clahe_on", [False, True])
@pytest.mark.parametrize(
    "from_res,to_res", [((8, 8, 8), (8, 8, 8)), ((8, 4, 4), (8, 8, 8)), ((10, 6, 6), (8, 8, 8)), ((8, 8, 8), (20, 12, 5))]
)
def test_preprocessor_blocks_equal_whole_bitwise(clahe_on, from_res, to_res):
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (17, 23, 19), dtype=np.uint8)
    pre = Preprocessor(raw, from_res, to_res, clahe=clahe_on, cache_bytes=0)
    whole = preprocess_volume(raw, from_res, to_res, clahe=clahe_on)
    assert whole.shape == target_shape(raw.shape, from_res, to_res) == pre.shape
    for block in BlockGrid(pre.shape, (5, 6, 7)).blocks():
        np.testing.assert_array_equal(pre(block.write_roi), whole[block.write_roi.to_slices()])


def test_clahe_cache_gives_same_values():
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (9, 20, 20), dtype=np.uint8)
    cached = Preprocessor(raw, clahe=True)
    uncached = Preprocessor(raw, clahe=True, cache_bytes=0)
    for roi in [Roi((0, 0, 0), (5, 10, 10)), Roi((3, 5, 5), (6, 15, 15)), Roi((0, 0, 0), (9, 20, 20))]:
        np.testing.assert_array_equal(cached(roi), uncached(roi))


def test_target_shape_rounds():
    assert target_shape((100, 64, 64), (8, 4, 4), (24, 8, 8)) == (33, 32, 32)
    assert target_shape((3, 3, 3), (1, 1, 1), (100, 100, 100)) == (1, 1, 1)


def _reference_downsample(vol, from_res, to_res):
    """Oracle: scipy's Gaussian (nearest edges, truncate 4) per down-sampled axis, then the
    plain linear interpolation at c(i) = (i + 0.5) r - 0.5, written out independently."""
    from scipy.ndimage import gaussian_filter1d

    out = vol.astype(np.float64)
    for axis, (f, t) in enumerate(zip(from_res, to_res)):
        r = t / f
        if r > 1:
            out = gaussian_filter1d(out, (r - 1) / 2, axis=axis, mode="nearest", truncate=4.0)
        n = out.shape[axis]
        m = max(1, int(round(n / r)))
        c = np.clip((np.arange(m) + 0.5) * r - 0.5, 0, n - 1)
        lo = np.floor(c).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        shape = [1, 1, 1]
        shape[axis] = m
        w = (c - lo).reshape(shape)
        out = np.take(out, lo, axis=axis) * (1 - w) + np.take(out, hi, axis=axis) * w
    return out


@pytest.mark.parametrize("to_res", [(8, 8, 8), (8, 12, 12), (10, 13, 5)])
def test_downsampling_is_gaussian_low_pass_then_linear(to_res):
    rng = np.random.default_rng(4)
    vol = rng.random((9, 26, 22)).astype(np.float32)
    out = resample(vol, (8, 4, 4), to_res)
    np.testing.assert_allclose(out, _reference_downsample(vol, (8, 4, 4), to_res), rtol=0, atol=2e-6)


def test_antialiasing_removes_white_noise_aliasing():
    # 3x down-sampling puts every destination centre on a source voxel: without a low-pass
    # filter white noise would pass with std ~1.0; a 3x3x3 box mean leaves 1/sqrt(27) = 0.19.
    noise = np.random.default_rng(5).standard_normal((45, 45, 45)).astype(np.float32)
    std = float(resample(noise, (4, 4, 4), (12, 12, 12)).std())
    assert 0.12 < std < 0.19
    gm = GridMap.between((45, 45, 45), (4, 4, 4), (12, 12, 12))
    assert gm.filter_radius(1) == 4 and gm.filter_radius(1, order=0) == 0
    assert float(gm.antialias_taps(0).sum()) == pytest.approx(1.0, abs=1e-6)
    # up-sampling is not filtered: one tap, the plain interpolation of before
    assert GridMap.between((4, 4, 4), (8, 8, 8), (4, 4, 4)).antialias_taps(2).tolist() == [1.0]


@pytest.mark.parametrize("shape", [(3, 40, 37), (2, 3, 50)])
def test_antialiased_blocks_equal_whole_bitwise_with_filter_halo(shape):
    # Blocks near the volume edges and blocks smaller than the filter radius (4 voxels).
    raw = np.random.default_rng(6).integers(0, 256, shape, dtype=np.uint8)
    from_res, to_res = (8, 4, 4), (8, 12, 13)
    pre = Preprocessor(raw, from_res, to_res, cache_bytes=0)
    whole = preprocess_volume(raw, from_res, to_res)
    gm = pre.grid
    for block in BlockGrid(pre.shape, (1, 2, 3)).blocks():
        np.testing.assert_array_equal(pre(block.write_roi), whole[block.write_roi.to_slices()])
        need = gm.source_roi(block.write_roi)
        tight = gm.resample(normalize(raw[need.to_slices()]), need, block.write_roi)
        np.testing.assert_array_equal(tight, whole[block.write_roi.to_slices()])  # the halo suffices


def test_resampling_round_trip_of_smooth_volume():
    z, y, x = np.meshgrid(np.arange(12), np.arange(30), np.arange(30), indexing="ij")
    vol = (np.sin(y / 6.0) * np.cos(x / 7.0) + z / 12.0).astype(np.float32)
    up = resample(vol, (8, 8, 8), (8, 4, 4))
    assert up.shape == (12, 60, 60)
    back = resample(up, (8, 4, 4), (8, 8, 8), dst_shape=vol.shape)
    assert back.shape == vol.shape
    # linear up then pair-mean down: exact in the interior, small error at borders
    assert np.abs(back - vol)[:, 1:-1, 1:-1].max() < 0.02
    assert np.abs(back - vol).max() < 0.1


def test_labels_nearest_keep_dtype_and_values():
    labels = np.zeros((4, 8, 8), np.uint32)
    labels[:, 2:6, 2:6] = 7
    down = resample_labels(labels, (8, 4, 4), (8, 8, 8))
    assert down.dtype == np.uint32 and down.shape == (4, 4, 4)
    assert set(np.unique(down)) <= {0, 7}
    up = resample(labels, (8, 8, 8), (8, 4, 4), order=0)
    assert up.shape == (4, 16, 16) and set(np.unique(up)) <= {0, 7}


def test_gridmap_source_roi_and_identity():
    gm = GridMap.between((10, 10, 10), (8, 8, 8), (8, 16, 4))
    assert gm.dst_shape == (10, 5, 20)
    assert gm.is_identity(0) and not gm.is_identity(1)
    roi = gm.source_roi(Roi((2, 1, 3), (3, 2, 4)))
    assert roi.begin[0] == 2 and roi.end[0] == 5
    src = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    with pytest.raises(ValueError, match="does not contain"):
        gm.resample(src[:1], Roi((0, 0, 0), (1, 10, 10)), Roi((2, 1, 3), (3, 2, 4)))


def test_target_res_without_original_res_is_config_error():
    with pytest.raises(ConfigError, match="original_res"):
        Preprocessor(np.zeros((4, 4, 4), np.uint8), None, (8, 8, 8))
    with pytest.raises(DataError, match="3 \\(z, y, x\\)"):
        Preprocessor(np.zeros((4, 4), np.uint8))
