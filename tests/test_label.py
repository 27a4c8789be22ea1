"""``catena-mito label``: block-wise labels equal one whole-volume pass, voxel for voxel.

The reference (:func:`reference_labels`) is written here independently of the library:
binarise the whole volume, one ``cc3d`` call, global sizes, small objects removed, ids
renumbered by each object's first voxel in C order.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from fractions import Fraction
from pathlib import Path

import cc3d
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catena_mito import label as label_module
from catena_mito import storage
from catena_mito.config import LabelConfig
from catena_mito.errors import CatenaError, ConfigError, DataError, StorageError
from catena_mito.label import OutputTooLargeError, PhaseError, label

REPO = Path(__file__).resolve().parents[1]


# --- the reference -------------------------------------------------------------------------


def binarise(values: np.ndarray, thres: float) -> np.ndarray:
    """The documented foreground, computed the slow, obvious way."""
    if values.dtype == np.uint8:
        exact = np.array([Fraction(v, 255) > Fraction(thres) for v in range(256)])
        return exact[values]
    return values.astype(np.float64) > thres


def reference_labels(values: np.ndarray, thres: float, connectivity: int, min_size: int) -> np.ndarray:
    """One cc3d pass over the whole volume, global size filter, ids by first voxel (C order)."""
    labels, n = cc3d.connected_components(binarise(values, thres), connectivity=connectivity, return_N=True)
    ids, first, counts = np.unique(labels.ravel(), return_index=True, return_counts=True)
    keep = [(f, i) for i, f, c in zip(ids, first, counts) if i != 0 and c >= min_size]
    table = np.zeros(n + 1, np.int64)
    for rank, (_, i) in enumerate(sorted(keep)):
        table[i] = rank + 1
    return table[labels]


def resample(volume: np.ndarray, factors) -> np.ndarray:
    """Nearest-neighbour resampling of a whole volume by the documented formula."""
    idx = []
    for size, f in zip(volume.shape, factors):
        n = max(1, int(np.floor(size * f + 0.5)))
        idx.append(np.minimum(np.floor((np.arange(n) + 0.5) / f).astype(np.int64), size - 1))
    return volume[np.ix_(*idx)]


# --- helpers -------------------------------------------------------------------------------


def mem_url(prefix: str = "label") -> str:
    return f"memory://{prefix}-{uuid.uuid4().hex[:10]}"


def write_input(url: str, values: np.ndarray, chunks=None, resolution=(8.0, 8.0, 8.0),
                storage_options=None) -> str:
    arr = storage.create_array(url, values.shape, values.dtype, chunks or values.shape,
                               attrs=storage.spatial_attrs(resolution, (0.0, 0.0, 0.0)),
                               storage_options=storage_options)
    arr[...] = values
    return url


def make_config(inp: str, out: str, **kw) -> LabelConfig:
    return LabelConfig(input_prediction_path=inp, output_instance_dir=out, **kw)


def read_output(config: LabelConfig) -> np.ndarray:
    url = storage.join_url(config.output_instance_dir, config.output_filename)
    return storage.open_array(url, config.storage_options)[...]


def run_sharded(config: LabelConfig, num_shards: int) -> None:
    for i in range(num_shards):
        label(config, phase="blocks", shard_index=i, num_shards=num_shards)
    label(config, phase="merge")
    for i in range(num_shards):
        label(config, phase="relabel", shard_index=i, num_shards=num_shards)


def random_volume(rng: np.random.Generator, shape, density: float) -> np.ndarray:
    return (rng.random(shape) < density).astype(np.float32) * 0.9 + 0.05


# --- exactness -----------------------------------------------------------------------------

shapes = st.tuples(*[st.integers(3, 19)] * 3)
blocks = st.tuples(*[st.integers(2, 9)] * 3)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, block=blocks, shards=st.integers(1, 5), conn=st.sampled_from([6, 18, 26]),
       min_size=st.integers(0, 6), density=st.floats(0.1, 0.7), seed=st.integers(0, 2**16))
def test_random_binary_volumes_equal_single_shot(shape, block, shards, conn, min_size, density, seed):
    values = random_volume(np.random.default_rng(seed), shape, density)
    inp = write_input(mem_url("in") + "/p", values, chunks=(5, 5, 5))
    config = make_config(inp, mem_url("out"), chunk_size=block, connectivity=conn,
                         thres_small_instances=min_size, thres_foreground=0.5)
    run_sharded(config, shards)
    out = read_output(config)
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out, reference_labels(values, 0.5, conn, min_size))


@pytest.fixture(scope="module")
def synthetic_probabilities() -> list[np.ndarray]:
    from scipy.ndimage import gaussian_filter

    from catena_mito.synthetic import make_volume

    vols = []
    for seed in (0, 2):
        mito = make_volume((37, 45, 50), seed=seed)["mito_ids"] > 0
        vols.append(gaussian_filter(mito.astype(np.float32), 1.0))
    return vols


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 1), block=st.tuples(*[st.integers(6, 24)] * 3), shards=st.integers(1, 5),
       conn=st.sampled_from([6, 18, 26]), min_size=st.sampled_from([0, 20, 200]),
       thres=st.sampled_from([0.3, 0.5, 0.7]), as_uint8=st.booleans())
def test_synthetic_mitochondria_equal_single_shot(synthetic_probabilities, which, block, shards, conn,
                                                  min_size, thres, as_uint8):
    values = synthetic_probabilities[which]
    if as_uint8:
        values = np.round(values * 255).astype(np.uint8)
    inp = write_input(mem_url("in") + "/p", values, chunks=(16, 16, 16))
    config = make_config(inp, mem_url("out"), chunk_size=block, connectivity=conn,
                         thres_small_instances=min_size, thres_foreground=thres)
    run_sharded(config, shards)
    np.testing.assert_array_equal(read_output(config), reference_labels(values, thres, conn, min_size))


@pytest.mark.parametrize(
    ("a", "b", "joined"),
    [
        # across a face, diagonally in the face plane (an 18- and 26-neighbour)
        ((1, 0, 0), (2, 1, 0), {6: False, 18: True, 26: True}),
        # across an edge of four blocks
        ((1, 1, 0), (2, 2, 0), {6: False, 18: True, 26: True}),
        ((1, 2, 0), (2, 1, 0), {6: False, 18: True, 26: True}),
        # across a corner of eight blocks
        ((1, 1, 1), (2, 2, 2), {6: False, 18: False, 26: True}),
        ((1, 2, 1), (2, 1, 2), {6: False, 18: False, 26: True}),
        ((2, 1, 1), (1, 2, 2), {6: False, 18: False, 26: True}),
        # across a face, straight (every connectivity)
        ((1, 1, 1), (2, 1, 1), {6: True, 18: True, 26: True}),
    ],
)
@pytest.mark.parametrize("conn", [6, 18, 26])
def test_edge_and_corner_contacts(a, b, joined, conn):
    values = np.zeros((4, 4, 4), np.float32)
    values[a] = values[b] = 1.0
    config = make_config(write_input(mem_url("in") + "/p", values), mem_url("out"),
                         chunk_size=(2, 2, 2), connectivity=conn, thres_small_instances=0)
    label(config)
    out = read_output(config)
    expected = reference_labels(values, 0.5, conn, 0)
    np.testing.assert_array_equal(out, expected)
    assert (out[a] == out[b]) == joined[conn]
    assert out.max() == (1 if joined[conn] else 2)


@pytest.mark.parametrize("conn", [6, 18, 26])
def test_blocks_one_voxel_thick(conn):
    # the last block in each axis is one voxel thick (cc3d 4.1 fails on such blocks at 26)
    values = random_volume(np.random.default_rng(conn), (9, 13, 5), 0.5)
    config = make_config(write_input(mem_url("in") + "/p", values), mem_url("out"),
                         chunk_size=(4, 4, 4), connectivity=conn, thres_small_instances=0)
    label(config)
    np.testing.assert_array_equal(read_output(config), reference_labels(values, 0.5, conn, 0))


def test_thresholds_on_uint8_are_exact():
    values = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    values = np.ascontiguousarray(values[:, ::-1])  # not sorted in C order
    for thres in (0.0, 0.2, 1 / 3, 0.5, 0.6, 51 / 255, 0.999, 1.0):
        config = make_config(write_input(mem_url("in") + "/p", values), mem_url("out"),
                             chunk_size=(2, 3, 5), connectivity=6, thres_small_instances=0,
                             thres_foreground=thres)
        label(config)
        out = read_output(config)
        np.testing.assert_array_equal(out > 0, binarise(values, thres), err_msg=f"thres {thres}")
        np.testing.assert_array_equal(out, reference_labels(values, thres, 6, 0))


def test_float_threshold_is_exact_near_the_threshold():
    t = 0.3  # not representable: float32(0.3) > 0.3
    near = np.array([np.nextafter(np.float32(t), np.float32(0)), np.float32(t),
                     np.nextafter(np.float32(t), np.float32(1))], np.float32)
    values = np.tile(near, (3, 3, 1)).reshape(3, 3, 3)
    config = make_config(write_input(mem_url("in") + "/p", values), mem_url("out"),
                         chunk_size=(2, 2, 2), thres_small_instances=0, thres_foreground=t)
    label(config)
    np.testing.assert_array_equal(read_output(config) > 0, values.astype(np.float64) > t)


# --- phases, resume, waiting ---------------------------------------------------------------


def _volume(seed: int = 0, shape=(23, 30, 27)) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    v = gaussian_filter(rng.random(shape).astype(np.float32), 1.5)
    return (v - v.min()) / (v.max() - v.min())


def test_all_equals_phases_and_rerun_is_a_no_op():
    values = _volume()
    inp = write_input(mem_url("in") + "/p", values, chunks=(8, 8, 8))
    a = make_config(inp, mem_url("out"), chunk_size=(8, 8, 8), thres_small_instances=10)
    b = make_config(inp, mem_url("out"), chunk_size=(8, 8, 8), thres_small_instances=10)
    summary = label(a)
    run_sharded(b, 3)
    np.testing.assert_array_equal(read_output(a), read_output(b))
    np.testing.assert_array_equal(read_output(a), reference_labels(values, 0.5, 26, 10))
    assert summary.num_objects == read_output(a).max()
    # `all` cleaned up behind itself and a rerun does nothing
    task = label_module._LabelTask(a, 1)
    assert task.store.read_complete(task.spec.run_id)["num_objects"] == summary.num_objects
    assert not storage.exists(task.url("blocks"))
    assert storage.exists(task.store.url("config.yaml"))
    again = label(a)
    assert again.blocks_computed == 0 and again.num_objects == summary.num_objects
    # the same output asked for with other settings is refused, naming the field
    changed = a.model_copy(update={"thres_small_instances": 11})
    with pytest.raises(ConfigError, match="thres_small_instances"):
        label(changed)
    label(changed, overwrite=True)
    np.testing.assert_array_equal(read_output(changed), reference_labels(values, 0.5, 26, 11))


def test_resume_skips_done_blocks_and_overwrite_recomputes(monkeypatch):
    values = _volume(1)
    inp = write_input(mem_url("in") + "/p", values, chunks=(8, 8, 8))
    config = make_config(inp, mem_url("out"), chunk_size=(8, 8, 8), thres_small_instances=5)
    calls = []
    real = label_module.connected_components
    monkeypatch.setattr(label_module, "connected_components",
                        lambda m, c: (calls.append(1), real(m, c))[1])
    num_blocks = 3 * 4 * 4
    label(config, phase="blocks", shard_index=0, num_shards=2)
    first = len(calls)
    assert first == num_blocks // 2
    assert label(config, phase="blocks", shard_index=0, num_shards=2).blocks_skipped == first
    assert len(calls) == first
    label(config, phase="blocks", shard_index=1, num_shards=2)
    assert len(calls) == num_blocks
    label(config, phase="blocks", shard_index=0, num_shards=2, overwrite=True)
    assert len(calls) == num_blocks + first
    label(config, phase="merge")
    label(config, phase="relabel")
    label(config, phase="clean")
    np.testing.assert_array_equal(read_output(config), reference_labels(values, 0.5, 26, 5))


def test_a_killed_blocks_phase_leaves_no_block_marked_done_without_its_data(monkeypatch):
    values = _volume(2)
    inp = write_input(mem_url("in") + "/p", values, chunks=(8, 8, 8))
    config = make_config(inp, mem_url("out"), chunk_size=(8, 8, 8))
    real_write = storage.write_bytes

    def failing(url, data, options=None):
        if url.endswith("/data/5.npz"):
            raise StorageError("simulated crash while writing block 5")
        return real_write(url, data, options)

    monkeypatch.setattr(storage, "write_bytes", failing)
    with pytest.raises(StorageError, match="simulated"):
        label(config, phase="blocks", num_threads=1)
    monkeypatch.setattr(storage, "write_bytes", real_write)
    task = label_module._LabelTask(config, 1)
    done = task.store.markers(task.spec.run_id, "blocks").done_indices()
    assert 5 not in done and done  # the blocks before it are done, the failed one is not
    for i in done:
        assert storage.exists(task.block_data(i))
    summary = label(config)
    assert summary.blocks_skipped == len(done)
    np.testing.assert_array_equal(read_output(config), reference_labels(values, 0.5, 26, 100))


def test_missing_previous_phase_is_a_clear_error():
    values = _volume(3, shape=(10, 10, 10))
    config = make_config(write_input(mem_url("in") + "/p", values), mem_url("out"), chunk_size=(4, 4, 4))
    with pytest.raises(PhaseError, match="blocks phase .* not complete: missing block 0"):
        label(config, phase="merge")
    with pytest.raises(PhaseError, match="merge .* not complete"):
        label(config, phase="relabel", wait_timeout=0.3)
    label(config, phase="blocks", shard_index=0, num_shards=2)
    with pytest.raises(PhaseError, match="missing block 1, block 3"):
        label(config, phase="merge", wait_timeout=0.3)
    label(config, phase="blocks", shard_index=1, num_shards=2)
    with pytest.raises(ConfigError, match="thres_foreground"):
        label(config.model_copy(update={"thres_foreground": 0.7}), phase="merge")
    label(config, phase="merge")
    with pytest.raises(PhaseError, match="relabel phase is not complete"):
        label(config, phase="clean")


def _write_yaml(path: Path, config: LabelConfig) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def _start(args: list[str], env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "catena_mito", "label", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _run_all_phases_concurrently(cfg: Path, shards: int, env=None) -> None:
    """Start every shard of every phase at once, as Kubernetes Jobs created together."""
    procs = [_start(["--config", str(cfg), "--phase", "blocks", "--shard-index", str(i),
                     "--num-shards", str(shards)], env) for i in range(shards)]
    procs.append(_start(["--config", str(cfg), "--phase", "merge", "--wait-timeout", "120"], env))
    procs += [_start(["--config", str(cfg), "--phase", "relabel", "--shard-index", str(i),
                      "--num-shards", str(shards), "--wait-timeout", "120"], env) for i in range(shards)]
    outputs = [(p.communicate(timeout=300)[0].decode(), p.returncode) for p in procs]
    for text, rc in outputs:
        assert rc == 0, text


@pytest.mark.slow
def test_concurrent_shard_processes_local(tmp_path):
    values = _volume(4, shape=(30, 34, 31))
    inp = write_input(str(tmp_path / "in.zarr" / "p"), values, chunks=(8, 8, 8))
    out = str(tmp_path / "out.zarr")
    config = make_config(inp, out, chunk_size=(8, 16, 8), thres_small_instances=8, connectivity=18)
    _run_all_phases_concurrently(_write_yaml(tmp_path / "label.yaml", config), 2)
    np.testing.assert_array_equal(read_output(config), reference_labels(values, 0.5, 18, 8))
    # and the CLI's clean phase
    result = subprocess.run([sys.executable, "-m", "catena_mito", "label", "--config",
                             str(tmp_path / "label.yaml"), "--phase", "clean"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    task = label_module._LabelTask(config, 1)
    assert task.store.read_complete(task.spec.run_id) is not None
    assert not Path(task.url("blocks")).exists()


def test_cli_missing_phase_is_one_line_and_nonzero(tmp_path):
    values = _volume(5, shape=(8, 8, 8))
    inp = write_input(str(tmp_path / "in.zarr" / "p"), values)
    cfg = _write_yaml(tmp_path / "label.yaml", make_config(inp, str(tmp_path / "out.zarr"), chunk_size=4))
    result = subprocess.run([sys.executable, "-m", "catena_mito", "label", "--config", str(cfg),
                             "--phase", "merge"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert "error: the label blocks phase" in result.stderr and "missing block 0" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.s3
@pytest.mark.slow
def test_concurrent_shard_processes_s3(tmp_path, s3_env):
    bucket = s3_env.make_bucket("label")
    values = _volume(6, shape=(26, 30, 21))
    inp = write_input(f"s3://{bucket}/in.zarr/p", values, chunks=(8, 8, 8))
    config = make_config(inp, f"s3://{bucket}/out.zarr", chunk_size=(8, 8, 8), thres_small_instances=6)
    _run_all_phases_concurrently(_write_yaml(tmp_path / "label.yaml", config), 2, env=dict(os.environ))
    np.testing.assert_array_equal(read_output(config), reference_labels(values, 0.5, 26, 6))
    saved = storage.read_bytes(f"s3://{bucket}/out.zarr/.catena/label/mito_instances/config.yaml").decode()
    assert s3_env.secret not in saved


@pytest.mark.s3
def test_s3_wrong_credentials_are_refused(s3_server):
    bucket = s3_server.make_bucket("creds")
    values = _volume(7, shape=(8, 8, 8))
    inp = write_input(f"s3://{bucket}/in.zarr/p", values, storage_options=s3_server.storage_options)
    wrong = {**s3_server.storage_options, "secret": "not-the-secret"}
    config = make_config(inp, f"s3://{bucket}/out.zarr", chunk_size=4, storage_options=wrong)
    with pytest.raises(CatenaError) as info:
        label(config)
    assert "not-the-secret" not in str(info.value)
    good = config.model_copy(update={"storage_options": s3_server.storage_options})
    label(good)
    np.testing.assert_array_equal(read_output(good), reference_labels(values, 0.5, 26, 100))


# --- scaling, TIFF, errors -----------------------------------------------------------------


@settings(max_examples=6, deadline=None)
@given(factors=st.tuples(*[st.sampled_from([0.25, 0.5, 0.7, 1.0, 1.5, 2.0])] * 3),
       block=st.tuples(*[st.integers(3, 9)] * 3), shards=st.integers(1, 3))
def test_scale_factors_equal_resampling_the_whole_output(factors, block, shards):
    values = _volume(8, shape=(17, 14, 19))
    inp = write_input(mem_url("in") + "/p", values, chunks=(8, 8, 8), resolution=(10.0, 4.0, 4.0))
    config = make_config(inp, mem_url("out"), chunk_size=block, scale_factors=factors,
                         thres_small_instances=3)
    run_sharded(config, shards)
    out_arr = storage.open_array(storage.join_url(config.output_instance_dir, "mito_instances"))
    expected = resample(reference_labels(values, 0.5, 26, 3), factors)
    np.testing.assert_array_equal(out_arr[...], expected)
    assert tuple(out_arr.chunks) == tuple(block)
    assert out_arr.attrs["resolution"] == pytest.approx([10.0 / factors[0], 4.0 / factors[1], 4.0 / factors[2]])


def test_tiff_in_and_out(tmp_path):
    values = np.round(_volume(9, shape=(13, 21, 17)) * 255).astype(np.uint8)
    storage.write_tiff(str(tmp_path / "probs.tif"), values, resolution=(30.0, 6.0, 6.0))
    config = make_config(str(tmp_path / "probs.tif"), str(tmp_path / "out"), output_format="tiff",
                         chunk_size=(5, 8, 6), thres_small_instances=4, scale_factors=(1.0, 0.5, 0.5))
    summary = label(config)
    data, meta = storage.read_tiff(str(tmp_path / "out" / "mito_instances.tif"))
    expected = resample(reference_labels(values, 0.5, 26, 4), (1.0, 0.5, 0.5))
    np.testing.assert_array_equal(data, expected)
    assert data.dtype == np.uint32 and summary.num_objects == expected.max()
    assert list(meta["resolution"]) == [30.0, 12.0, 12.0]


def test_tiff_output_too_large_is_refused_before_any_work(tmp_path, monkeypatch):
    values = _volume(10, shape=(10, 10, 10))
    inp = write_input(str(tmp_path / "in.zarr" / "p"), values)
    config = make_config(inp, str(tmp_path / "out"), output_format="tiff", chunk_size=4)
    monkeypatch.setenv(label_module.TIFF_LIMIT_ENV, "3999")  # 10³ uint32 = 4000 bytes
    with pytest.raises(OutputTooLargeError, match="use output_format: zarr"):
        label(config)
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv(label_module.TIFF_LIMIT_ENV, "4000")
    label(config)
    with pytest.raises(CatenaError, match="one process"):
        label(config, phase="relabel", shard_index=0, num_shards=2, overwrite=True)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (np.zeros((4, 4), np.float32), "2 dimensions"),
        (np.zeros((2, 4, 4, 4), np.float32), "4 dimensions"),
        (np.zeros((4, 4, 4), np.int16), "dtype int16"),
    ],
)
def test_bad_inputs_are_data_errors(values, match):
    inp = write_input(mem_url("in") + "/p", values)
    with pytest.raises(DataError, match=match) as info:
        label(make_config(inp, mem_url("out"), chunk_size=4))
    assert "/p" in str(info.value)


def test_nan_probabilities_are_a_data_error_naming_the_block():
    values = np.zeros((6, 6, 6), np.float32)
    values[5, 1, 2] = np.nan
    inp = write_input(mem_url("in") + "/p", values)
    with pytest.raises(DataError, match=r"NaN .*|at \[4:6, 0:4, 0:4\]") as info:
        label(make_config(inp, mem_url("out"), chunk_size=4))
    assert "[4:6, 0:4, 0:4]" in str(info.value) and "NaN" in str(info.value)


def test_tiff_input_must_be_3d(tmp_path):
    storage.write_tiff(str(tmp_path / "flat.tif"), np.zeros((5, 6), np.float32))
    with pytest.raises(DataError, match="flat.tif.*2 dimensions"):
        label(make_config(str(tmp_path / "flat.tif"), str(tmp_path / "out")))
