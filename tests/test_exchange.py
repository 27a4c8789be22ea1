"""Window ownership and exchange: each window once, exact integer blends, device-side runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catena_mito.blockwise.geometry import BlockGrid, Roi
from catena_mito.errors import ConfigError
from catena_mito.exchange import (
    PROB_BITS,
    Exchange,
    PieceStore,
    axis_weights,
    gather,
    whole_volume_predict,
    window_weights,
)
from catena_mito.inference import ModelRunner, WindowGrid
from catena_mito.predict import default_block_shape

SHAPE = (14, 13, 11)
PATCH = (6, 6, 6)
STRIDE = (3, 4, 2)


def tiny_conv(seed: int = 0, out: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, out, 3, padding=1)
    ).eval()


@pytest.fixture(scope="module")
def vol():
    return np.random.default_rng(1).random(SHAPE, dtype=np.float32)


def blockwise(runner, vol, block_shape, patch=PATCH, stride=STRIDE):
    """Both phases block by block, the pieces in memory; returns the output and windows run."""
    blocks = BlockGrid(vol.shape, block_shape)
    ex = Exchange.of(WindowGrid(vol.shape, patch, stride), blocks)
    store = PieceStore(None)
    for b in blocks.blocks():
        wins = ex.owned_windows(b)
        roi = ex.read_roi(wins)
        store.put(b.index, ex.partial(runner, b, None if roi is None else vol[roi.to_slices()], roi, wins))
    out = np.full((len(runner.targets), *vol.shape), np.nan, np.float32)
    for b in reversed(blocks.blocks()):  # any order: the pieces are all there
        pieces = gather(ex, b, lambda src, kind: store.get(src.index, kind))
        out[(slice(None), *b.write_roi.to_slices())] = ex.blend(b, pieces)
    return out


@pytest.mark.parametrize("block_shape,batch_size", [((6, 6, 6), 3), ((7, 5, 4), 1), ((8, 8, 8), 3), (SHAPE, 3)])
def test_blocks_equal_whole_volume_bitwise_and_each_window_runs_once(vol, block_shape, batch_size):
    model = tiny_conv()
    whole = whole_volume_predict(ModelRunner(model, batch_size=batch_size), vol, PATCH, STRIDE)
    runner = ModelRunner(model, batch_size=batch_size)
    out = blockwise(runner, vol, block_shape)
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out, whole)
    assert runner.windows_run == WindowGrid(SHAPE, PATCH, STRIDE).num_windows


def test_fixed_point_is_the_float_weighted_mean_within_2_to_minus_24(vol):
    """The only approximation: each probability rounded to 2^-24 (plus float32 output)."""
    runner = ModelRunner(tiny_conv(), batch_size=2)
    out = whole_volume_predict(runner, vol, PATCH, STRIDE)[0]
    grid = WindowGrid(SHAPE, PATCH, STRIDE)
    wins = grid.windows()
    probs = runner(np.stack([vol[w.to_slices()] for w in wins]))[:, 0].astype(np.float64)
    weights = window_weights(PATCH).astype(np.float64)
    num, den = np.zeros(SHAPE), np.zeros(SHAPE)
    for w, p in zip(wins, probs):
        num[w.to_slices()] += weights * p
        den[w.to_slices()] += weights
    diff = np.abs(out - num / den).max()
    assert diff <= 2.0 ** -(PROB_BITS + 1) + 2.0**-24  # rounding of p, then of the float32 result
    assert out.min() < out.max()


def test_weight_sum_is_separable_and_equals_the_summed_window_weights():
    grid = WindowGrid(SHAPE, PATCH, STRIDE)
    ex = Exchange.of(grid, BlockGrid(SHAPE, (8, 8, 8)))
    den = np.zeros(SHAPE, np.int64)
    for w in grid.windows():
        den[w.to_slices()] += window_weights(PATCH)
    roi = Roi((3, 2, 5), (9, 8, 6))
    np.testing.assert_array_equal(ex.weight_sum(roi), den[roi.to_slices()])
    q = axis_weights(64)
    assert q.min() >= 1 and q.max() <= 2**10 and (q == q[::-1]).all()


def test_a_windows_contribution_does_not_depend_on_its_batch_position(vol):
    """Window B alone (batch position 0) and after A (position 1) adds the same integers."""
    runner = ModelRunner(tiny_conv(), batch_size=2)
    a, b = Roi((0, 0, 0), PATCH), Roi((3, 4, 2), PATCH)
    ext = Roi.from_shape(SHAPE)
    w = window_weights(PATCH)
    both = runner.accumulate(vol, ext, [a, b], ext, w, PROB_BITS)
    alone = runner.accumulate(vol, ext, [a], ext, w, PROB_BITS) + runner.accumulate(vol, ext, [b], ext, w, PROB_BITS)
    np.testing.assert_array_equal(both, alone)


def test_two_targets_are_blended_each(vol):
    runner = ModelRunner(tiny_conv(out=2), batch_size=2, targets=("foreground", "contour"))
    out = blockwise(runner, vol, (7, 5, 4))
    assert out.shape == (2, *SHAPE) and not np.array_equal(out[0], out[1])
    np.testing.assert_array_equal(out, whole_volume_predict(
        ModelRunner(tiny_conv(out=2), batch_size=2, targets=("foreground", "contour")), vol, PATCH, STRIDE))


def test_refusals_name_the_setting():
    with pytest.raises(ConfigError, match="block_shape .* at least 6"):
        Exchange.of(WindowGrid((30, 30, 30), PATCH, (1, 6, 6)), BlockGrid((30, 30, 30), (2, 8, 8)))
    with pytest.raises(ConfigError, match="stride too small"):
        Exchange.of(WindowGrid((40, 40, 40), (16, 16, 16), (1, 1, 1)), BlockGrid((40, 40, 40), (20, 20, 20)))


def test_default_block_shape_follows_patch_stride_and_chunks():
    assert default_block_shape((64, 64, 64), (32, 32, 32), (64, 64, 64), (512,) * 3) == (128, 128, 128)
    assert default_block_shape((128, 128, 128), (64, 64, 64), (64, 64, 64), (512,) * 3) == (256, 256, 256)
    assert default_block_shape((64, 64, 64), (48, 48, 48), (64, 64, 64), (1000,) * 3) == (192, 192, 192)
    assert default_block_shape((64, 64, 64), (32, 32, 32), (64, 64, 64), (100, 300, 300)) == (128, 128, 128)
    assert default_block_shape((8, 16, 16), (4, 8, 8), (8, 16, 16), (20, 36, 44)) == (24, 48, 48)


# --- GPU options, on the CPU ----------------------------------------------------------------


def test_bf16_autocast_and_channels_last_run_on_cpu(vol):
    model = tiny_conv()
    x = np.stack([vol[:6, :6, :6], vol[2:8, 3:9, 1:7]])
    fp32 = ModelRunner(model, batch_size=2)(x)
    assert ModelRunner(model, amp=True).precision == "fp32"  # auto on a CPU: no autocast
    bf16 = ModelRunner(model, batch_size=2, precision="bf16")
    assert bf16.precision == "bf16"
    low = bf16(x)
    assert not np.array_equal(low, fp32) and np.abs(low - fp32).max() < 0.05
    last = ModelRunner(model, batch_size=2, channels_last=True)(x)
    np.testing.assert_allclose(last, fp32, atol=1e-6)
    # bf16 blends are exact too: block-wise equals whole-volume bitwise
    runner = ModelRunner(model, batch_size=2, precision="bf16", channels_last=True)
    np.testing.assert_array_equal(
        blockwise(runner, vol, (7, 5, 4)),
        whole_volume_predict(ModelRunner(model, batch_size=2, precision="bf16", channels_last=True), vol, PATCH, STRIDE))


@pytest.mark.slow
def test_torch_compile_opt_in_runs_on_cpu(vol):
    torch.manual_seed(0)
    model = torch.nn.Conv3d(1, 2, 1).eval()  # the smallest graph: compile time is the cost here
    x = vol[None, :4, :4, :4]
    eager = ModelRunner(model, batch_size=1)(x)
    compiled = ModelRunner(model, batch_size=1, compile=True)(x)
    np.testing.assert_allclose(compiled, eager, atol=1e-6)


def test_across_thread_counts_results_agree_to_float_rounding(vol):
    """Bitwise equality holds on one device and thread count; other thread counts change
    the model's float32 rounding (oneDNN), so results agree to ~1e-6, not bitwise."""
    model = tiny_conv()
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(whole_volume_predict(ModelRunner(model, batch_size=2), vol, PATCH, STRIDE))
    finally:
        torch.set_num_threads(threads)
    assert np.abs(runs[0] - runs[1]).max() <= 1e-6
