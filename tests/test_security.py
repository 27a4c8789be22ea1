"""Security (issue 8): safe checkpoint loading and secrets that never leak.

Covered elsewhere, not repeated here:

* the image runs as a non-root user: ``tests/test_deploy.py::test_dockerfile_contract``
  (``USER 10001``) and the hadolint check;
* every Job manifest runs with ``runAsNonRoot``, ``allowPrivilegeEscalation: false``, all
  capabilities dropped, a read-only root filesystem with ``emptyDir`` scratch for ``/tmp``,
  ``$HOME`` and ``/dev/shm``, no service-account token:
  ``tests/test_deploy.py::test_job_pod_security_and_resources``;
* credentials only through Secret references: ``tests/test_deploy.py::test_secrets_only_by_reference``;
* a malicious checkpoint through ``catena-mito predict`` in a real process, and the other
  refused checkpoints: ``tests/test_bad_input.py`` (``ckpt-*`` cases and
  ``test_subprocess_malicious_checkpoint_is_refused``).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from catena_mito import storage

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "catena_mito"
FAKE_SECRET = "FAKE-SECRET-123"
RS_TINY = {"channels": [2, 4]}


# --- torch.load -----------------------------------------------------------------------------------


def _torch_load_calls() -> list[tuple[str, int, ast.Call]]:
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "load" and getattr(f.value, "id", "") == "torch":
                calls.append((str(path.relative_to(ROOT)), node.lineno, node))
    return calls


def test_every_torch_load_uses_weights_only_true():
    calls = _torch_load_calls()
    assert calls, "expected at least the checkpoint loader"
    for where, line, call in calls:
        kw = {k.arg: k.value for k in call.keywords}
        assert "weights_only" in kw, f"{where}:{line}: torch.load without weights_only"
        value = kw["weights_only"]
        assert isinstance(value, ast.Constant) and value.value is True, f"{where}:{line}: weights_only is not True"


def test_no_unsafe_loaders_in_the_package():
    """No other way in for pickled code: no ``from torch import load``, no pickle/dill
    loads, no ``numpy.load(allow_pickle=True)``, no ``yaml.load`` without a safe loader."""
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(ROOT)
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                assert "load" not in {a.name for a in node.names}, f"{rel}: from torch import load"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = getattr(node.func.value, "id", "")
                kw = {k.arg: k.value for k in node.keywords}
                if owner in ("pickle", "dill", "cloudpickle", "joblib") and node.func.attr in ("load", "loads"):
                    pytest.fail(f"{rel}:{node.lineno}: {owner}.{node.func.attr}")
                if owner in ("np", "numpy") and node.func.attr == "load":
                    allow = kw.get("allow_pickle")
                    assert not (isinstance(allow, ast.Constant) and allow.value), f"{rel}:{node.lineno}: allow_pickle"
                if owner == "yaml" and node.func.attr in ("load", "load_all", "unsafe_load", "full_load"):
                    pytest.fail(f"{rel}:{node.lineno}: yaml.{node.func.attr} (use yaml.safe_load)")


def test_malicious_model_loc_is_refused_by_train(tmp_path, capsys):
    """The same refusal on the training side (model_loc), through the CLI."""
    import torch

    proof = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {proof}",))

    evil = tmp_path / "evil.pth"
    torch.save({"model_type": "rs_unet", "state_dict": Evil()}, evil)
    from catena_mito.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(str(tmp_path / "d.zarr"), shape=(16, 16, 16), seed=1, chunks=(8, 8, 8))
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({
        "train_zarr_dirs": [data], "runs_dir": str(tmp_path / "runs"), "model_type": "rs_unet",
        "model_params": RS_TINY, "patch_size": 16, "stride": 16, "epochs": 1, "device": "cpu",
        "model_loc": str(evil)}))
    from catena_mito.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert "weights_only" in err and "evil.pth" in err and "Traceback" not in err
    assert not proof.exists()
    assert not (tmp_path / "runs" / "catena_mito" / "last.pth").exists()


# --- secrets never leak ---------------------------------------------------------------------------


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
        base.pop(name, None)
    return subprocess.run([sys.executable, "-m", "catena_mito", *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=300)


def _leaks(secrets: list[str], texts: dict[str, bytes]) -> list[str]:
    return [f"{secret!r} in {where}" for where, data in texts.items() for secret in secrets
            if secret.encode() in data]


@pytest.mark.s3
def test_credentials_never_appear_in_logs_saved_configs_or_errors(s3_server, tmp_path):
    """train → predict → label on S3 with the secret in ``storage_options`` (and, for label,
    only in the AWS environment variables), with ``--debug`` on one of them; then a run with
    a wrong secret. Neither secret may appear in stdout/stderr or in any object or file the
    runs wrote."""
    from catena_mito.synthetic import write_synthetic_dataset

    bucket = s3_server.make_bucket("secrets")
    opts = s3_server.storage_options
    real_secret = s3_server.secret
    data = write_synthetic_dataset(f"s3://{bucket}/data.zarr", shape=(16, 32, 32), seed=2, chunks=(8, 16, 16),
                                   storage_options=opts)
    outputs: dict[str, bytes] = {}
    configs = tmp_path / "configs"  # our inputs (they hold the secret on purpose): not scanned
    configs.mkdir()
    work = tmp_path / "work"
    work.mkdir()

    def config(name: str, body: dict) -> str:
        path = configs / f"{name}.yaml"
        path.write_text(yaml.safe_dump(body))
        return str(path)

    train = config("train", {
        "train_zarr_dirs": [data], "test_zarr_dirs": [data], "runs_dir": f"s3://{bucket}/runs", "exp_name": "r",
        "model_type": "rs_unet", "model_params": RS_TINY, "patch_size": [8, 16, 16], "stride": [8, 16, 16],
        "epochs": 1, "batch_size": 2, "steps_per_epoch": 1, "device": "cpu", "storage_options": opts})
    proc = _run(["train", "--config", train])
    outputs["train stdout/stderr"] = (proc.stdout + proc.stderr).encode()
    assert proc.returncode == 0, proc.stderr[-3000:]

    predict = config("predict", {
        "model_path": f"s3://{bucket}/runs/r/last.pth", "test_zarr_dirs": [data], "device": "cpu",
        "block_shape": [8, 16, 16], "output_chunks": [8, 16, 16], "storage_options": opts})
    proc = _run(["--debug", "predict", "--config", predict])
    outputs["predict --debug stdout/stderr"] = (proc.stdout + proc.stderr).encode()
    assert proc.returncode == 0, proc.stderr[-3000:]

    label = config("label", {
        "input_prediction_path": storage.join_url(data, storage.prediction_path("mito")),
        "output_instance_dir": f"s3://{bucket}/inst.zarr", "chunk_size": [8, 16, 16], "thres_small_instances": 2})
    env = {"AWS_ACCESS_KEY_ID": s3_server.key, "AWS_SECRET_ACCESS_KEY": real_secret,
           "AWS_ENDPOINT_URL": s3_server.endpoint_url}
    proc = _run(["label", "--config", label], env)
    outputs["label stdout/stderr"] = (proc.stdout + proc.stderr).encode()
    assert proc.returncode == 0, proc.stderr[-3000:]

    # wrong credentials: the error names the URL, never the secret
    for cmd, body in (("label", {"input_prediction_path": storage.join_url(data, storage.prediction_path("mito")),
                                 "output_instance_dir": f"s3://{bucket}/inst2.zarr"}),
                      ("predict", {"model_path": f"s3://{bucket}/runs/r/last.pth", "test_zarr_dirs": [data]})):
        wrong = config(f"wrong-{cmd}", {**body, "storage_options": {**opts, "secret": FAKE_SECRET}})
        proc = _run([cmd, "--config", wrong])
        outputs[f"{cmd} wrong-secret stdout/stderr"] = (proc.stdout + proc.stderr).encode()
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
    # with the secret inside a URL (user:password@), redacted in the error
    url_cfg = config("url", {"input_prediction_path": f"s3://{s3_server.key}:{FAKE_SECRET}@{bucket}/nope.zarr",
                             "output_instance_dir": str(work / "o.zarr"), "storage_options": opts})
    proc = _run(["label", "--config", url_cfg])
    outputs["label secret-in-URL stdout/stderr"] = (proc.stdout + proc.stderr).encode()
    assert proc.returncode != 0

    fs = s3_server.filesystem()
    objects = fs.find(bucket)
    assert any(o.endswith("config.yaml") for o in objects)  # the saved configs were scanned
    assert any(o.endswith("last.pth") for o in objects)
    for obj in objects:
        outputs[f"s3://{obj}"] = fs.cat_file(obj)
    for path in work.rglob("*"):
        if path.is_file():
            outputs[str(path)] = path.read_bytes()
    leaks = _leaks([FAKE_SECRET, real_secret], outputs)
    assert not leaks, leaks
    saved = yaml.safe_load(fs.cat_file(f"{bucket}/runs/r/config.yaml"))
    assert saved["storage_options"]["secret"] == "***REDACTED***"
    assert saved["storage_options"]["key"] == "***REDACTED***"


def test_checkpoint_errors_hide_credentials_in_urls():
    from catena_mito.checkpoint import load_checkpoint
    from catena_mito.errors import CheckpointError

    with pytest.raises(CheckpointError) as e:
        load_checkpoint(f"memory://user:{FAKE_SECRET}@bucket/missing.pth")
    assert FAKE_SECRET not in str(e.value) and "***@bucket/missing.pth" in str(e.value)
