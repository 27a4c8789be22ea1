"""Sliding-window inference: window grid, blending, block independence, TTA, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catena_mito.blockwise.geometry import BlockGrid, Roi
from catena_mito.errors import ConfigError, DataError
from catena_mito.inference import (
    MIN_WEIGHT,
    ModelRunner,
    WindowGrid,
    importance_map,
    predict_block,
    predict_region,
    sliding_window_predict,
    window_starts,
)


class SigmoidOfInput(torch.nn.Module):
    """Logits (−x, x): softmax channel 1 is sigmoid(2x), a known, purely local output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x, x], dim=1)


def tiny_conv(seed: int = 0) -> torch.nn.Module:
    """A non-local (3×3×3) deterministic model with 2 output channels."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 3, padding=1)
    ).eval()


@pytest.mark.parametrize(
    "size,patch,stride,expected",
    [(10, 4, 3, [0, 3, 6]), (11, 4, 3, [0, 3, 6, 7]), (4, 4, 2, [0]), (5, 4, 4, [0, 1]), (8, 4, 2, [0, 2, 4])],
)
def test_window_starts_cover_and_flush(size, patch, stride, expected):
    starts = window_starts(size, patch, stride)
    assert starts == expected
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + patch] = True
        assert s >= 0 and s + patch <= size
    assert covered.all()


def test_volume_smaller_than_patch_is_a_data_error():
    with pytest.raises(DataError, match="smaller than patch_size"):
        WindowGrid((10, 3, 10), (4, 4, 4), (2, 2, 2))


def test_stride_larger_than_patch_refused():
    with pytest.raises(ConfigError, match="stride"):
        WindowGrid((10, 10, 10), (4, 4, 4), (5, 2, 2))


def test_importance_map_shape_and_range():
    w = importance_map((8, 6, 4))
    assert w.shape == (8, 6, 4)
    assert w.max() == pytest.approx(1.0, abs=0.2)
    assert w.min() >= MIN_WEIGHT
    # symmetric
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1])


def test_local_model_gives_exact_function_everywhere():
    """With a voxel-wise model every blend of equal values is that value: covers every voxel."""
    rng = np.random.default_rng(0)
    vol = rng.random((13, 11, 9), dtype=np.float32)
    out = sliding_window_predict(SigmoidOfInput(), vol, (4, 4, 4), (3, 3, 3), batch_size=3)
    expected = 1.0 / (1.0 + np.exp(-2.0 * vol.astype(np.float64)))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert out.dtype == np.float32


def test_callable_predictor_like_monai_tests():
    vol = np.zeros((6, 6, 6), np.float32)
    out = sliding_window_predict(lambda x: torch.cat([x, x + 1], dim=1), vol, (4, 4, 4), (2, 2, 2))
    # softmax([0, 1])[1]
    np.testing.assert_allclose(out, np.exp(1) / (1 + np.exp(1)), rtol=1e-6)


@pytest.mark.parametrize("block_shape", [(4, 4, 4), (5, 7, 3), (8, 8, 8), (16, 16, 16)])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_blocks_equal_whole_volume_bitwise(block_shape, batch_size):
    rng = np.random.default_rng(1)
    vol = rng.random((14, 13, 11), dtype=np.float32)
    model = tiny_conv()
    ref = sliding_window_predict(model, vol, (6, 6, 6), (3, 4, 2), batch_size=batch_size)
    grid = WindowGrid(vol.shape, (6, 6, 6), (3, 4, 2))
    runner = ModelRunner(model, batch_size=batch_size)
    out = np.full(vol.shape, np.nan, np.float32)
    for block in BlockGrid(vol.shape, block_shape).blocks():
        out[block.write_roi.to_slices()] = predict_block(runner, lambda r: vol[r.to_slices()], block, grid)
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out, ref)


def test_block_computes_only_intersecting_windows():
    grid = WindowGrid((20, 20, 20), (4, 4, 4), (2, 2, 2))
    roi = Roi((8, 8, 8), (4, 4, 4))
    wins = grid.windows(roi)
    assert all(not w.intersect(roi).empty for w in wins)
    assert len(wins) == 3**3  # starts 6, 8, 10 touch [8, 12)
    assert grid.read_roi(roi) == Roi((6, 6, 6), (8, 8, 8))
    calls = []

    def runner(x):
        calls.append(len(x))
        return np.zeros_like(x)

    predict_region(runner, lambda r: np.zeros(r.shape, np.float32), roi, grid, batch_size=4)
    assert sum(calls) == 27


def test_runner_pads_last_batch_and_counts():
    seen = []

    def model(x):
        seen.append(x.shape[0])
        return torch.cat([-x, x], dim=1)

    runner = ModelRunner(model, batch_size=4)
    out = runner(np.zeros((6, 2, 2, 2), np.float32))
    assert out.shape == (6, 1, 2, 2, 2)  # (N, T, z, y, x): one target
    assert seen == [4, 4]
    assert runner.windows_run == 6


def test_tta_flip_equivariant_model_unchanged_and_non_equivariant_differs():
    rng = np.random.default_rng(2)
    vol = rng.random((8, 10, 12), dtype=np.float32)
    plain = sliding_window_predict(SigmoidOfInput(), vol, (4, 6, 6), (2, 3, 3))
    tta = sliding_window_predict(SigmoidOfInput(), vol, (4, 6, 6), (2, 3, 3), tta="flips")
    np.testing.assert_allclose(tta, plain, rtol=1e-6, atol=1e-7)

    class XRamp(torch.nn.Module):
        """Foreground logit grows with the x position inside the window: not flip-invariant."""

        def forward(self, x):
            ramp = torch.arange(x.shape[-1], dtype=x.dtype).expand_as(x)
            return torch.cat([torch.zeros_like(x), ramp], dim=1)

    p_plain = sliding_window_predict(XRamp(), vol, (4, 6, 6), (4, 6, 6))
    p_tta = sliding_window_predict(XRamp(), vol, (4, 6, 6), (4, 6, 6), tta="flips")
    assert not np.allclose(p_plain, p_tta)
    # flips in x average position k with 5-k: logits k and 5-k → mean of their sigmoids
    k = np.arange(6)
    expected = 0.5 * (1 / (1 + np.exp(-k)) + 1 / (1 + np.exp(-(5 - k))))
    np.testing.assert_allclose(p_tta[0, 0, :6], expected, rtol=1e-6)


def test_bad_tta_and_device():
    with pytest.raises(ConfigError, match="tta"):
        ModelRunner(SigmoidOfInput(), tta="rot90")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda"):
            ModelRunner(SigmoidOfInput(), device="cuda")


def test_amp_on_cpu_is_a_no_op():
    vol = np.random.default_rng(3).random((8, 8, 8), dtype=np.float32)
    a = sliding_window_predict(tiny_conv(), vol, (4, 4, 4), amp=False)
    b = sliding_window_predict(tiny_conv(), vol, (4, 4, 4), amp=True)
    np.testing.assert_array_equal(a, b)


def test_single_output_channel_uses_sigmoid():
    vol = np.full((4, 4, 4), 0.3, np.float32)
    out = sliding_window_predict(lambda x: x, vol, (4, 4, 4))
    np.testing.assert_allclose(out, 1 / (1 + np.exp(-0.3)), rtol=1e-6)
