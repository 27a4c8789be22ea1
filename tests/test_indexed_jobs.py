"""The Indexed Jobs of k8s/, played locally against a real S3 server (GitHub issue 6).

One test runs the pods of ``k8s/predict-job.yaml`` and then of ``k8s/label-job.yaml`` as
concurrent ``catena-mito`` processes, built from the manifests themselves: the
container's ``args`` (the image's entrypoint is ``catena-mito``), the env it sets
(``CATENA_NUM_SHARDS``, the scratch paths, the AWS variables taken from the ``catena-s3``
Secret) plus the ``JOB_COMPLETION_INDEX`` Kubernetes gives each pod of an Indexed Job, and
the ConfigMap's config with its S3 URLs moved into a test bucket and its sizes shrunk.
Predictions and instances must equal, bit for bit, a single-process run of the same
configs (``--num-shards 1``, then ``label --phase all``).

The model is a tiny deterministic U-Net checkpoint written to S3 with
:func:`catena_mito.checkpoint.save_checkpoint`; the data a synthetic FIB-SEM volume
written to S3 by :func:`catena_mito.synthetic.write_synthetic_dataset`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_deploy import REPO, URL_FIELDS, env_of, load_docs
from test_predict import MODEL_PARAMS, deterministic_model

pytestmark = [pytest.mark.slow, pytest.mark.s3]

SHAPE = (48, 64, 64)  # z, y, x voxels of the synthetic volume
#: Shards of each Indexed Job (its `completions` and CATENA_NUM_SHARDS). The relabel phase
#: "need not match the blocks phase" (k8s/label-job.yaml): it does not here.
NUM_SHARDS = {"catena-predict": 3, "catena-label-blocks": 3, "catena-label-grow": 2, "catena-label-relabel": 2}
PREDICT_SIZES = {
    "patch_size": [16, 32, 32],
    "stride": [8, 16, 16],
    # 3 x 2 x 2 = 12 blocks, 4 per shard; two output chunks per block
    "block_shape": [16, 32, 32],
    "output_chunks": [16, 16, 32],
    "batch_size": 2,
    "num_workers": 1,
    "device": "cpu",
    "amp": False,
}
# 3 x 4 x 4 = 48 label blocks, 16 per shard
LABEL_SIZES = {"chunk_size": [16, 16, 16], "thres_small_instances": 8}
#: The keys of the `catena-s3` Secret (k8s/train-job.yaml) -> what the test server uses.
SECRET_KEYS = {
    "access-key-id": "key",
    "secret-access-key": "secret",
    "endpoint-url": "endpoint_url",
}
#: Scheduler and credential variables of whatever runs the tests must not reach a pod.
FOREIGN_ENV = ("SLURM_", "CATENA_", "JOB_", "AWS_")
TIMEOUT = 240


# --- the manifests ------------------------------------------------------------------------


def manifest(name: str) -> tuple[dict[str, str], list[dict]]:
    """(ConfigMap data, Jobs) of ``k8s/<name>``."""
    docs = load_docs(REPO / "k8s" / name)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    return cm["data"], [d for d in docs if d["kind"] == "Job"]


def rebucket(config: dict, bucket: str) -> dict:
    """The config with every ``s3://<bucket>/`` URL moved into ``bucket``."""
    out = dict(config)
    for key in URL_FIELDS:
        value = out.get(key)
        if isinstance(value, str):
            out[key] = re.sub(r"^s3://[^/]+/", f"s3://{bucket}/", value)
        elif isinstance(value, list):
            out[key] = [re.sub(r"^s3://[^/]+/", f"s3://{bucket}/", v) for v in value]
    assert all(
        str(v).startswith(f"s3://{bucket}/")
        for k in URL_FIELDS
        for v in (out[k] if isinstance(out.get(k), list) else [out.get(k)])
        if v is not None
    ), out
    return out


class Pod:
    """One container of a Job, ready to run as a local process."""

    def __init__(self, job: dict, tmp_path: Path, s3_server, base_env: dict[str, str]):
        self.job = job
        pod = job["spec"]["template"]["spec"]
        (self.container,) = pod["containers"]
        self.completions = job["spec"].get("completions", 1)
        self.indexed = job["spec"].get("completionMode") == "Indexed"
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in self.container["volumeMounts"]}
        self.config_dir = next(p for p, v in mounts.items() if "configMap" in v)
        # The writable emptyDirs, as fresh local folders (a pod never shares them).
        self.scratch = {
            p: tmp_path / "pods" / job["metadata"]["name"] / p.strip("/").replace("/", "_")
            for p, v in mounts.items()
            if "emptyDir" in v
        }
        self.env = dict(base_env)
        for name, entry in env_of(self.container).items():
            if "value" in entry:
                self.env[name] = self.local_path(entry["value"])
            elif "resourceFieldRef" in entry["valueFrom"]:
                # OMP_NUM_THREADS from the CPU limit: every process here is pinned to one
                # thread instead (base_env), which bitwise equality across processes needs.
                assert name in self.env, name
            else:
                ref = entry["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "catena-s3", entry
                self.env[name] = getattr(s3_server, SECRET_KEYS[ref["key"]])

    def local_path(self, value: str) -> str:
        for mount, local in self.scratch.items():
            if value == mount or value.startswith(mount + "/"):
                return str(local) + value[len(mount) :]
        return value

    def args(self, config_path: Path, wait_timeout: str = "120") -> list[str]:
        """The container's args with the mounted config replaced by ``config_path``."""
        args = list(self.container["args"])
        args = [str(config_path) if a.startswith(self.config_dir + "/") else a for a in args]
        assert str(config_path) in args, self.container["args"]
        if "--wait-timeout" in args:
            args[args.index("--wait-timeout") + 1] = wait_timeout
        return args

    def start(self, config_path: Path) -> list[tuple[str, subprocess.Popen]]:
        """Start every pod of the Job at once, NUM_SHARDS standing for ``completions``."""
        num_shards = NUM_SHARDS[self.job["metadata"]["name"]] if self.indexed else 1
        env = dict(self.env)
        if self.indexed:
            assert int(env["CATENA_NUM_SHARDS"]) == self.completions
            env["CATENA_NUM_SHARDS"] = str(num_shards)
        for local in self.scratch.values():
            local.mkdir(parents=True, exist_ok=True)
        procs = []
        for index in range(num_shards if self.indexed else 1):
            pod_env = dict(env)
            if self.indexed:  # set by Kubernetes in every pod of an Indexed Job
                pod_env["JOB_COMPLETION_INDEX"] = str(index)
            name = f"{self.job['metadata']['name']}-{index}"
            procs.append((name, spawn(self.args(config_path), pod_env)))
        return procs


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    # The image runs `catena-mito` (under tini, its ENTRYPOINT).
    return subprocess.Popen(
        [sys.executable, "-m", "catena_mito", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_all(procs: list[tuple[str, subprocess.Popen]]) -> dict[str, str]:
    """Wait for every process; all must exit 0. Returns each one's stderr (the log)."""
    failures, logs = [], {}
    for name, proc in procs:
        try:
            _, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        logs[name] = err
        if proc.returncode != 0:
            failures.append(f"{name}: exit {proc.returncode}\n{err[-3000:]}")
    assert not failures, "\n\n".join(failures)
    return logs


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


# --- the data and the model ---------------------------------------------------------------


def save_tiny_checkpoint(url: str, storage_options: dict) -> None:
    """The small, deterministic monai_unet of tests/test_predict.py, saved to ``url``."""
    from catena_mito.checkpoint import make_payload, save_checkpoint

    model = deterministic_model()
    train_cfg = {
        "patch_size": PREDICT_SIZES["patch_size"],
        "stride": PREDICT_SIZES["stride"],
        "clahe": False,
        "original_res": [8, 8, 8],
        "target_res": [8, 8, 8],
        "label_type": "mito",
    }
    payload = make_payload("monai_unet", MODEL_PARAMS, model, epoch=1, config=train_cfg)
    save_checkpoint(url, payload, storage_options=storage_options)


# --- the test -----------------------------------------------------------------------------


def test_indexed_jobs_on_s3_equal_a_single_process_run(tmp_path, s3_server):
    from catena_mito import storage
    from catena_mito.synthetic import write_synthetic_dataset

    opts = s3_server.storage_options
    bucket = s3_server.make_bucket("indexed")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}
    # Every process runs its convolutions on one thread: bitwise equality across processes
    # needs the same thread count everywhere (oneDNN rounds differently otherwise).
    base_env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    # The predict ConfigMap's config, in the test bucket and at test size.
    predict_data, (predict_job,) = manifest("predict-job.yaml")
    (predict_key,) = predict_data
    predict_cfg = rebucket(yaml.safe_load(predict_data[predict_key]), bucket)
    predict_cfg.update(PREDICT_SIZES)
    (dataset_url,) = predict_cfg["test_zarr_dirs"]
    write_synthetic_dataset(dataset_url, SHAPE, seed=3, chunks=(16, 32, 32), storage_options=opts)
    save_tiny_checkpoint(predict_cfg["model_path"], opts)

    (tmp_path / "sharded").mkdir()
    sharded_predict = write_config(tmp_path / "sharded" / predict_key, predict_cfg)
    single_store = f"s3://{bucket}/single-process.zarr"
    single_predict = write_config(
        tmp_path / f"single-{predict_key}", {**predict_cfg, "output_dir": single_store}
    )

    # predict: N pods of the Indexed Job, and the single-process reference, all at once.
    pod = Pod(predict_job, tmp_path, s3_server, base_env)
    single_env = {k: v for k, v in pod.env.items() if k != "CATENA_NUM_SHARDS"}
    procs = pod.start(sharded_predict)
    procs.append(
        ("single predict", spawn([*pod.args(single_predict), "--num-shards", "1"], single_env))
    )
    logs = wait_all(procs)
    # Each pod took its shard from JOB_COMPLETION_INDEX / CATENA_NUM_SHARDS: together, and
    # each block once, they computed the blocks of the single run.
    shards = NUM_SHARDS["catena-predict"]
    computed = []
    for i in range(shards):
        (n,) = re.findall(
            rf"predict shard {i}/{shards}: (\d+) blocks computed", logs[f"catena-predict-{i}"]
        )
        computed.append(int(n))
    assert computed == [4, 4, 4]
    assert re.search(rf"predict shard 0/1: {sum(computed)} blocks computed", logs["single predict"])

    prediction_path = predict_cfg["output_filename"]
    sharded_probs = storage.open_array(
        storage.join_url(predict_cfg["output_dir"], prediction_path), opts
    )
    single_probs = storage.open_array(storage.join_url(single_store, prediction_path), opts)
    assert sharded_probs.shape == SHAPE and tuple(sharded_probs.chunks) == tuple(
        PREDICT_SIZES["output_chunks"]
    )
    expected_probs = single_probs[...]
    assert expected_probs.dtype == np.dtype(predict_cfg["output_dtype"])
    assert len(np.unique(expected_probs)) > 20  # the model is far from constant
    np.testing.assert_array_equal(sharded_probs[...], expected_probs)

    # label: the label ConfigMap's config, chained onto predict's output as in the manifests.
    label_data, label_jobs = manifest("label-job.yaml")
    (label_key,) = label_data
    label_cfg = rebucket(yaml.safe_load(label_data[label_key]), bucket)
    assert label_cfg["input_prediction_path"] == storage.join_url(
        predict_cfg["output_dir"], prediction_path
    )
    # An untrained model: threshold at a high quantile, between two uint8 levels, so that
    # the foreground falls apart into many objects that cross block faces.
    level = int(np.quantile(expected_probs, 0.85))
    label_cfg.update(LABEL_SIZES, thres_foreground=(level + 0.5) / 255)
    (tmp_path / "sharded-label").mkdir()
    sharded_label = write_config(tmp_path / "sharded-label" / label_key, label_cfg)
    single_label = write_config(
        tmp_path / f"single-{label_key}",
        {
            **label_cfg,
            "input_prediction_path": storage.join_url(single_store, prediction_path),
            "output_instance_dir": storage.join_url(single_store, "volumes/labels"),
        },
    )

    # Every pod of every label Job at once, the waiting phases first (one `kubectl apply`),
    # and the single-process `--phase all` reference alongside.
    pods = {}
    for job in label_jobs:
        p = Pod(job, tmp_path, s3_server, base_env)
        args = p.container["args"]
        pods[args[args.index("--phase") + 1]] = p
    from catena_mito.label import PHASES

    order = [phase for phase in PHASES if phase != "all"]
    assert set(pods) == set(order)  # one Job per phase (grow and sizes: nothing to do here)
    procs = []
    for phase in reversed(order):
        procs += pods[phase].start(sharded_label)
    reference = [a for a in pods["blocks"].args(single_label) if a not in ("--phase", "blocks")]
    label_env = {k: v for k, v in pods["blocks"].env.items() if k != "CATENA_NUM_SHARDS"}
    procs.append(
        ("single label", spawn([*reference, "--phase", "all", "--num-shards", "1"], label_env))
    )
    logs = wait_all(procs)
    for phase in ("blocks", "relabel"):
        shards = NUM_SHARDS[f"catena-label-{phase}"]
        for i in range(shards):
            assert f"label {phase} {i}/{shards}: " in logs[f"catena-label-{phase}-{i}"]
    # Objects joined across block faces and small ones removed by their global size, the
    # same in the merge pod as in the single run.
    merge_pattern = r"label merge: (\d+) provisional labels, (\d+) equivalences, (\d+) objects kept, (\d+) removed"
    (merged,) = re.findall(merge_pattern, logs["catena-label-merge-0"])
    assert re.findall(merge_pattern, logs["single label"]) == [merged]
    _, equivalences, _, removed = map(int, merged)
    assert equivalences > 0 and removed > 0

    name = label_cfg["output_filename"]
    sharded = storage.open_array(storage.join_url(label_cfg["output_instance_dir"], name), opts)[
        ...
    ]
    single = storage.open_array(storage.join_url(single_store, "volumes/labels", name), opts)[...]
    assert single.shape == SHAPE
    assert single.max() > 10  # many objects, many of them crossing block faces
    sizes = np.bincount(single.ravel())[1:]
    assert sizes.min() >= LABEL_SIZES["thres_small_instances"]
    np.testing.assert_array_equal(sharded, single)
