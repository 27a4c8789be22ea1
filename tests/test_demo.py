"""The demo runs the whole pipeline and leaves every output where its summary says."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner

from catena_mito import storage
from catena_mito.cli import cli


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--epochs", "2"])
    assert result.exit_code == 0, result.output
    for step in ("synthesise", "train", "predict", "label", "evaluate", "preview"):
        assert step in result.output
    test_url = str(out / "data" / "test.zarr")
    probs = storage.open_volume(storage.join_url(test_url, storage.prediction_path("mito")))
    instances = storage.open_volume(storage.join_url(test_url, storage.INSTANCES_PATH))
    assert probs.shape == instances.shape == (64, 128, 128)
    # What napari-ome-zarr sees (ome-zarr-py's reader): raw, probabilities and instances,
    # each at its three levels, instances as labels.
    from test_ome import _nodes

    seen = {path: (kind, [d.shape for d in node.data])
            for url in (storage.join_url(test_url, "volumes"), storage.join_url(test_url, storage.prediction_path("mito")))
            for path, kind, node in _nodes(url)}
    levels = [(64, 128, 128), (32, 64, 64), (16, 32, 32)]
    assert seen["volumes"] == seen[storage.prediction_path("mito")] == ("image", levels)
    assert seen[storage.INSTANCES_PATH] == ("labels", levels)
    report = json.loads((out / "evaluation.json").read_text())
    assert 0.0 <= report["semantic"]["iou"] <= 1.0 and report["instances"]
    assert (out / "runs" / "demo" / "best.pth").exists()
    assert sorted(p.name for p in (out / "previews").iterdir())[:4] == [
        "xz_contour.png", "xz_instances.png", "xz_prob.png", "xz_raw.png"]
    # two targets: the contour prediction beside the foreground, label in the contour mode,
    # and evaluate's table of both modes
    ckpt_targets = storage.open_volume(storage.join_url(test_url, storage.prediction_path("mito"))).attrs["catena_targets"]
    assert list(ckpt_targets) == ["foreground", "contour"]
    assert storage.array_exists(storage.join_url(test_url, storage.prediction_path("mito") + "_contour"))
    assert list(report["instance_modes"]) == ["connected_components", "contour"]
    assert yaml.safe_load((out / "configs" / "label.yaml").read_text())["instance_mode"] == "contour"
    assert "instance mode contour" in result.output
    # each step can be rerun by hand from the configs the demo wrote
    for name in ("train", "predict", "label"):
        assert (out / "configs" / f"{name}.yaml").exists()
    assert "done in" in result.output and str(out / "evaluation.json") in result.output


def test_demo_help_states_the_demos_own_budget():
    """The CLI's help repeats the demo's defaults (the CLI imports nothing heavy to read
    them): they must be the ones the demo runs."""
    from catena_mito.demo import DemoSettings

    text = " ".join(CliRunner().invoke(cli, ["demo", "--help"]).output.split())
    assert f"({DemoSettings.steps_per_epoch} steps each;" in text
    assert f"[default: {DemoSettings.epochs}]" in text
    assert f"[default: {DemoSettings.model_type}]" in text
