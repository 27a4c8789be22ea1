"""Pipeline integrity: a stale or partial output never looks current.

The seven cases of the pipeline-integrity issue, each on local storage and on the
SeaweedFS S3 server (the plan and settings cases, 2, 5 and 6, on local storage only: the
store plays no part in them): every one either recomputes and gives the bytes of a fresh run, or
is refused with one line naming what changed (and, with ``--overwrite``, then gives the
fresh run's bytes). Plus ``status``, ``--dry-run`` and two single-process phases at once.
"""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest
import torch
from test_predict import MODEL_PARAMS, PATCH, deterministic_model, make_raw, write_dataset

from catena_mito import storage
from catena_mito.checkpoint import make_payload, save_checkpoint
from catena_mito.config import LabelConfig, PredictConfig, config_from_dict
from catena_mito.errors import IncompleteInputError, PhaseError, RunMismatchError
from catena_mito.label import label
from catena_mito.predict import output_urls, predict, run_store
from catena_mito.preview import preview
from catena_mito.status import format_status, status

SHAPE = (16, 32, 48)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    s3 = request.getfixturevalue("s3_env")
    return f"s3://{s3.make_bucket('integrity')}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoints of the same architecture with different weights."""
    folder = tmp_path_factory.mktemp("ckpts")
    paths = []
    for k in range(2):
        model = deterministic_model()
        if k:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.5)
        path = str(folder / f"model{k}.pth")
        train_cfg = {"patch_size": list(PATCH), "stride": list(PATCH), "clahe": False,
                     "original_res": None, "target_res": None, "label_type": "mito"}
        save_checkpoint(path, make_payload("monai_unet", MODEL_PARAMS, model, epoch=1, config=train_cfg))
        paths.append(path)
    return paths


def _dataset(base: str, name: str = "vol") -> str:
    return write_dataset(storage.join_url(base, f"{name}-{uuid.uuid4().hex[:6]}.zarr"), make_raw(SHAPE))


def pcfg(ckpt: str, url: str, **kw) -> PredictConfig:
    data = {"model_path": ckpt, "test_zarr_dirs": [url], "device": "cpu", "stride": list(PATCH),
            "block_shape": [8, 16, 16], "output_chunks": [8, 16, 16], "output_dtype": "uint8"}
    data.update(kw)
    return config_from_dict(PredictConfig, data)


def lcfg(pred_url: str, out: str, **kw) -> LabelConfig:
    data = {"input_prediction_path": pred_url, "output_instance_dir": out, "chunk_size": [8, 16, 16],
            "thres_small_instances": 0, "thres_foreground": 0.5}
    data.update(kw)
    return config_from_dict(LabelConfig, data)


def read(url: str) -> np.ndarray:
    return storage.open_array(url)[...]


def fresh_predict(base: str, config: PredictConfig) -> np.ndarray:
    """The bytes of a fresh run of ``config`` into a new output folder."""
    other = config.model_copy(update={"output_dir": storage.join_url(base, f"fresh-{uuid.uuid4().hex[:6]}")})
    predict(other)
    return read(output_urls(other)[0])


def run_shards(config: PredictConfig, n: int, **kw) -> None:
    for i in range(n):
        predict(config, shard_index=i, num_shards=n, **kw)


# --- the seven cases ---------------------------------------------------------------------------


def test_1_other_checkpoint_is_refused_then_overwrite_recomputes(base, checkpoints):
    url = _dataset(base)
    a = pcfg(checkpoints[0], url)
    predict(a)
    b = pcfg(checkpoints[1], url)
    with pytest.raises(RunMismatchError, match=r"inputs\.model\.sha256: sha256:.* -> sha256:.*--overwrite"):
        predict(b)
    summary = predict(b, overwrite=True)
    assert summary["outputs"][0]["blocks_computed"] == summary["outputs"][0]["blocks_total"]
    np.testing.assert_array_equal(read(output_urls(b)[0]), fresh_predict(base, b))
    assert not np.array_equal(read(output_urls(b)[0]), fresh_predict(base, a))


def test_2_other_block_plan_is_refused(tmp_path, checkpoints):
    base = str(tmp_path)
    url = _dataset(base)
    predict(pcfg(checkpoints[0], url))
    other = pcfg(checkpoints[0], url, block_shape=[16, 16, 16])
    with pytest.raises(RunMismatchError, match=r"plan\.block_shape: \[8,16,16\] -> \[16,16,16\]"):
        predict(other)
    summary = predict(other, overwrite=True)
    assert summary["outputs"][0]["blocks_skipped"] == 0
    np.testing.assert_array_equal(read(output_urls(other)[0]), fresh_predict(base, other))


def test_3_label_after_the_prediction_changed_is_refused(base, checkpoints):
    url = _dataset(base)
    pred = pcfg(checkpoints[0], url)
    predict(pred)
    lab = lcfg(output_urls(pred)[0], url)
    label(lab)
    first = read(storage.join_url(url, "mito_instances"))
    predict(pcfg(checkpoints[1], url), overwrite=True)  # the prediction is rewritten
    # the instances are now stale: consumers see it, and label refuses to call them current
    with pytest.raises(IncompleteInputError, match="is stale: .* computed from prediction"):
        preview(None, storage.join_url(base, "previews/"), instances=storage.join_url(url, "mito_instances"))
    with pytest.raises(RunMismatchError, match=r"inputs\.prediction\.run_id"):
        label(lab)
    label(lab, overwrite=True)
    fresh = lcfg(output_urls(pred)[0], storage.join_url(base, f"fresh-{uuid.uuid4().hex[:6]}.zarr"))
    label(fresh)
    np.testing.assert_array_equal(read(storage.join_url(url, "mito_instances")),
                                  read(storage.join_url(fresh.output_instance_dir, "mito_instances")))
    assert not np.array_equal(first, read(storage.join_url(url, "mito_instances")))


def test_3b_a_foreign_rewrite_of_the_prediction_is_seen(base, checkpoints):
    url = _dataset(base)
    pred = pcfg(checkpoints[0], url)
    predict(pred)
    pred_url = output_urls(pred)[0]
    lab = lcfg(pred_url, url)
    label(lab)
    values = read(pred_url)
    # another tool rewrites the array: same shape and dtype, new values, its own metadata
    arr = storage.create_array(pred_url, values.shape, values.dtype, (8, 16, 16), overwrite=True)
    storage.open_array(pred_url, mode="r+").attrs.clear()
    arr[...] = 255 - values
    with pytest.raises(RunMismatchError, match=r"inputs\.prediction\.kind: catena -> foreign"):
        label(lab)


def test_4_label_of_a_partial_prediction_is_refused(base, checkpoints, caplog):
    url = _dataset(base)
    pred = pcfg(checkpoints[0], url)
    predict(pred, shard_index=0, num_shards=2)  # shard 1 never runs
    lab = lcfg(output_urls(pred)[0], url)
    with pytest.raises(IncompleteInputError, match=r"incomplete .*predict: 6 of 12 blocks missing, owned by "
                                                   r"shard 1 of 2 \(never started\).*--allow-incomplete"):
        label(lab)
    assert not storage.exists(storage.join_url(url, ".catena/label"))  # refused before any work
    # the override works, says so, and its result is not taken for the complete one's
    label(lab, allow_incomplete=True)
    assert "allow-incomplete" in caplog.text
    predict(pred, shard_index=1, num_shards=2)
    with pytest.raises(RunMismatchError, match=r"inputs\.prediction\.complete: false -> true"):
        label(lab)


def test_5_resume_with_another_block_shape_never_skips_foreign_markers(tmp_path, checkpoints):
    base = str(tmp_path)
    url = _dataset(base)
    small = pcfg(checkpoints[0], url, block_shape=[8, 16, 16])
    predict(small, shard_index=0, num_shards=4)  # interrupted: only shard 0 of 4 ran
    big = pcfg(checkpoints[0], url, block_shape=[16, 32, 32])
    with pytest.raises(RunMismatchError, match="block_shape"):
        predict(big)
    summary = predict(big, overwrite=True)
    assert summary["outputs"][0]["blocks_skipped"] == 0
    np.testing.assert_array_equal(read(output_urls(big)[0]), fresh_predict(base, big))
    assert predict(big)["outputs"][0]["blocks_computed"] == 0  # and now it is complete


@pytest.mark.parametrize("change", [{"tta": "flips"}, {"stride": [4, 8, 8]}, {"clahe": True}])
def test_6_shards_with_other_settings_do_not_mix(tmp_path, checkpoints, change):
    base = str(tmp_path)
    url = _dataset(base)
    a = pcfg(checkpoints[0], url)
    predict(a, shard_index=0, num_shards=2)
    b = pcfg(checkpoints[0], url, **change)
    key = next(iter(change))
    with pytest.raises(RunMismatchError, match=rf"settings\.{key}"):
        predict(b, shard_index=1, num_shards=2)
    run_shards(b, 2, overwrite=True)
    np.testing.assert_array_equal(read(output_urls(b)[0]), fresh_predict(base, b))
    saved = storage.read_bytes(run_store(output_urls(b)[0]).url("config.yaml")).decode()
    assert f"{key}:" in saved


def test_7_label_after_its_output_was_deleted_recomputes(base, checkpoints):
    url = _dataset(base)
    pred = pcfg(checkpoints[0], url)
    predict(pred)
    lab = lcfg(output_urls(pred)[0], url)
    label(lab)
    out_url = storage.join_url(url, "mito_instances")
    first = read(out_url)
    storage.remove(out_url)
    summary = label(lab)
    assert summary.blocks_computed > 0
    np.testing.assert_array_equal(read(out_url), first)


# --- status, dry run, single-process phases ----------------------------------------------------


def test_status_of_a_half_finished_sharded_run(tmp_path, checkpoints):
    url = _dataset(str(tmp_path))
    pred = pcfg(checkpoints[0], url)
    predict(pred, shard_index=0, num_shards=3)
    predict(pred, shard_index=2, num_shards=3)
    entries = status(url)
    [entry] = entries
    assert entry["state"] == "incomplete" and entry["task"] == "predict"
    # window_sharing exchange: each shard's windows, then the blend that writes the output
    assert [p["phase"] for p in entry["phases"]] == ["windows", "predict"]
    phase = entry["phases"][-1]
    assert phase["blocks_total"] == 12 and phase["blocks_done"] == 8 and phase["blocks_missing"] == 4
    assert phase["incomplete_shards"] == ["shard 1 of 3 (never started)"]
    assert entry["inputs"]["model"]["sha256"].startswith("sha256:")
    text = format_status(entries)
    assert "8/12 blocks" in text and "shard 1 of 3 (never started)" in text
    predict(pred, shard_index=1, num_shards=3)
    label(lcfg(output_urls(pred)[0], url))
    states = {e["task"]: e["state"] for e in status(url)}
    assert states == {"predict": "complete", "label": "complete"}


def test_dry_run_writes_nothing_and_reports_the_plan(tmp_path, checkpoints):
    url = _dataset(str(tmp_path))
    pred = pcfg(checkpoints[0], url)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    plan = predict(pred, shard_index=1, num_shards=2, dry_run=True)["outputs"][0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert plan["blocks_total"] == 12 and plan["blocks_per_shard"] == [6, 6] and plan["blocks_in_this_shard"] == 6
    assert plan["windows_whole_volume"] == 2 * 2 * 3 and plan["output_state"] == "new"
    assert plan["output_bytes"] == 16 * 32 * 48 and plan["peak_memory_bytes_per_worker"] > 0
    predict(pred)
    assert predict(pred, dry_run=True)["outputs"][0]["output_state"] == "this run: 12 of 12 blocks done"
    lplan = label(lcfg(output_urls(pred)[0], url), dry_run=True).plan
    assert lplan["blocks_total"] == 12 and lplan["output_state"] == "new"
    assert not storage.exists(storage.join_url(url, ".catena"))


def test_two_merges_at_once_are_refused_or_harmless(tmp_path, checkpoints):
    url = _dataset(str(tmp_path))
    pred = pcfg(checkpoints[0], url)
    predict(pred)
    lab = lcfg(output_urls(pred)[0], url)
    label(lab, phase="blocks")
    results: list[object] = []

    def merge() -> None:
        try:
            results.append(label(lab, phase="merge"))
        except PhaseError as e:
            results.append(e)

    threads = [threading.Thread(target=merge) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [r for r in results if isinstance(r, PhaseError)]
    assert all("already running in another process" in str(r) for r in refused)
    assert len(refused) < 2
    label(lab, phase="relabel")
    label(lab, phase="clean")
    label(lab, phase="clean")  # a second clean is harmless
    fresh = lcfg(output_urls(pred)[0], str(tmp_path / "fresh.zarr"))
    label(fresh)
    np.testing.assert_array_equal(read(storage.join_url(url, "mito_instances")),
                                  read(str(tmp_path / "fresh.zarr" / "mito_instances")))
