"""The command line: fast help, one-line errors with exit codes, python -m."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from catena_mito.cli import cli


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catena_mito", *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from catena_mito.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'monai', 'zarr', 'scipy', 'skimage') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for command in ("train", "predict", "label", "synth"):
        assert command in out.stdout


@pytest.mark.parametrize("command", ["train", "predict", "label"])
def test_command_help_lists_config_and_overrides(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert "--config" in result.output and "--set" in result.output
    if command != "train":
        assert "--shard-index" in result.output and "--num-shards" in result.output


def test_config_error_is_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "label.yaml"
    cfg.write_text(yaml.safe_dump({"input_prediction_path": "x", "output_instance_dir": "y", "thres_forground": 0.4}))
    out = run_cli("label", "--config", str(cfg))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean 'thres_foreground'" in lines[0]
    assert "Traceback" not in out.stderr


def test_debug_shows_the_traceback(tmp_path):
    cfg = tmp_path / "label.yaml"
    cfg.write_text("input_prediction_path: x\noutput_instance_dir: y\nzzz: 1\n")
    out = run_cli("--debug", "label", "--config", str(cfg))
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_shard_error_exit_2(tmp_path):
    cfg = tmp_path / "label.yaml"
    cfg.write_text("input_prediction_path: x\noutput_instance_dir: y\n")
    out = run_cli("label", "--config", str(cfg), "--shard-index", "3", "--num-shards", "2")
    assert out.returncode == 2
    assert "shard_index must be in [0, 2), got 3" in out.stderr


def test_usage_error_exit_2():
    result = run_cli("label")
    assert result.returncode == 2 and "--config" in result.stderr


def test_synth_writes_the_dataset_layout(tmp_path):
    out = tmp_path / "s.zarr"
    result = run_cli("synth", str(out), "--shape", "20", "24", "28", "--seed", "3", "--resolution", "8", "4", "4")
    assert result.returncode == 0, result.stderr
    from catena_mito import storage

    raw = storage.open_volume(storage.join_url(str(out), storage.RAW_PATH))
    assert raw.shape == (20, 24, 28) and raw.dtype == "uint8"
    assert storage.read_spatial(raw)[0] == (8.0, 4.0, 4.0)
    for path in storage.LABEL_PATHS.values():
        assert storage.open_volume(storage.join_url(str(out), path)).shape == (20, 24, 28)


def test_quiet_and_verbose_work_after_the_command_name(tmp_path):
    from catena_mito import cli

    for name in cli.cli.commands:
        options = {o for p in cli.cli.commands[name].params for o in getattr(p, "opts", [])}
        assert {"--quiet", "--verbose"} <= options, name
    out = tmp_path / "s.zarr"
    loud = run_cli("synth", str(out), "--shape", "8", "8", "8")
    quiet = run_cli("synth", str(tmp_path / "t.zarr"), "--shape", "8", "8", "8", "--quiet")
    assert loud.returncode == quiet.returncode == 0
    assert "INFO" not in quiet.stderr


def test_status_and_label_dry_run_from_the_cli(tmp_path):
    import numpy as np

    from catena_mito import storage

    pred = str(tmp_path / "p.zarr/p")
    storage.create_array(pred, (8, 8, 8), np.float32, (4, 4, 4))[...] = np.random.default_rng(0).random((8, 8, 8))
    cfg = tmp_path / "label.yaml"
    cfg.write_text(f"input_prediction_path: {pred}\noutput_instance_dir: {tmp_path / 'o.zarr'}\nchunk_size: 4\n")
    dry = run_cli("label", "--config", str(cfg), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "blocks      8 of [4, 4, 4]" in dry.stdout and "output now  new" in dry.stdout
    assert not (tmp_path / "o.zarr").exists()
    assert run_cli("label", "--config", str(cfg), "--phase", "blocks", "--num-shards", "2").returncode == 0
    shown = run_cli("status", str(tmp_path / "o.zarr"))
    assert shown.returncode == 0, shown.stderr
    assert "incomplete" in shown.stdout and "blocks     4/8 blocks" in shown.stdout
    assert "shard 1 of 2 (never started)" in shown.stdout
    as_json = run_cli("status", str(tmp_path / "o.zarr"), "--json")
    import json

    [entry] = json.loads(as_json.stdout)
    assert entry["phases"][0]["blocks_done"] == 4 and entry["state"] == "incomplete"
    missing = run_cli("status", str(tmp_path / "nothing"))
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1
