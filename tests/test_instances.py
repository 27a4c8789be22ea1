"""Instance modes of ``label``: block-wise and sharded bytes equal a whole-volume oracle.

The oracle here is written independently of :mod:`catena_mito.instances`, plainly and
slowly: seeds by one cc3d pass over the whole volume, distance seeds by brute force over
every background voxel, geodesic distances by a breadth-first search in pure Python, and
each voxel's id as the smallest id among its neighbours one step nearer to a seed.
"""

from __future__ import annotations

import itertools
import uuid
from collections import deque

import cc3d
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catena_mito import storage
from catena_mito.config import LabelConfig
from catena_mito.errors import ConfigError, DataError, IncompleteInputError, PhaseError
from catena_mito.instances import InstanceSettings, instances_whole_volume
from catena_mito.instances.grow import grow
from catena_mito.label import _LabelTask, label

# --- the oracle ----------------------------------------------------------------------------


def neighbours(conn: int) -> list[tuple[int, int, int]]:
    axes = {6: 1, 18: 2, 26: 3}[conn]
    return [d for d in itertools.product((-1, 0, 1), repeat=3) if 0 < sum(map(bool, d)) <= axes]


def number(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Objects of ``>= min_size`` voxels renumbered 1..K by first voxel in C order."""
    ids, first, counts = np.unique(labels.ravel(), return_index=True, return_counts=True)
    kept = sorted((f, i) for i, f, c in zip(ids, first, counts) if i != 0 and c >= min_size)
    table = np.zeros(int(labels.max()) + 1, np.int64)
    for rank, (_, i) in enumerate(kept):
        table[i] = rank + 1
    return table[labels]


def brute_distance_seeds(mask: np.ndarray, t: float, res) -> np.ndarray:
    """Mask voxels with no background voxel closer than ``t`` nm (outside = foreground)."""
    fg, bg = np.argwhere(mask), np.argwhere(~mask)
    out = np.zeros(mask.shape, bool)
    if len(bg) == 0:
        return mask.copy()
    r = np.asarray(res, np.float64)
    for v in fg:
        d = np.sqrt((((bg - v) * r) ** 2).sum(axis=1)).min()
        out[tuple(v)] = d >= t
    return out


def bfs_grow(seeds: np.ndarray, mask: np.ndarray, conn: int, limit: int) -> np.ndarray:
    """Geodesic distance by BFS from all seeds, then ids level by level (smallest wins)."""
    dist = np.full(mask.shape, -1, np.int64)
    queue = deque()
    for v in map(tuple, np.argwhere((seeds > 0) & mask)):
        dist[v] = 0
        queue.append(v)
    offs = neighbours(conn)
    while queue:
        v = queue.popleft()
        if dist[v] == limit:
            continue
        for d in offs:
            u = tuple(a + b for a, b in zip(v, d))
            if all(0 <= c < s for c, s in zip(u, mask.shape)) and mask[u] and dist[u] < 0:
                dist[u] = dist[v] + 1
                queue.append(u)
    out = np.where(dist == 0, seeds, 0).astype(np.int64)
    for level in range(1, limit + 1):
        for v in map(tuple, np.argwhere(dist == level)):
            near = [out[u] for u in (tuple(a + b for a, b in zip(v, d)) for d in offs)
                    if all(0 <= c < s for c, s in zip(u, mask.shape)) and dist[u] == level - 1]
            out[v] = min(near)
    return out


def oracle(fg, contour, mode, conn, t_fg, t_seed, t_contour, small_seeds, dist, small, seed_nm=0.0, res=(1, 1, 1),
           unseeded=False):
    mask = fg.astype(np.float64) > t_fg
    if mode == "contour":
        seed = mask & (fg.astype(np.float64) > t_seed) & (contour.astype(np.float64) <= t_contour)
    else:
        seed = brute_distance_seeds(mask, seed_nm, res)
    seeds = number(cc3d.connected_components(seed, connectivity=conn), small_seeds)
    grown = bfs_grow(seeds, mask, conn, dist)
    if unseeded:  # foreground components that no seed reached, numbered after the seeds
        comp = cc3d.connected_components(mask, connectivity=conn)
        reached = {int(c) for c in comp[grown > 0]}
        rest = number(np.where(np.isin(comp, sorted(reached)), 0, comp), 0)
        grown = np.where(rest > 0, rest + int(seeds.max()), grown)
    counts = np.bincount(grown.ravel(), minlength=int(seeds.max()) + 1)
    table = np.zeros(len(counts), np.int64)
    keep = [i for i in range(1, len(counts)) if counts[i] >= small]
    table[keep] = np.arange(1, len(keep) + 1)
    return table[grown]


# --- helpers -------------------------------------------------------------------------------


def mem_url(prefix: str) -> str:
    return f"memory://{prefix}-{uuid.uuid4().hex[:10]}"


def write(url: str, values: np.ndarray, res=(8.0, 8.0, 8.0), attrs=None, chunks=(5, 5, 5)) -> str:
    arr = storage.create_array(url, values.shape, values.dtype, chunks,
                               attrs={**storage.spatial_attrs(res, (0.0, 0.0, 0.0)), **(attrs or {})})
    arr[...] = values
    return url


def run_sharded(config: LabelConfig, shards: int) -> None:
    for phase in ("blocks", "merge", "grow", "sizes", "relabel"):
        for i in range(1 if phase in ("merge", "sizes") else shards):
            label(config, phase=phase, shard_index=i, num_shards=1 if phase in ("merge", "sizes") else shards)


def read_output(config: LabelConfig) -> np.ndarray:
    return storage.open_array(storage.join_url(config.output_instance_dir, config.output_filename))[...]


def blobs(rng: np.random.Generator, shape, density: float) -> np.ndarray:
    """Foreground probabilities: random voxels, smoothed a little so that objects touch."""
    from scipy import ndimage

    noise = ndimage.uniform_filter(rng.random(shape), size=2, mode="nearest")
    return np.where(noise > 1 - density, 0.5 + noise / 2, noise / 2).astype(np.float32)


shapes = st.tuples(st.integers(3, 12), st.integers(3, 14), st.integers(3, 16))
blocks = st.tuples(*[st.integers(3, 8)] * 3)


# --- block-wise == whole volume ------------------------------------------------------------


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, block=blocks, shards=st.integers(1, 4), conn=st.sampled_from([6, 18, 26]),
       dist=st.integers(0, 4), small=st.integers(0, 8), small_seeds=st.integers(0, 3),
       t_contour=st.floats(0.2, 0.8), density=st.floats(0.3, 0.7), seed=st.integers(0, 2**16),
       unseeded=st.booleans())
def test_contour_mode_equals_whole_volume(shape, block, shards, conn, dist, small, small_seeds, t_contour,
                                          density, seed, unseeded):
    rng = np.random.default_rng(seed)
    fg = blobs(rng, shape, density)
    contour = rng.random(shape).astype(np.float32)
    root = mem_url("ct")
    write(root + "/p", fg)
    write(root + "/p_contour", contour)
    config = LabelConfig(input_prediction_path=root + "/p", output_instance_dir=root + "/out", chunk_size=block,
                         connectivity=conn, instance_mode="contour", thres_foreground=0.4, thres_seed=0.6,
                         thres_contour=t_contour, thres_small_seeds=small_seeds, grow_distance=dist,
                         thres_small_instances=small, unseeded_components=unseeded)
    run_sharded(config, shards)
    expected = oracle(fg, contour, "contour", conn, 0.4, 0.6, t_contour, small_seeds, dist, small,
                      unseeded=unseeded)
    np.testing.assert_array_equal(read_output(config), expected)


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, block=blocks, shards=st.integers(1, 3), conn=st.sampled_from([6, 18, 26]),
       dist=st.integers(0, 4), seed_nm=st.sampled_from([8.0, 12.0, 16.0, 20.0, 30.0]),
       res=st.sampled_from([(8, 8, 8), (16, 8, 8), (8, 4, 6)]), density=st.floats(0.4, 0.8),
       seed=st.integers(0, 2**16), unseeded=st.booleans())
def test_distance_mode_equals_whole_volume(shape, block, shards, conn, dist, seed_nm, res, density, seed, unseeded):
    fg = blobs(np.random.default_rng(seed), shape, density)
    root = mem_url("dt")
    write(root + "/p", fg, res=tuple(float(r) for r in res))
    config = LabelConfig(input_prediction_path=root + "/p", output_instance_dir=root + "/out", chunk_size=block,
                         connectivity=conn, instance_mode="distance", seed_distance=seed_nm, thres_small_seeds=1,
                         grow_distance=dist, thres_small_instances=2, thres_foreground=0.5,
                         unseeded_components=unseeded)
    run_sharded(config, shards)
    expected = oracle(fg, None, "distance", conn, 0.5, 0, 0, 1, dist, 2, seed_nm=seed_nm, res=res,
                      unseeded=unseeded)
    np.testing.assert_array_equal(read_output(config), expected)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, conn=st.sampled_from([6, 18, 26]), dist=st.integers(0, 6), density=st.floats(0.3, 0.8),
       seed=st.integers(0, 2**16), region=st.tuples(*[st.integers(0, 11)] * 6))
def test_grow_is_the_bfs_rule_and_exact_with_its_halo(shape, conn, dist, density, seed, region):
    rng = np.random.default_rng(seed)
    mask = blobs(rng, shape, density) > 0.5
    seeds = np.where(mask & (rng.random(shape) < 0.05), rng.integers(1, 6, shape), 0).astype(np.uint32)
    whole = grow(seeds, mask, conn, dist)
    np.testing.assert_array_equal(whole, bfs_grow(seeds.astype(np.int64), mask, conn, dist))
    # any box, read with a halo of ``dist`` and cut back, gives the whole-volume answer
    lo = [min(r, s - 1) for r, s in zip(region[:3], shape)]
    hi = [min(s, lo_ + 1 + r) for lo_, r, s in zip(lo, region[3:], shape)]
    rlo = [max(0, a - dist) for a in lo]
    rhi = [min(s, b + dist) for b, s in zip(hi, shape)]
    read = tuple(slice(a, b) for a, b in zip(rlo, rhi))
    inner = tuple(slice(a - r, b - r) for a, b, r in zip(lo, hi, rlo))
    part = grow(np.ascontiguousarray(seeds[read]), np.ascontiguousarray(mask[read]), conn, dist)[inner]
    np.testing.assert_array_equal(part, whole[tuple(slice(a, b) for a, b in zip(lo, hi))])


def test_every_mask_voxel_within_reach_of_a_seed_is_labelled_even_from_strided_arrays():
    # skimage's watershed loses voxels of non-C-contiguous masks; grow must not care
    rng = np.random.default_rng(3)
    mask = blobs(rng, (16, 14, 12), 0.8) > 0.5
    seeds = np.where(mask & (rng.random(mask.shape) < 0.02), rng.integers(1, 9, mask.shape), 0).astype(np.uint32)
    for dist in (1, 3, 40):
        expected = grow(seeds, mask, 26, dist)
        strided = grow(seeds.T.copy().T, np.asfortranarray(mask), 26, dist)
        np.testing.assert_array_equal(strided, expected)
        reach = bfs_grow(seeds.astype(np.int64), mask, 26, dist) > 0  # within ``dist`` steps of a seed
        assert np.array_equal(expected > 0, reach)
    # with an unbounded distance, every mask voxel connected to a seed is labelled
    comp = cc3d.connected_components(mask, connectivity=26)
    seeded = np.isin(comp, np.unique(comp[seeds > 0]))
    assert np.array_equal(grow(seeds, mask, 26, 10**6) > 0, seeded & mask)


def test_whole_volume_function_equals_label():
    rng = np.random.default_rng(5)
    fg = blobs(rng, (11, 13, 15), 0.5)
    contour = rng.random(fg.shape).astype(np.float32)
    root = mem_url("wv")
    write(root + "/p", fg)
    write(root + "/c", contour)
    config = LabelConfig(input_prediction_path=root + "/p", input_contour_path=root + "/c",
                         output_instance_dir=root + "/out", chunk_size=(4, 5, 6), thres_small_instances=3,
                         thres_foreground=0.4, thres_seed=0.6, thres_contour=0.3, thres_small_seeds=2,
                         grow_distance=3)
    summary = label(config)
    out = read_output(config)
    np.testing.assert_array_equal(out, instances_whole_volume(fg, contour, InstanceSettings.from_config(
        config, "contour", None)))
    assert summary.num_objects == int(out.max()) and out.max() > 1


def test_unseeded_foreground_is_numbered_after_the_seeds_unless_turned_off():
    # three objects across 2x2x2 blocks: a seeded slab (z 0-1), a seedless one (all contour,
    # z 3-5, crossing block faces) and a seeded rod (z 7) whose far end lies beyond
    # grow_distance (in other blocks than its seed: it touches the grown part across a face)
    fg = np.zeros((8, 6, 9), np.float32)
    contour = np.ones(fg.shape, np.float32)
    fg[0:2] = 1.0
    contour[0:2, 1:5, 2:7] = 0.0
    fg[3:6, 1:5, 1:5] = 1.0
    fg[7, 0, :] = 1.0
    contour[7, 0, 0] = 0.0
    root = mem_url("unseeded")
    write(root + "/p", fg)
    write(root + "/p_contour", contour)
    base = dict(input_prediction_path=root + "/p", chunk_size=(2, 2, 2), instance_mode="contour",
                thres_small_seeds=1, thres_small_instances=1, grow_distance=3)
    on = LabelConfig(**base, output_instance_dir=root + "/on")
    run_sharded(on, 3)
    out = read_output(on)
    seeded = oracle(fg, contour, "contour", 26, 0.5, 0.8, 0.3, 1, 3, 1)
    np.testing.assert_array_equal(out, oracle(fg, contour, "contour", 26, 0.5, 0.8, 0.3, 1, 3, 1, unseeded=True))
    assert out.max() == 3  # slab, rod, then the seedless object; the rod's far end stays 0
    assert set(np.unique(out[3:6, 1:5, 1:5])) == {3}
    assert out[7, 0].tolist() == [2, 2, 2, 2, 0, 0, 0, 0, 0]
    assert np.array_equal(out[seeded > 0], seeded[seeded > 0])
    off = LabelConfig(**base, output_instance_dir=root + "/off", unseeded_components=False)
    run_sharded(off, 2)
    np.testing.assert_array_equal(read_output(off), seeded)
    assert read_output(off).max() == 2


# --- modes, inputs and identities ----------------------------------------------------------


def _task(**kw) -> _LabelTask:
    return _LabelTask(LabelConfig(**kw), 1)


def test_connected_components_run_id_is_unchanged():
    # the id this exact run had before the instance modes existed (commit 0995fb2)
    url = "memory://fixed-cc-runid/p"
    write(url, np.zeros((6, 7, 8), np.float32), chunks=(6, 7, 8))
    task = _task(input_prediction_path=url, output_instance_dir="memory://fixed-cc-runid/out", chunk_size=(3, 4, 5))
    assert task.mode == "connected_components"
    assert task.spec.run_id == "20ef38da1a10727c"


def test_auto_mode_follows_the_prediction_targets():
    root = mem_url("auto")
    write(root + "/p", np.zeros((4, 4, 4), np.float32),
          attrs={"catena_target": "foreground", "catena_targets": ["foreground", "contour"]})
    write(root + "/p_contour", np.zeros((4, 4, 4), np.float32), attrs={"catena_target": "contour"})
    write(root + "/q", np.zeros((4, 4, 4), np.float32))
    assert _task(input_prediction_path=root + "/p", output_instance_dir=root + "/o").mode == "contour"
    assert _task(input_prediction_path=root + "/q", output_instance_dir=root + "/o").mode == "connected_components"
    assert _task(input_prediction_path=root + "/q", input_contour_path=root + "/p_contour",
                 output_instance_dir=root + "/o").mode == "contour"


def test_settings_that_change_values_are_in_the_run_id():
    root = mem_url("ids")
    write(root + "/p", np.zeros((4, 4, 4), np.float32))
    write(root + "/p_contour", np.zeros((4, 4, 4), np.float32))
    base = dict(input_prediction_path=root + "/p", output_instance_dir=root + "/o", instance_mode="contour")
    ids = {_task(**base).spec.run_id}
    for key, value in (("thres_seed", 0.9), ("thres_contour", 0.45), ("thres_small_seeds", 5), ("grow_distance", 2),
                       ("unseeded_components", False)):
        ids.add(_task(**base, **{key: value}).spec.run_id)
    ids.add(_task(input_prediction_path=root + "/p", output_instance_dir=root + "/o", instance_mode="distance").spec.run_id)
    assert len(ids) == 7


@pytest.mark.parametrize("kw, error, match", [
    (dict(instance_mode="contour"), DataError, "no Zarr array at input_contour_path .*p_contour"),
    (dict(thres_seed=0.9), ConfigError, "thres_seed=0.9 is not used by instance_mode 'connected_components'"),
    (dict(instance_mode="distance", thres_contour=0.2), ConfigError, "thres_contour=0.2 is not used"),
    (dict(instance_mode="connected_components", grow_distance=3), ConfigError, "grow_distance=3 is not used"),
    (dict(unseeded_components=False), ConfigError, "unseeded_components=False is not used"),
])
def test_bad_settings_are_one_clear_error(kw, error, match):
    root = mem_url("bad")
    write(root + "/p", np.zeros((4, 4, 4), np.float32))
    with pytest.raises(error, match=match):
        _task(input_prediction_path=root + "/p", output_instance_dir=root + "/o", **kw)


def test_contour_input_is_checked_like_the_prediction():
    root = mem_url("chk")
    write(root + "/p", np.zeros((4, 4, 4), np.float32))
    write(root + "/small", np.zeros((4, 4, 3), np.float32))
    write(root + "/fg", np.zeros((4, 4, 4), np.float32), attrs={"catena_target": "foreground"})
    # a catena output whose run record is missing: incomplete, refused
    write(root + "/orphan", np.zeros((4, 4, 4), np.float32),
          attrs={"catena_run": {"task": "predict", "run_id": "abc", "record": ".catena/predict"}})
    kw = dict(input_prediction_path=root + "/p", output_instance_dir=root + "/o")
    with pytest.raises(DataError, match="same shape"):
        _task(**kw, input_contour_path=root + "/small")
    with pytest.raises(DataError, match="holds the 'foreground' target"):
        _task(**kw, input_contour_path=root + "/fg")
    with pytest.raises(IncompleteInputError, match="input_contour_path .*orphan"):
        _task(**kw, input_contour_path=root + "/orphan")
    assert not storage.exists(root + "/o")


def test_seeded_phases_do_nothing_in_connected_components_mode(caplog):
    """One set of cluster manifests runs every phase: in connected_components mode grow
    and sizes succeed at once without waiting, claiming or writing anything."""
    root = mem_url("ph")
    write(root + "/p", np.zeros((4, 4, 4), np.float32))
    config = LabelConfig(input_prediction_path=root + "/p", output_instance_dir=root + "/o")
    for phase in ("grow", "sizes"):
        with caplog.at_level("INFO", logger="catena_mito.label"):
            summary = label(config, phase=phase, wait_timeout=60)
        assert summary.blocks_computed == 0 and f"has no {phase} phase" in caplog.text
    assert not storage.exists(root + "/o")


def test_resume_and_rerun_of_a_seeded_run():
    rng = np.random.default_rng(9)
    fg = blobs(rng, (10, 12, 14), 0.6)
    root = mem_url("rr")
    write(root + "/p", fg)
    write(root + "/p_contour", rng.random(fg.shape).astype(np.float32))
    config = LabelConfig(input_prediction_path=root + "/p", output_instance_dir=root + "/o", chunk_size=(5, 6, 7),
                         instance_mode="contour", thres_small_instances=2, grow_distance=2)
    label(config, phase="blocks", shard_index=0, num_shards=2)
    with pytest.raises(PhaseError, match="blocks phase .* is not complete"):
        label(config, phase="merge")
    label(config, phase="blocks", shard_index=1, num_shards=2)
    label(config, phase="merge")
    label(config, phase="grow", shard_index=1, num_shards=2)
    with pytest.raises(PhaseError, match="grow phase .* is not complete"):
        label(config, phase="sizes")
    label(config, phase="grow", shard_index=0, num_shards=2)
    for phase in ("sizes", "relabel"):
        label(config, phase=phase)
    first = read_output(config)
    again = label(config)  # complete: nothing to do
    assert again.blocks_computed == 0
    np.testing.assert_array_equal(read_output(config), first)
    label(config, overwrite=True)
    np.testing.assert_array_equal(read_output(config), first)


@pytest.mark.slow
def test_cli_runs_the_seeded_phases_and_skips_them_for_connected_components(tmp_path):
    import subprocess
    import sys

    rng = np.random.default_rng(11)
    fg = blobs(rng, (8, 9, 10), 0.6)
    contour = rng.random(fg.shape).astype(np.float32)
    root = str(tmp_path / "p.zarr")
    write(root + "/p", fg)
    write(root + "/p_contour", contour)
    cfg = tmp_path / "label.yaml"
    cfg.write_text(f"input_prediction_path: {root}/p\noutput_instance_dir: {tmp_path / 'o.zarr'}\n"
                   "chunk_size: 4\ninstance_mode: contour\nthres_small_instances: 2\ngrow_distance: 3\n")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "catena_mito", "label", "--config", str(cfg), *args],
                              capture_output=True, text=True, check=False)

    for phase, shards in (("blocks", 2), ("merge", 1), ("grow", 1), ("sizes", 1), ("relabel", 1)):
        for i in range(shards):
            done = cli("--phase", phase, "--shard-index", str(i), "--num-shards", str(shards))
            assert done.returncode == 0, done.stderr
    config = LabelConfig(input_prediction_path=root + "/p", output_instance_dir=str(tmp_path / "o.zarr"),
                         chunk_size=4, instance_mode="contour", thres_small_instances=2, grow_distance=3)
    np.testing.assert_array_equal(read_output(config), instances_whole_volume(
        fg, contour, InstanceSettings.from_config(config, "contour", None)))
    cfg.write_text(f"input_prediction_path: {root}/p\noutput_instance_dir: {tmp_path / 'c.zarr'}\n")
    nothing = cli("--phase", "sizes")
    assert nothing.returncode == 0 and "has no sizes phase" in nothing.stderr
    assert not (tmp_path / "c.zarr").exists()


def test_scaled_and_tiff_outputs_of_a_seeded_mode(tmp_path):
    import tifffile

    rng = np.random.default_rng(2)
    fg = blobs(rng, (9, 10, 11), 0.6)
    contour = rng.random(fg.shape).astype(np.float32)
    root = mem_url("sc")
    write(root + "/p", fg)
    write(root + "/p_contour", contour)
    base = dict(input_prediction_path=root + "/p", chunk_size=4, instance_mode="contour", grow_distance=3,
                thres_small_instances=2)
    ref = instances_whole_volume(fg, contour, InstanceSettings.from_config(
        LabelConfig(output_instance_dir=root + "/x", **base), "contour", None))
    label(LabelConfig(output_instance_dir=str(tmp_path), output_format="tiff", **base))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "mito_instances.tif"), ref)
    scaled = LabelConfig(output_instance_dir=root + "/s", scale_factors=(0.5, 1.5, 2.0), **base)
    label(scaled)
    idx = [np.minimum(np.floor((np.arange(max(1, int(np.floor(n * f + 0.5)))) + 0.5) / f).astype(int), n - 1)
           for n, f in zip(fg.shape, (0.5, 1.5, 2.0))]
    np.testing.assert_array_equal(read_output(scaled), ref[np.ix_(*idx)])


# --- the per-block intermediates -------------------------------------------------------------


def test_packed_arrays_roundtrip_and_refuse_other_bytes():
    from catena_mito.instances.packed import Packed, pack, smallest_uint

    rng = np.random.default_rng(3)
    a = rng.integers(0, 200, (6, 7, 8)).astype(np.uint8)
    b = rng.integers(0, 2**40, 5).astype(np.uint64)
    p = Packed(pack({"a": a, "b": b, "empty": np.zeros((0, 3), np.uint16)}, {"labels": 7}))
    assert p.meta == {"labels": 7} and p.names() == ["a", "b", "empty"]
    np.testing.assert_array_equal(p.get("a"), a)
    np.testing.assert_array_equal(p.get("b"), b)
    assert p.get("empty").shape == (0, 3) and p.get("empty").dtype == np.uint16
    with pytest.raises(KeyError, match="no array 'c'"):
        p.get("c")
    with pytest.raises(ValueError, match="not a packed array file"):
        Packed(b"\x93NUMPY...")
    assert [smallest_uint(v) for v in (0, 255, 256, 2**16, 2**32)] == \
        [np.uint8, np.uint8, np.uint16, np.uint32, np.uint64]


def test_a_missing_intermediate_says_to_rerun_with_overwrite():
    """Seeded intermediates are per-block files: one gone (or a run begun by a version that
    kept them elsewhere) is a clear PhaseError, and --overwrite recomputes the same bytes."""
    rng = np.random.default_rng(5)
    fg = blobs(rng, (9, 10, 11), 0.6)
    root = mem_url("miss")
    write(root + "/p", fg)
    write(root + "/p_contour", rng.random(fg.shape).astype(np.float32))
    config = LabelConfig(input_prediction_path=root + "/p", output_instance_dir=root + "/o", chunk_size=4,
                         instance_mode="contour", thres_small_instances=2, grow_distance=2)
    label(config, phase="blocks")
    label(config, phase="merge")
    task = _LabelTask(config, 1)
    storage.remove(task._faces_url(13), recursive=False)  # an interior block's face slabs
    with pytest.raises(PhaseError, match="is missing though its phase is marked done.*--overwrite"):
        label(config, phase="grow")
    label(config, overwrite=True)
    again = mem_url("miss2")
    write(again + "/p", fg)
    write(again + "/p_contour", storage.open_array(root + "/p_contour")[...])
    fresh = config.model_copy(update={"input_prediction_path": again + "/p", "output_instance_dir": again + "/o"})
    label(fresh)
    np.testing.assert_array_equal(read_output(config), read_output(fresh))
