"""Pyramids: exact against a whole-volume numpy reference, sharded == single, OME metadata."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catena_mito import ome, storage
from catena_mito.blockwise.identity import RUN_ATTR
from catena_mito.blockwise.runs import RunSpec, RunStore
from catena_mito.config import PyramidConfig
from catena_mito.errors import (
    ConfigError,
    DataError,
    IncompleteInputError,
    PhaseError,
    RunMismatchError,
)
from catena_mito.pyramid import build_pyramid, downsample, reduction_factors

RES, OFF = (16.0, 4.0, 4.0), (8.0, 0.0, 4.0)


def reference(data: np.ndarray, factor, method: str) -> np.ndarray:
    """Box by box, with plain Python: the oracle for :func:`downsample`."""
    out = np.zeros([-(-s // f) for s, f in zip(data.shape, factor)], dtype=data.dtype)
    for idx in itertools.product(*(range(s) for s in out.shape)):
        box = data[tuple(slice(i * f, (i + 1) * f) for i, f in zip(idx, factor))].ravel()
        if method == "mean":
            m = sum(float(v) for v in box) / len(box)
            out[idx] = np.floor(m + 0.5) if np.issubdtype(data.dtype, np.integer) else m
        else:
            counts = {int(v): int((box == v).sum()) for v in box}
            best = max(counts.values())
            out[idx] = min(v for v, c in counts.items() if c == best)
    return out


@settings(max_examples=15, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 7)] * 3), factor=st.sampled_from([(2, 2, 2), (1, 2, 2), (2, 1, 3)]),
       seed=st.integers(0, 2**16))
def test_downsample_matches_the_reference(shape, factor, seed):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, shape).astype(np.uint8)
    ids = rng.integers(0, 4, shape).astype(np.uint64)
    np.testing.assert_array_equal(downsample(raw, factor, "mean"), reference(raw, factor, "mean"))
    np.testing.assert_array_equal(downsample(ids, factor, "mode"), reference(ids, factor, "mode"))
    prob = rng.random(shape).astype(np.float32)
    np.testing.assert_allclose(downsample(prob, factor, "mean"), reference(prob, factor, "mean"), rtol=1e-6)


def test_mode_ties_go_to_the_smaller_id_and_rounding_is_half_up():
    ids = np.array([7, 3, 3, 7, 9, 9, 1, 1], dtype=np.uint32).reshape(2, 2, 2)
    assert downsample(ids, (2, 2, 2), "mode").item() == 1  # four ids twice each: the smallest
    assert downsample(np.array([[[1, 2]]], dtype=np.uint8), (1, 1, 2), "mean").item() == 2  # 1.5 -> 2


def test_reduction_factors_reach_isotropy_first():
    assert reduction_factors((40, 4, 4), (64, 512, 512), 5) == [(1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert reduction_factors((8, 8, 8), (8, 8, 8), 2) == [(2, 2, 2), (2, 2, 2)]
    assert reduction_factors((8, 8, 8), (1, 8, 8), 1) == [(1, 2, 2)]  # a one-voxel axis stays
    with pytest.raises(ConfigError, match="at most 1 levels"):
        reduction_factors((8, 8, 8), (2, 2, 2), 2)


def _volume(url, path, data, chunks=(2, 4, 4), attrs=None):
    storage.open_group(url, mode="a")
    arr = storage.create_array(storage.join_url(url, path), data.shape, data.dtype, chunks,
                               attrs={**storage.spatial_attrs(RES, OFF), **(attrs or {})})
    arr[...] = data
    return storage.join_url(url, path)


def _levels(vol):
    return [np.asarray(storage.open_array(storage.join_url(vol, str(k)))[...])
            for k in range(len(storage.volume_levels(vol)))]


@pytest.mark.parametrize("path,dtype,method", [
    (storage.RAW_PATH, np.uint8, "mean"),
    (storage.INSTANCES_PATH, np.uint64, "mode"),
    (storage.prediction_path("mito_contour"), np.float32, "mean"),
])
def test_sharded_equals_single_equals_reference(tmp_path, path, dtype, method):
    rng = np.random.default_rng(3)
    data = (rng.random((7, 19, 22)) * (5 if method == "mode" else 255)).astype(dtype)
    single = _volume(str(tmp_path / "a.zarr"), path, data)
    sharded = _volume(str(tmp_path / "b.zarr"), path, data)
    (s,) = build_pyramid(PyramidConfig(volumes=[single], levels=3))
    assert s["method"] == method and s["complete"]
    sharded_config = PyramidConfig(volumes=[sharded], levels=3, block_shape=(2, 4, 8))
    with pytest.raises(PhaseError, match="level 1 .* is not complete"):  # level 2 reads all of level 1
        build_pyramid(sharded_config, shard_index=0, num_shards=3)
    for level in (1, 2, 3):  # shards of another block shape, level by level (consecutive array jobs)
        for k in range(3):
            build_pyramid(sharded_config, shard_index=k, num_shards=3, level=level)
    a, b = _levels(single), _levels(sharded)
    assert len(a) == len(b) == 4
    expected = data
    factors = reduction_factors(RES, data.shape, 3)
    for k, factor in enumerate(factors, start=1):
        expected = reference(expected, factor, method)
        np.testing.assert_array_equal(a[k], expected)
        np.testing.assert_array_equal(b[k], expected)
    # OME metadata: scale = resolution x cumulative factor; the centre of a level-k voxel
    # sits half a finer voxel past the finer level's first centre, per reduced axis.
    group = storage.volume_group(single)
    datasets = ome.ome_part(group.attrs.asdict(), 3)["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1", "2", "3"]
    scale, translation = list(RES), list(OFF)
    for k, (d, factor) in enumerate(zip(datasets[1:], factors), start=1):
        translation = [t + (f - 1) * r / 2 for t, r, f in zip(translation, scale, factor)]
        scale = [r * f for r, f in zip(scale, factor)]
        assert d["coordinateTransformations"] == [{"type": "scale", "scale": scale},
                                                  {"type": "translation", "translation": translation}]
        level = storage.open_array(storage.join_url(single, str(k)))
        assert storage.read_spatial(level) == (tuple(scale), tuple(translation))
        assert level.attrs["dimension_units"] == [f"{r:g} nm" for r in scale]
    assert datasets[1]["coordinateTransformations"][1]["translation"] == [8.0, 2.0, 6.0]
    # A rerun skips every block.
    (again,) = build_pyramid(PyramidConfig(volumes=[single], levels=3))
    assert again["blocks_computed"] == 0 and again["blocks_skipped"] == s["blocks_computed"]


def test_shards_started_together_wait_for_each_others_level(tmp_path):
    import threading

    data = np.random.default_rng(5).integers(0, 255, (6, 16, 16)).astype(np.uint8)
    vol = _volume(str(tmp_path / "d.zarr"), storage.RAW_PATH, data)
    config = PyramidConfig(volumes=[vol], levels=2, block_shape=(2, 4, 4))
    errors = []

    def shard(k):
        try:
            build_pyramid(config, shard_index=k, num_shards=2, wait_timeout=60)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=shard, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    f1, f2 = reduction_factors(RES, data.shape, 2)  # (1, 2, 2) twice: 16 x 4 x 4 nm
    np.testing.assert_array_equal(_levels(vol)[2], reference(reference(data, f1, "mean"), f2, "mean"))


def test_a_stale_or_incomplete_source_is_refused_and_a_rewritten_one_drops_its_levels(tmp_path):
    url = str(tmp_path / "d.zarr")
    vol = storage.join_url(url, storage.prediction_path("mito"))
    store = RunStore(storage.join_url(vol, ".catena", "predict"))
    spec = RunSpec("predict", {"x": 1}, (("predict", 1),))
    run = {RUN_ATTR: {"task": "predict", "run_id": spec.run_id, "record": ".catena/predict"}}
    _volume(url, storage.prediction_path("mito"), np.ones((4, 8, 8), np.uint8), attrs=run)
    store.claim(spec, overwrite=False)
    with pytest.raises(IncompleteInputError, match="incomplete"):
        build_pyramid(PyramidConfig(volumes=[vol], levels=1))
    assert storage.volume_levels(vol) == [(1, 1, 1)]
    store.markers(spec.run_id, "predict").mark_done(0)
    store.mark_complete_if_done(spec)
    build_pyramid(PyramidConfig(volumes=[vol], levels=1))
    assert storage.volume_levels(vol) == [(1, 1, 1), (1, 2, 2)]
    # The producer reruns with other settings: the levels go at once, and a pyramid of the
    # old source is another run's output (refused without --overwrite).
    other = RunSpec("predict", {"x": 2}, (("predict", 1),))
    store.claim(other, overwrite=True)
    storage.create_array(vol, (4, 8, 8), np.uint8, (2, 4, 4), attrs={
        **storage.spatial_attrs(RES, OFF), RUN_ATTR: {**run[RUN_ATTR], "run_id": other.run_id}})
    assert storage.volume_levels(vol) == [(1, 1, 1)] and not storage.exists(storage.join_url(vol, "1"))
    store.markers(other.run_id, "predict").mark_done(0)
    store.mark_complete_if_done(other)
    with pytest.raises(RunMismatchError):
        build_pyramid(PyramidConfig(volumes=[vol], levels=1))
    build_pyramid(PyramidConfig(volumes=[vol], levels=2), overwrite=True)
    assert storage.volume_levels(vol) == [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    build_pyramid(PyramidConfig(volumes=[vol], levels=1), overwrite=True)  # fewer levels: the rest go
    assert storage.volume_levels(vol) == [(1, 1, 1), (1, 2, 2)] and not storage.exists(storage.join_url(vol, "2"))


def test_older_plain_arrays_and_bad_plans_are_refused(tmp_path):
    import zarr

    url = str(tmp_path / "old.zarr")
    zarr.open_group(url, mode="w").create_array("volumes/raw", shape=(4, 4, 4), dtype="uint8")
    with pytest.raises(DataError, match="not an OME-NGFF multiscale volume"):
        build_pyramid(PyramidConfig(volumes=[storage.join_url(url, storage.RAW_PATH)], levels=1))
    vol = _volume(str(tmp_path / "new.zarr"), storage.RAW_PATH, np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ConfigError, match="multiple of the output chunk"):
        build_pyramid(PyramidConfig(volumes=[vol], levels=1, block_shape=(3, 4, 4)))
    assert storage.volume_levels(vol) == [(1, 1, 1)]


@pytest.mark.s3
@pytest.mark.slow  # ~6 s of S3 round trips
def test_layout_and_pyramid_on_s3(s3_env):
    from catena_mito.view import neuroglancer_state

    url = f"s3://{s3_env.make_bucket('pyramid')}/d.zarr"
    data = np.arange(4 * 8 * 8, dtype=np.uint32).reshape(4, 8, 8) % 5
    vol = _volume(url, storage.INSTANCES_PATH, data)
    raw = _volume(url, storage.RAW_PATH, data.astype(np.uint8))
    for shard in range(2):
        build_pyramid(PyramidConfig(volumes=[vol, raw], levels=1, block_shape=(2, 4, 4)),
                      shard_index=shard, num_shards=2, level=1)
    assert storage.volume_levels(vol) == [(1, 1, 1), (1, 2, 2)]
    np.testing.assert_array_equal(storage.open_array(storage.join_url(vol, "1"))[...],
                                  reference(data, (1, 2, 2), "mode"))
    state = neuroglancer_state(url)
    assert state["layers"][0]["source"] == f"zarr3://{s3_env.endpoint_url.rstrip('/')}/{url[5:]}/volumes/raw"
