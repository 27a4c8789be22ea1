"""Multi-GPU training on the cluster: k8s/train-ddp-job.yaml and jobs/slurm/train-ddp.sbatch.

Strict schema validation (kubernetes-validate, a test dependency) and ``bash -n``; then
what a schema cannot check: the GPU count, torchrun's process count and the per-rank
threads agree, the config loads and resumes after preemption (``resume_checkpoint:
auto``), as the single-GPU Job does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from catena_mito.config import TrainConfig, config_from_dict

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "k8s" / "train-ddp-job.yaml"
SBATCH = REPO / "jobs" / "slurm" / "train-ddp.sbatch"


def _tool(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    assert found, f"{name} is a test dependency: pip install -e '.[test]'"
    return found


def _docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def test_manifest_passes_strict_schema_validation():
    result = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "-k", "1.29", str(MANIFEST)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_pod_several_gpus_through_torchrun():
    (job,) = [d for d in _docs() if d["kind"] == "Job"]
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    command = c["command"]
    assert command[:3] == ["/usr/bin/tini", "--", "python"] and "torch.distributed.run" in command
    assert command[-2:] == ["-m", "catena_mito"] and "--standalone" in command
    assert c["args"][:2] == ["train", "--config"]
    nproc = int(next(a for a in command if a.startswith("--nproc_per_node=")).split("=")[1])
    assert nproc > 1
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == nproc
    threads = {e["name"]: e for e in c["env"]}["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert threads["resource"] == "limits.cpu" and int(threads["divisor"]) == nproc
    assert "--nnodes" in MANIFEST.read_text()  # the multi-node recipe is written down
    # Preempted or evicted pods are retried without counting; resumed from last.pth.
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "Ignore" and rules[0]["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert job["spec"]["backoffLimit"] >= 1


def test_configmap_config_resumes_after_preemption():
    (cm,) = [d for d in _docs() if d["kind"] == "ConfigMap"]
    (job,) = [d for d in _docs() if d["kind"] == "Job"]
    mount = next(v for v in job["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    assert mount["configMap"]["name"] == cm["metadata"]["name"]
    (text,) = cm["data"].values()
    config = config_from_dict(TrainConfig, yaml.safe_load(text), "train-ddp ConfigMap")
    assert config.resume_checkpoint == "auto" and config.runs_dir.startswith("s3://")
    assert config.device == "cuda"


def test_sbatch_script_parses_and_resumes():
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = SBATCH.read_text()
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?", text, flags=re.M))
    assert "requeue" in directives and directives["gres"].startswith("gpu:")
    assert "torch.distributed.run" in text and "--nproc_per_node=\"$GPUS\"" in text
    assert "train --config" in text and "--rdzv_backend=c10d" in text
    # the default config resumes by itself after a requeue
    default = re.search(r"CONFIG=\$\{1:-(\S+)\}", text).group(1)
    data = yaml.safe_load((REPO / default).read_text())
    assert data["resume_checkpoint"] == "auto"
