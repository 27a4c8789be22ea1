"""predict: block-wise, sharded, resumable output equal to the whole-volume reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from catena_mito import storage
from catena_mito.checkpoint import make_payload, save_checkpoint
from catena_mito.config import PredictConfig, config_from_dict
from catena_mito.errors import CheckpointError, ConfigError, DataError
from catena_mito.exchange import whole_volume_predict
from catena_mito.inference import ModelRunner, sliding_window_predict
from catena_mito.models import build_model
from catena_mito.predict import output_urls, predict, run_store
from catena_mito.preprocess import preprocess_volume, resample

SHAPE = (20, 36, 44)  # z, y, x: not multiples of the stride or of the blocks
PATCH = (8, 16, 16)
MODEL_PARAMS = {"channels": (4, 8), "strides": (2,), "num_res_units": 1}


def make_raw(shape=SHAPE, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    smooth = 120 + 60 * np.sin(y / 5.0 + z / 7.0) * np.cos(x / 6.0)
    return np.clip(smooth + rng.normal(0, 15, shape), 0, 255).astype(np.uint8)


def write_dataset(url: str, raw: np.ndarray, resolution=(8.0, 8.0, 8.0)) -> str:
    storage.create_array(
        storage.join_url(url, storage.RAW_PATH), raw.shape, raw.dtype, (8, 16, 16),
        attrs=storage.spatial_attrs(resolution, (0, 0, 0)),
    )[...] = raw
    return url


def deterministic_model() -> torch.nn.Module:
    """A tiny monai_unet with fixed weights, in eval mode (also used by test_indexed_jobs)."""
    torch.manual_seed(0)
    model = build_model("monai_unet", **MODEL_PARAMS)
    # non-trivial batch-norm statistics so the output is not ~0.5 everywhere
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.05, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def model_and_ckpt(tmp_path_factory):
    model = deterministic_model()
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pth")
    train_cfg = {"patch_size": list(PATCH), "stride": [4, 8, 8], "clahe": False,
                 "original_res": None, "target_res": None, "label_type": "mito"}
    save_checkpoint(path, make_payload("monai_unet", MODEL_PARAMS, model, epoch=1, config=train_cfg))
    return model, path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    raw = make_raw()
    url = str(tmp_path_factory.mktemp("data") / "vol.zarr")
    write_dataset(url, raw)
    return url, raw


def cfg(ckpt: str, inputs, **kw) -> PredictConfig:
    base = {"model_path": ckpt, "test_zarr_dirs": list(inputs), "device": "cpu",
            "block_shape": [16, 32, 32], "output_chunks": [8, 16, 16], "output_dtype": "float32"}
    base.update(kw)
    return config_from_dict(PredictConfig, base)


_REFERENCE: dict = {}


def exchange_reference(model, vol, stride=(4, 8, 8), **runner):
    """The whole-volume pass of window_sharing exchange (one block), all targets."""
    return whole_volume_predict(ModelRunner(model, batch_size=2, **runner), vol, PATCH, stride)


def reference(model, raw, stride=(4, 8, 8)):
    """The whole-volume in-memory foreground (cached: the model and volumes are module-wide)."""
    key = (id(model), raw.tobytes(), tuple(stride))
    if key not in _REFERENCE:
        _REFERENCE[key] = exchange_reference(model, preprocess_volume(raw), stride)[0]
    return _REFERENCE[key]


def read_output(url: str) -> np.ndarray:
    return storage.open_array(url)[...]


def run_shards(config, num_shards):
    for i in range(num_shards):
        predict(config, shard_index=i, num_shards=num_shards)


# --- equality with the whole-volume reference ---------------------------------------------


@pytest.mark.parametrize(
    "block_shape,num_shards",
    [((8, 16, 16), 4), ((16, 32, 16), 3), ((24, 48, 48), 1), ((8, 32, 48), 2)],
)
def test_blocks_and_shards_equal_reference_exactly(tmp_path, model_and_ckpt, dataset, block_shape, num_shards):
    model, ckpt = model_and_ckpt
    url, raw = dataset
    out_dir = str(tmp_path / "out")
    config = cfg(ckpt, [url], output_dir=out_dir, block_shape=list(block_shape))
    run_shards(config, num_shards)
    out = read_output(output_urls(config)[0])
    ref = reference(model, raw)
    assert out.shape == raw.shape
    np.testing.assert_array_equal(out, ref)  # bitwise: same windows, same order
    arr = storage.open_array(output_urls(config)[0])
    assert arr.attrs["resolution"] == [8.0, 8.0, 8.0] and arr.attrs["offset"] == [0.0, 0.0, 0.0]


def test_separate_processes_concurrently_equal_single_process(tmp_path, model_and_ckpt, dataset):
    """Shards as concurrent `python -m catena_mito predict` processes vs one in-process run."""
    model, ckpt = model_and_ckpt
    url, raw = dataset
    single = cfg(ckpt, [url], output_dir=str(tmp_path / "single"), block_shape=[24, 48, 48])
    predict(single)
    expected = read_output(output_urls(single)[0])
    for num_shards, block in [(2, [8, 16, 16]), (4, [16, 16, 32])]:
        out_dir = tmp_path / f"sharded{num_shards}"
        config_path = tmp_path / f"predict{num_shards}.yaml"
        config_path.write_text(yaml.safe_dump({
            "model_path": ckpt, "test_zarr_dirs": [url], "output_dir": str(out_dir), "device": "cpu",
            "block_shape": block, "output_chunks": [8, 16, 16], "output_dtype": "float32",
        }))
        # Same thread count as this process: oneDNN's convolutions round differently with
        # another number of threads (~1e-7), which bitwise equality cannot absorb.
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "catena_mito", "predict", "--config", str(config_path),
                 "--shard-index", str(i), "--num-shards", str(num_shards)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
            )
            for i in range(num_shards)
        ]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        out = read_output(str(out_dir / "vol.zarr" / "volumes/predictions/mito"))
        np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(expected, reference(model, raw))


def test_uint8_is_round_p_times_255(tmp_path, model_and_ckpt, dataset):
    _, ckpt = model_and_ckpt
    url, _ = dataset
    one = {"block_shape": [24, 48, 48]}
    f32 = cfg(ckpt, [url], output_dir=str(tmp_path / "f"), **one)
    u8 = cfg(ckpt, [url], output_dir=str(tmp_path / "u"), output_dtype="uint8", **one)
    f16 = cfg(ckpt, [url], output_dir=str(tmp_path / "h"), output_dtype="float16", **one)
    for c in (f32, u8, f16):
        predict(c)
    p = read_output(output_urls(f32)[0])
    q = read_output(output_urls(u8)[0])
    h = read_output(output_urls(f16)[0])
    assert q.dtype == np.uint8 and h.dtype == np.float16
    np.testing.assert_array_equal(q, np.rint(p * np.float32(255)).astype(np.uint8))
    np.testing.assert_array_equal(h, p.astype(np.float16))
    assert q.min() < q.max()  # the model is not trivially constant


def test_defaults_come_from_checkpoint_and_stride_is_half_patch(tmp_path, model_and_ckpt, dataset):
    model, ckpt = model_and_ckpt
    url, raw = dataset
    config = cfg(ckpt, [url], output_dir=str(tmp_path / "o"))
    assert config.patch_size is None and config.stride is None
    predict(config)
    saved = yaml.safe_load(Path(output_urls(config)[0], ".catena/predict/config.yaml").read_text())
    assert saved["patch_size"] == list(PATCH) and saved["stride"] == [4, 8, 8]
    assert saved["model_type"] == "monai_unet" and saved["clahe"] is False
    assert saved["original_res"] == [8.0, 8.0, 8.0] == saved["target_res"]


# --- resampling -----------------------------------------------------------------------------


@pytest.mark.parametrize("output_res", ["target", "original"])
def test_resampled_prediction_blocks_equal_reference(tmp_path, model_and_ckpt, output_res):
    model, ckpt = model_and_ckpt
    raw = make_raw((18, 40, 44), seed=3)
    url = write_dataset(str(tmp_path / "fine.zarr"), raw, resolution=(8.0, 4.0, 4.0))
    outs = []
    for block, shards in [((8, 16, 16), 3), ((24, 48, 48), 1)]:
        config = cfg(ckpt, [url], output_dir=str(tmp_path / f"o{shards}"), target_res=[8, 8, 8],
                     output_res=output_res, block_shape=list(block))
        run_shards(config, shards)
        outs.append(read_output(output_urls(config)[0]))
    np.testing.assert_array_equal(outs[0], outs[1])
    pre = preprocess_volume(raw, (8, 4, 4), (8, 8, 8))
    assert pre.shape == (18, 20, 22)
    if output_res == "original":  # resampled back: windows are recomputed per block (documented)
        ref = resample(sliding_window_predict(model, pre, PATCH, (4, 8, 8)), (8, 8, 8), (8, 4, 4), dst_shape=raw.shape)
        assert outs[0].shape == raw.shape
        assert storage.open_array(output_urls(config)[0]).attrs["resolution"] == [8.0, 4.0, 4.0]
    else:
        ref = exchange_reference(model, pre)[0]
        assert storage.open_array(output_urls(config)[0]).attrs["resolution"] == [8.0, 8.0, 8.0]
    np.testing.assert_array_equal(outs[0], ref)


def test_clahe_and_tta_blocks_equal_reference(tmp_path, model_and_ckpt, dataset):
    model, ckpt = model_and_ckpt
    url, raw = dataset
    config = cfg(ckpt, [url], output_dir=str(tmp_path / "o"), clahe=True, tta="flips", num_workers=2)
    run_shards(config, 2)
    ref = exchange_reference(model, preprocess_volume(raw, clahe=True), tta="flips")[0]
    np.testing.assert_array_equal(read_output(output_urls(config)[0]), ref)


# --- resume and overwrite -------------------------------------------------------------------


def test_resume_skips_done_blocks_and_overwrite_recomputes(tmp_path, model_and_ckpt, dataset):
    model, ckpt = model_and_ckpt
    url, raw = dataset
    config = cfg(ckpt, [url], output_dir=str(tmp_path / "o"))
    out_url = output_urls(config)[0]
    first = predict(config)["outputs"][0]
    assert first["blocks_computed"] == first["blocks_total"] == 2 * 2 * 2
    arr = storage.open_array(out_url, mode="r+")
    arr[0:8, 0:16, 0:16] = -1.0  # tamper with a done block
    again = predict(config)["outputs"][0]
    assert again["blocks_computed"] == 0 and again["blocks_skipped"] == 8 and again["windows_run"] == 0
    assert (read_output(out_url)[0:8, 0:16, 0:16] == -1).all()
    redo = predict(config, overwrite=True)["outputs"][0]
    assert redo["blocks_computed"] == 8
    np.testing.assert_array_equal(read_output(out_url), reference(model, raw))


def test_overwrite_clears_only_this_shards_markers(tmp_path, model_and_ckpt, dataset):
    _, ckpt = model_and_ckpt
    url, _ = dataset
    config = cfg(ckpt, [url], output_dir=str(tmp_path / "o"))
    run_shards(config, 2)
    markers = run_store(output_urls(config)[0]).current_markers("predict")
    assert markers.done_indices() == set(range(8))
    markers.clear([0])  # shard 0's block 0 "lost": overwrite of shard 1 must not touch it
    res = predict(config, shard_index=1, num_shards=2, overwrite=True)["outputs"][0]
    assert res["blocks_computed"] == 4  # the odd indices of 8
    assert markers.done_indices() == set(range(1, 8))


def _killed_at_call(n: int, encode):
    """``encode`` that raises KeyboardInterrupt (a killed worker) at its ``n``-th call."""
    calls = []

    def failing(probs, dtype):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt("killed")
        return encode(probs, dtype)

    return failing


def test_killed_worker_leaves_no_false_marker_and_rerun_completes(tmp_path, model_and_ckpt, dataset, monkeypatch):
    model, ckpt = model_and_ckpt
    url, raw = dataset
    config = cfg(ckpt, [url], output_dir=str(tmp_path / "o"))
    import catena_mito.predict as pm

    with monkeypatch.context() as m:
        m.setattr(pm, "encode", _killed_at_call(4, pm.encode))
        with pytest.raises(KeyboardInterrupt):
            predict(config)
    markers = run_store(output_urls(config)[0]).current_markers("predict")
    assert markers.done_indices() == {0, 1, 2}
    res = predict(config)["outputs"][0]
    assert res["blocks_computed"] == 5
    np.testing.assert_array_equal(read_output(output_urls(config)[0]), reference(model, raw))


# --- outputs --------------------------------------------------------------------------------


def test_default_output_goes_into_input_store(tmp_path, model_and_ckpt):
    _, ckpt = model_and_ckpt
    url = write_dataset(str(tmp_path / "in.zarr"), make_raw())
    config = cfg(ckpt, [url], label_type="mito")
    predict(config)
    assert storage.array_exists(f"{url}/volumes/predictions/mito")


def test_several_inputs_one_output_each_and_collisions(tmp_path, model_and_ckpt):
    _, ckpt = model_and_ckpt
    a = write_dataset(str(tmp_path / "a" / "x.zarr"), make_raw(seed=1))
    b = write_dataset(str(tmp_path / "b" / "y.zarr"), make_raw(seed=2))
    config = cfg(ckpt, [a, b], output_dir=str(tmp_path / "out"))
    assert output_urls(config) == [str(tmp_path / "out/x.zarr/volumes/predictions/mito"),
                                   str(tmp_path / "out/y.zarr/volumes/predictions/mito")]
    res = predict(config)
    assert len(res["outputs"]) == 2
    assert not np.array_equal(read_output(output_urls(config)[0]), read_output(output_urls(config)[1]))
    with pytest.raises(ConfigError, match="would both write"):
        output_urls(cfg(ckpt, [a, str(tmp_path / "c" / "x.zarr")], output_dir=str(tmp_path / "out")))
    with pytest.raises(ConfigError, match="one Zarr store"):
        output_urls(cfg(ckpt, [a, b], output_dir=str(tmp_path / "out.zarr")))
    single = cfg(ckpt, [a], output_dir=str(tmp_path / "one.zarr"), output_filename="probs")
    assert output_urls(single) == [str(tmp_path / "one.zarr/probs")]


def test_tiff_output_equals_zarr_and_refuses_shards_and_large(tmp_path, model_and_ckpt, dataset, monkeypatch):
    _, ckpt = model_and_ckpt
    url, _ = dataset
    zarr_cfg = cfg(ckpt, [url], output_dir=str(tmp_path / "z"), output_dtype="uint8")
    tiff_cfg = cfg(ckpt, [url], output_dir=str(tmp_path / "t"), output_format="tiff", output_dtype="uint8")
    predict(zarr_cfg)
    predict(tiff_cfg)
    tif_url = output_urls(tiff_cfg)[0]
    assert tif_url.endswith("vol_mito_predictions.tif")
    data, meta = storage.read_tiff(tif_url)
    np.testing.assert_array_equal(data, read_output(output_urls(zarr_cfg)[0]))
    assert meta["resolution"] == [8.0, 8.0, 8.0]
    with pytest.raises(ConfigError, match="num_shards must be 1"):
        predict(tiff_cfg, shard_index=0, num_shards=2)
    monkeypatch.setenv("CATENA_TIFF_MAX_BYTES", str(100))
    with pytest.raises(ConfigError, match="in memory"):
        predict(cfg(ckpt, [url], output_dir=str(tmp_path / "t2"), output_format="tiff"))
    assert not (tmp_path / "t2").exists()


def test_resolved_config_redacts_secrets(tmp_path, model_and_ckpt, dataset):
    _, ckpt = model_and_ckpt
    url, _ = dataset
    config = cfg(ckpt, [url], output_dir=str(tmp_path / "o"), storage_options={"secret": "s3cr3t-value"})
    predict(config)
    text = Path(output_urls(config)[0], ".catena/predict/config.yaml").read_text()
    assert "s3cr3t-value" not in text and "REDACTED" in text


# --- errors ---------------------------------------------------------------------------------


def test_missing_checkpoint(tmp_path, dataset):
    url, _ = dataset
    with pytest.raises(CheckpointError, match="not found"):
        predict(cfg(str(tmp_path / "nope.pth"), [url]))


def test_model_type_mismatch_names_both(tmp_path, model_and_ckpt, dataset):
    _, ckpt = model_and_ckpt
    url, _ = dataset
    with pytest.raises(CheckpointError, match="rs_unet.*monai_unet"):
        predict(cfg(ckpt, [url], model_type="rs_unet", output_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("shape", [(36, 44), (2, 20, 36, 44)])
def test_raw_not_3d_is_data_error(tmp_path, model_and_ckpt, shape):
    _, ckpt = model_and_ckpt
    url = str(tmp_path / "bad.zarr")
    storage.create_array(f"{url}/volumes/raw", shape, "uint8", shape)
    with pytest.raises(DataError, match="expected 3"):
        predict(cfg(ckpt, [url], output_dir=str(tmp_path / "o")))


def test_volume_smaller_than_patch(tmp_path, model_and_ckpt):
    _, ckpt = model_and_ckpt
    url = write_dataset(str(tmp_path / "small.zarr"), make_raw((6, 36, 44)))
    with pytest.raises(DataError, match="smaller than patch_size"):
        predict(cfg(ckpt, [url], output_dir=str(tmp_path / "o")))


def test_bad_patch_for_model_and_stride(tmp_path, model_and_ckpt, dataset):
    _, ckpt = model_and_ckpt
    url, _ = dataset
    with pytest.raises(ConfigError, match="patch"):
        predict(cfg(ckpt, [url], patch_size=[7, 16, 16], stride=[4, 8, 8]))
    with pytest.raises(ConfigError, match="stride"):
        predict(cfg(ckpt, [url], stride=[4, 8, 32]))


def test_cli_error_is_one_line(tmp_path, dataset):
    url, _ = dataset
    config_path = tmp_path / "p.yaml"
    config_path.write_text(yaml.safe_dump({"model_path": str(tmp_path / "missing.pth"), "test_zarr_dirs": [url]}))
    proc = subprocess.run([sys.executable, "-m", "catena_mito", "predict", "--config", str(config_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("catena-mito:")]
    assert len(lines) == 1 and "checkpoint not found" in lines[0]
    assert "Traceback" not in proc.stderr


# --- several targets (foreground + contour) ---------------------------------------------------


def legacy_blend(model, vol, patch, stride, batch_size=2):
    """The foreground blend as predict computed it before targets existed, written out
    independently: softmax channel 1 per window, Gaussian weights, float32 sums in C order."""
    from catena_mito.inference import WindowGrid, importance_map

    grid = WindowGrid(vol.shape, patch, stride)
    wins = grid.windows()
    w = importance_map(patch).astype(np.float32)
    num = np.zeros(vol.shape, np.float32)
    den = np.zeros(vol.shape, np.float32)
    with torch.inference_mode():
        for i in range(0, len(wins), batch_size):
            group = wins[i:i + batch_size]
            x = np.stack([vol[r.to_slices()] for r in group])
            x = np.concatenate([x, np.repeat(x[-1:], batch_size - len(x), 0)])
            logits = model(torch.from_numpy(np.ascontiguousarray(x, np.float32))[:, None]).float()
            for j, r in enumerate(group):
                p = torch.softmax(logits[j].contiguous()[None], dim=1)[0, 1].numpy()
                num[r.to_slices()] += w * p
                den[r.to_slices()] += w
    return num / den


def test_single_target_checkpoint_writes_exactly_the_previous_bytes(tmp_path, model_and_ckpt, dataset):
    model, ckpt = model_and_ckpt
    url, raw = dataset
    config = cfg(ckpt, [url], output_dir=str(tmp_path / "o"), block_shape=[8, 16, 16], window_sharing="recompute")
    run_shards(config, 2)
    np.testing.assert_array_equal(read_output(output_urls(config)[0]), legacy_blend(model, preprocess_volume(raw), PATCH, (4, 8, 8)))
    assert not storage.array_exists(output_urls(config)[0] + "_contour")
    attrs = storage.open_array(output_urls(config)[0]).attrs
    assert attrs["catena_target"] == "foreground" and attrs["catena_targets"] == ["foreground"]


@pytest.fixture(scope="module")
def two_target_ckpt(tmp_path_factory):
    torch.manual_seed(1)
    model = build_model("monai_unet", **{**MODEL_PARAMS, "out_channels": 2}).eval()
    path = str(tmp_path_factory.mktemp("ckpt2") / "model.pth")
    train_cfg = {"patch_size": list(PATCH), "stride": [4, 8, 8], "clahe": False}
    payload = make_payload("monai_unet", {**MODEL_PARAMS, "out_channels": 2}, model, epoch=1, config=train_cfg)
    payload["targets"] = ["foreground", "contour"]
    save_checkpoint(path, payload)
    return model, path


def test_two_targets_each_written_beside_the_foreground_sharded_equal_whole(tmp_path, two_target_ckpt, dataset):
    from catena_mito.blockwise.runs import check_input

    model, ckpt = two_target_ckpt
    url, raw = dataset
    ref = exchange_reference(model, preprocess_volume(raw), targets=("foreground", "contour"))
    assert ref.shape == (2, *raw.shape)
    for block, shards in [((8, 16, 16), 3), ((24, 48, 48), 1)]:
        config = cfg(ckpt, [url], output_dir=str(tmp_path / f"o{shards}"), block_shape=list(block))
        run_shards(config, shards)
        fg_url = output_urls(config)[0]
        fg, contour = storage.open_array(fg_url), storage.open_array(fg_url + "_contour")
        np.testing.assert_array_equal(fg[...], ref[0])
        np.testing.assert_array_equal(contour[...], ref[1])
        assert not np.array_equal(ref[0], ref[1])  # two sigmoids, not one softmax
        assert fg.attrs["catena_target"] == "foreground" and contour.attrs["catena_target"] == "contour"
        assert fg.attrs["catena_targets"] == ["foreground", "contour"] and "catena_targets" not in contour.attrs
        assert contour.chunks == fg.chunks and contour.dtype == fg.dtype
        assert contour.attrs["resolution"] == fg.attrs["resolution"]
        run = fg.attrs["catena_run"]
        assert contour.attrs["catena_run"]["run_id"] == run["run_id"]
        # both arrays lead to the one (complete) run record, kept with the foreground
        assert check_input(contour, fg_url + "_contour", "contour")["run_id"] == run["run_id"]
        claim = run_store(fg_url).read_claim()
        assert claim["description"]["settings"]["targets"] == ["foreground", "contour"]


# --- window_sharing exchange: each window once, two phases ------------------------------------


def test_each_window_runs_once_and_dry_run_counts_them(tmp_path, model_and_ckpt, dataset):
    _, ckpt = model_and_ckpt
    url, _ = dataset
    config = cfg(ckpt, [url], output_dir=str(tmp_path / "o"), block_shape=[8, 16, 16])
    plan = predict(config, shard_index=1, num_shards=3, dry_run=True)["outputs"][0]
    assert plan["windows_all_blocks"] == plan["windows_whole_volume"] == 80
    assert plan["window_sharing"] == "exchange" and sum(plan["blocks_per_shard"]) == plan["blocks_total"]
    runs = [predict(config, shard_index=i, num_shards=3)["outputs"][0]["windows_run"] for i in range(3)]
    assert sum(runs) == 80
    recompute = predict(cfg(ckpt, [url], output_dir=str(tmp_path / "r"), block_shape=[8, 16, 16],
                            window_sharing="recompute"), dry_run=True)["outputs"][0]
    assert recompute["windows_all_blocks"] > 2 * 80  # what each-window-once saves here


def test_phases_run_apart_blend_needs_windows_and_pieces_are_removed(tmp_path, model_and_ckpt, dataset):
    from catena_mito.errors import PhaseError

    model, ckpt = model_and_ckpt
    url, raw = dataset
    config = cfg(ckpt, [url], output_dir=str(tmp_path / "o"))
    predict(config, shard_index=0, num_shards=2, phase="windows")
    with pytest.raises(PhaseError, match="windows phase of block .* is not done"):
        predict(config, shard_index=1, num_shards=2, phase="blend")
    predict(config, shard_index=1, num_shards=2, phase="windows")
    store = run_store(output_urls(config)[0])
    spec_id = store.read_claim()["run_id"]
    assert storage.exists(store.run_url(spec_id, "windows", "pieces"))
    for i in (1, 0):  # any order once every block's windows are done
        predict(config, shard_index=i, num_shards=2, phase="blend")
    np.testing.assert_array_equal(read_output(output_urls(config)[0]), reference(model, raw))
    assert store.read_complete(spec_id) is not None
    assert not storage.exists(store.run_url(spec_id, "windows", "pieces"))


def test_a_shard_ahead_of_lower_ones_computes_their_overlap_and_stays_exact(tmp_path, model_and_ckpt, dataset):
    model, ckpt = model_and_ckpt
    url, raw = dataset
    config = cfg(ckpt, [url], output_dir=str(tmp_path / "o"), block_shape=[8, 16, 16])
    last = predict(config, shard_index=2, num_shards=3)["outputs"][0]  # its lower neighbours never ran
    assert last["blocks_computed"] == last["blocks_in_shard"]
    runs = [last["windows_run"]] + [predict(config, shard_index=i, num_shards=3)["outputs"][0]["windows_run"]
                                    for i in (0, 1)]
    assert sum(runs) > 80  # the overlap computed twice, but
    np.testing.assert_array_equal(read_output(output_urls(config)[0]), reference(model, raw))  # same bytes


@pytest.mark.parametrize("hold_blocks,num_shards", [(0, 1), (4, 1), (0, 2), (100, 3)])
def test_one_pass_holds_or_stores_each_spill_and_stays_exact(tmp_path, model_and_ckpt, dataset, monkeypatch,
                                                             hold_blocks, num_shards):
    """--phase all runs each block's windows and blend in one pass: spills for the next
    blocks of the shard in memory (at most HOLD_BLOCKS blocks' worth of sums), the others
    stored; the bytes are those of the whole-volume reference either way."""
    import catena_mito.exchange_onepass as op

    model, ckpt = model_and_ckpt
    url, raw = dataset
    monkeypatch.setattr(op, "HOLD_BLOCKS", hold_blocks)
    most_held, infos = [0], {}
    real_compute, real_put = op.OnePass.compute, op.PieceStore.put

    def compute(self, block, data):
        out = real_compute(self, block, data)
        held = sum(a.nbytes for m in self.made.values() for _, a in m.held.values())
        most_held[0] = max(most_held[0], held)
        return out

    def put(self, index, pieces):
        infos.setdefault(index, set()).update(op.kind_name(k) for k in pieces)
        return real_put(self, index, pieces)

    monkeypatch.setattr(op.OnePass, "compute", compute)
    monkeypatch.setattr(op.PieceStore, "put", put)
    config = cfg(ckpt, [url], output_dir=str(tmp_path / "o"), block_shape=[8, 16, 16])  # 3 x 3 x 3 blocks
    run_shards(config, num_shards)
    np.testing.assert_array_equal(read_output(output_urls(config)[0]), reference(model, raw))
    block = 8 * 16 * 16 * 8  # one target's int64 sums of one block
    assert most_held[0] <= max(1, hold_blocks) * block
    stored = set().union(*infos.values()) if infos else set()
    assert "000" not in stored  # a block's own core never leaves the process
    if num_shards == 1 and hold_blocks == 0:  # reach 1: only the spill onto the next block in x is held
        assert stored == {"010", "011", "100", "101", "110", "111"}
    if num_shards == 1 and hold_blocks >= 4:
        assert "001" not in stored and most_held[0] > 0
    store = run_store(output_urls(config)[0])
    run_id = store.read_claim()["run_id"]
    assert store.read_complete(run_id) is not None
    assert not storage.exists(store.run_url(run_id, "windows", "pieces"))  # removed once complete


def test_interrupted_one_pass_resumes_exactly_and_the_blend_alone_refuses(tmp_path, model_and_ckpt, dataset,
                                                                          monkeypatch):
    import catena_mito.predict as pm
    from catena_mito.errors import PhaseError

    model, ckpt = model_and_ckpt
    url, raw = dataset
    config = cfg(ckpt, [url], output_dir=str(tmp_path / "o"), block_shape=[8, 16, 16])
    with monkeypatch.context() as m:
        m.setattr(pm, "encode", _killed_at_call(6, pm.encode))
        with pytest.raises(KeyboardInterrupt):
            predict(config)
    store = run_store(output_urls(config)[0])
    windows = store.current_markers("windows")
    assert windows.done_indices() == set(range(5))
    assert "001" in windows.read(0)["held"]  # kept in memory for block 1: lost with the process
    rest = predict(config, phase="windows")["outputs"][0]  # the rest of the windows, every piece stored
    with pytest.raises(PhaseError, match="interrupted --phase all"):
        predict(config, phase="blend")
    res = predict(config)["outputs"][0]  # --phase all computes the lost overlaps again
    assert res["blocks_computed"] == 27 - 5
    np.testing.assert_array_equal(read_output(output_urls(config)[0]), reference(model, raw))
    # ... from the windows of blocks 0-4 alone (for their held spills): blocks 5-26 were
    # stored whole by --phase windows and are only blended, not run again
    whole = predict(cfg(ckpt, [url], output_dir=str(tmp_path / "fresh"), block_shape=[8, 16, 16]))
    assert 0 < res["windows_run"] < whole["outputs"][0]["windows_run"] - rest["windows_run"]


def test_phase_all_after_phase_windows_only_blends(tmp_path, model_and_ckpt, dataset):
    """Windows stored whole by a --phase windows run are not run again by --phase all."""
    model, ckpt = model_and_ckpt
    url, raw = dataset
    config = cfg(ckpt, [url], output_dir=str(tmp_path / "o"), block_shape=[8, 16, 16])
    for shard in range(2):
        predict(config, shard_index=shard, num_shards=2, phase="windows")
    first = predict(config, shard_index=0, num_shards=2)["outputs"][0]
    assert first["windows_run"] == 0 and first["blocks_computed"] == first["blocks_in_shard"]
    second = predict(config, shard_index=1, num_shards=2)["outputs"][0]
    assert second["windows_run"] == 0
    np.testing.assert_array_equal(read_output(output_urls(config)[0]), reference(model, raw))
    store = run_store(output_urls(config)[0])
    assert store.read_complete(store.read_claim()["run_id"]) is not None


def test_bf16_and_channels_last_on_cpu_sharded_equal_single(tmp_path, model_and_ckpt, dataset):
    _, ckpt = model_and_ckpt
    url, _ = dataset
    outs = []
    for block, shards in [((8, 16, 16), 3), ((24, 48, 48), 1)]:
        config = cfg(ckpt, [url], output_dir=str(tmp_path / f"o{shards}"), block_shape=list(block),
                     precision="bf16", channels_last=True)
        run_shards(config, shards)
        outs.append(read_output(output_urls(config)[0]))
        assert run_store(output_urls(config)[0]).read_claim()["description"]["settings"]["precision"] == "bf16"
    np.testing.assert_array_equal(outs[0], outs[1])
    with pytest.raises(ConfigError, match="amp and precision"):
        cfg(ckpt, [url], precision="bf16", amp=False)
