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
