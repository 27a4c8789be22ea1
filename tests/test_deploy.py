"""The deployment files: image, Apptainer recipe, Kubernetes manifests, job configs, Slurm.

Schema validation (kubernetes-validate --strict), hadolint and spython are test
dependencies (`pip install -e .[test]`), never skipped. The checks below them are the ones
a schema cannot make: that the manifests and scripts agree with the CLI's contract
(shard environment, label phase order, exit codes) and with the security baseline.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from catena_mito.config import LabelConfig, PredictConfig, TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
#: The manifests (Kubernetes objects); k8s/kustomization.yaml is kustomize's, not one.
K8S = sorted(p for p in (REPO / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
JOB_CONFIGS = sorted((REPO / "jobs").rglob("*.yaml"))
SLURM = sorted((REPO / "jobs" / "slurm").iterdir())
#: The oldest Kubernetes the manifests support (backoffLimitPerIndex, podReplacementPolicy).
K8S_OLDEST = "1.29.0"


def newest_schema_version() -> str:
    """The newest Kubernetes version the installed kubernetes-validate has strict schemas for."""
    from importlib.resources import files

    from packaging.version import Version

    found = [
        m.group(1)
        for entry in files("kubernetes_validate").joinpath("kubernetes-json-schema").iterdir()
        if (m := re.fullmatch(r"v(\d+\.\d+\.\d+)-local-strict", entry.name))
    ]
    assert found, "kubernetes-validate ships no strict schemas"
    return max(found, key=Version)


K8S_VERSIONS = (K8S_OLDEST, newest_schema_version())
CONFIG_CLASSES = {"train": TrainConfig, "predict": PredictConfig, "label": LabelConfig}
UID = 10001
#: Config fields that hold a URL (an output or input location, not a name inside one).
URL_FIELDS = (
    "train_zarr_dirs",
    "test_zarr_dirs",
    "runs_dir",
    "model_path",
    "output_dir",
    "input_prediction_path",
    "output_instance_dir",
)


def venv_tool(name: str) -> str:
    """A console script installed next to this interpreter (the test deps), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    assert found, f"{name} is a test dependency: pip install -e '.[test]'"
    return found


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in K8S for d in load_docs(p)]


def jobs() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in all_docs() if d["kind"] == "Job"]


def job_id(item: tuple[Path, dict]) -> str:
    return f"{item[0].name}:{item[1]['metadata']['name']}"


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_files_exist():
    for name in ("train-job.yaml", "predict-job.yaml", "label-job.yaml"):
        assert (REPO / "k8s" / name).is_file()
    for kind in ("local", "s3"):
        for job in ("train", "predict", "label"):
            assert (REPO / "jobs" / kind / f"{job}.yaml").is_file()
    for name in ("Dockerfile", "build-local.sh"):
        assert (REPO / "containers" / name).is_file()
    assert (REPO / ".dockerignore").is_file()
    assert (REPO / "apptainer" / "catena.def").is_file()
    assert (REPO / "docs" / "deploy.md").is_file()


# --- Kubernetes: schema -------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_pass_strict_schema_validation(version):
    result = subprocess.run(
        [venv_tool("kubernetes-validate"), "--strict", "-k", version, *map(str, K8S)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Every document of every multi-document file was looked at, not just the first.
    passed = re.findall(r"passed for resource", result.stdout + result.stderr)
    assert len(passed) == len(all_docs())


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_strict_validation_rejects_an_unknown_field(tmp_path, version):
    # Guards the test above: a typo in a manifest must fail, or passing means nothing.
    docs = load_docs(REPO / "k8s" / "predict-job.yaml")
    job = next(d for d in docs if d["kind"] == "Job")
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run(
        [venv_tool("kubernetes-validate"), "--strict", "-k", version, str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0


def test_versions_under_test_are_the_supported_range():
    from packaging.version import Version

    # The newest is whatever the installed kubernetes-validate knows, at least 1.30.
    oldest, newest = map(Version, K8S_VERSIONS)
    assert oldest < newest


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_manifests_state_the_oldest_kubernetes(path):
    header = path.read_text().split("\napiVersion:", 1)[0]
    assert f"Needs Kubernetes >= {K8S_OLDEST.rsplit('.', 1)[0]}" in header, path.name
    assert "Kubernetes >= 1.29" in (REPO / "docs" / "deploy.md").read_text()


# --- Kubernetes: what the schema cannot check ---------------------------------------------


def test_each_file_is_self_contained():
    """`kubectl apply -f FILE` on its own: every ConfigMap a Job mounts is in the same file."""
    for path in K8S:
        docs = load_docs(path)
        configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
        for job in (d for d in docs if d["kind"] == "Job"):
            for vol in job["spec"]["template"]["spec"]["volumes"]:
                if "configMap" in vol:
                    assert vol["configMap"]["name"] in configmaps, (path.name, vol)


@pytest.mark.parametrize("item", jobs(), ids=job_id)
def test_job_pod_security_and_resources(item):
    path, job = item
    spec = job["spec"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod.get("automountServiceAccountToken") is False
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == UID
    assert psc["fsGroup"] == UID
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"

    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["readOnlyRootFilesystem"] is True
        # A read-only root needs writable scratch for /tmp, $HOME and the caches.
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        for path_ in ("/tmp", "/dev/shm"):
            assert "emptyDir" in volumes[mounts[path_]], (c["name"], path_)
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        env = env_of(c)
        home = env["HOME"]["value"]
        assert home in mounts and "emptyDir" in volumes[mounts[home]]
        for var in ("MPLCONFIGDIR", "XDG_CACHE_HOME") + (
            ("TORCH_HOME",) if "nvidia.com/gpu" in c["resources"]["limits"] else ()
        ):
            assert env[var]["value"].startswith(("/tmp/", home + "/")), var

        res = c["resources"]
        for key in ("cpu", "memory"):
            assert key in res["requests"] and key in res["limits"], (c["name"], key)
        # The config is mounted read-only from the ConfigMap and named on the command line.
        config_mounts = [m for m in c["volumeMounts"] if "configMap" in volumes[m["name"]]]
        assert config_mounts and all(m.get("readOnly") for m in config_mounts)
        assert c["args"][1] == "--config"
        assert c["args"][2].startswith(config_mounts[0]["mountPath"] + "/")
        assert c["image"].split(":")[-1] != "latest"


@pytest.mark.parametrize("item", jobs(), ids=job_id)
def test_secrets_only_by_reference(item):
    _, job = item
    for c in job["spec"]["template"]["spec"]["containers"]:
        env = env_of(c)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            assert "value" not in env[name], name
            assert "secretKeyRef" in env[name]["valueFrom"], name
        for name, e in env.items():
            if re.search(r"KEY|SECRET|TOKEN|PASSWORD", name):
                assert "value" not in e, f"{name} has a literal value"
        assert "envFrom" not in c or all(
            "secretRef" in s or "configMapRef" in s for s in c["envFrom"]
        )


@pytest.mark.parametrize("item", jobs(), ids=job_id)
def test_threads_follow_the_cpu_limit(item):
    """torch would start one thread per node CPU; the container's limit decides instead."""
    _, job = item
    for c in job["spec"]["template"]["spec"]["containers"]:
        ref = env_of(c)["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]
        assert ref["resource"] == "limits.cpu" and "cpu" in c["resources"]["limits"]


def test_slurm_scripts_set_threads_from_the_allocation():
    for script in sorted((REPO / "jobs" / "slurm").glob("*.sbatch")):
        text = script.read_text()
        assert 'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"' in text, script.name
        assert text.index("OMP_NUM_THREADS") < text.index("exec apptainer"), script.name


def pod_failure_action(job: dict, exit_code: int, conditions: tuple[str, ...] = ()) -> str:
    """What the Job controller does with a failed pod: the first matching rule of the
    podFailurePolicy, else "Count" (the default: a failure against the backoff limit)."""
    (c,) = job["spec"]["template"]["spec"]["containers"]
    for rule in job["spec"].get("podFailurePolicy", {}).get("rules", []):
        on_codes = rule.get("onExitCodes")
        if on_codes is not None:
            if on_codes.get("containerName", c["name"]) != c["name"]:
                continue
            hit = exit_code in on_codes["values"]
            if (on_codes["operator"] == "In") == hit:
                return rule["action"]
        for cond in rule.get("onPodConditions", []):
            if cond["type"] in conditions and cond.get("status", "True") == "True":
                return rule["action"]
    return "Count"


#: The CLI's exit code when SIGTERM stops it (128 + 15).
SIGTERM_EXIT = 143


@pytest.mark.parametrize("item", jobs(), ids=job_id)
def test_failure_policy_matches_cli_exit_codes(item):
    """Exit 2 (ConfigError) fails the Job at once; disruptions do not count as failures;
    a SIGTERM exit (143) is never taken for a config error."""
    from catena_mito import errors

    _, job = item
    fatal = ("FailJob", "FailIndex")
    assert pod_failure_action(job, errors.ConfigError.exit_code) in fatal
    assert pod_failure_action(job, errors.CatenaError.exit_code) == "Count"
    stopped = getattr(errors, "Stopped", None)  # the CLI's SIGTERM exit
    if stopped is not None:
        assert stopped.exit_code == SIGTERM_EXIT
    # Drained, preempted or evicted: the pod has the DisruptionTarget condition and exits
    # 143 (or is killed: 137), and whatever its code the retry is not counted.
    for code in (SIGTERM_EXIT, 137, 1, errors.ConfigError.exit_code):
        assert pod_failure_action(job, code, ("DisruptionTarget",)) == "Ignore", code
    # SIGTERM without a disruption (kubectl delete pod): a counted, retried failure.
    assert pod_failure_action(job, SIGTERM_EXIT) == "Count"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    for r in rules:
        if r["action"] in fatal:
            assert SIGTERM_EXIT not in r["onExitCodes"]["values"]
            assert r["onExitCodes"]["operator"] == "In"


def indexed_jobs() -> list[tuple[Path, dict]]:
    return [(p, j) for p, j in jobs() if j["spec"].get("completionMode") == "Indexed"]


@pytest.mark.parametrize("item", indexed_jobs(), ids=job_id)
def test_indexed_jobs_declare_their_shard_count(item):
    _, job = item
    spec = job["spec"]
    (c,) = spec["template"]["spec"]["containers"]
    env = env_of(c)
    # JOB_COMPLETION_INDEX is set by Kubernetes for Indexed Jobs; the count is ours to set.
    assert int(env["CATENA_NUM_SHARDS"]["value"]) == spec["completions"]
    assert "--shard-index" not in c["args"] and "--num-shards" not in c["args"]
    assert 1 <= spec["parallelism"] <= spec["completions"]
    assert spec["backoffLimitPerIndex"] >= 1
    assert 0 <= spec["maxFailedIndexes"] < spec["completions"]


def test_predict_is_an_indexed_gpu_job():
    (job,) = [d for d in load_docs(REPO / "k8s" / "predict-job.yaml") if d["kind"] == "Job"]
    assert job["spec"]["completionMode"] == "Indexed"
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["args"][0] == "predict"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1


def test_train_is_one_gpu_job_writing_to_s3():
    docs = load_docs(REPO / "k8s" / "train-job.yaml")
    (job,) = [d for d in docs if d["kind"] == "Job"]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["args"][0] == "train"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    config = yaml.safe_load(next(iter(cm["data"].values())))
    assert config["runs_dir"].startswith("s3://")


def label_jobs_by_phase() -> dict[str, tuple[dict, list[str]]]:
    phases = {}
    for job in (d for d in load_docs(REPO / "k8s" / "label-job.yaml") if d["kind"] == "Job"):
        (c,) = job["spec"]["template"]["spec"]["containers"]
        args = c["args"]
        assert args[0] == "label"
        phase = args[args.index("--phase") + 1]
        assert phase not in phases, f"two Jobs run --phase {phase}"
        phases[phase] = (job, args)
    return phases


def test_label_phases_run_in_order_from_one_apply():
    from catena_mito.label import PHASES, SINGLE_PROCESS_PHASES

    phases = label_jobs_by_phase()
    # every phase of the CLI, so that a new phase cannot be left out of the cluster run again
    order = [p for p in PHASES if p != "all"]
    assert set(phases) == set(order)
    for phase in order:
        mode = phases[phase][0]["spec"].get("completionMode", "NonIndexed")
        assert mode == ("NonIndexed" if phase in SINGLE_PROCESS_PHASES else "Indexed"), phase
    # Every later phase starts with blocks and waits for the markers of the one before;
    # each waits for all the earlier ones, so the timeouts grow along the chain.
    timeouts = []
    for phase in order[1:]:
        args = phases[phase][1]
        timeouts.append(float(args[args.index("--wait-timeout") + 1]))
    assert timeouts[0] > 0 and timeouts == sorted(set(timeouts)), timeouts
    assert "--wait-timeout" not in phases["blocks"][1]
    # A waiting Job is bounded as a whole, beyond its wait (the wait, then the work), so
    # one whose input never comes does not hold its pods for ever.
    deadlines = []
    for phase, timeout in zip(order[1:], timeouts):
        deadlines.append(phases[phase][0]["spec"]["activeDeadlineSeconds"])
        assert deadlines[-1] >= timeout + 3600, phase
    assert deadlines == sorted(set(deadlines)), deadlines


def configmap_configs() -> list[tuple[str, str, str]]:
    out = []
    for path, doc in all_docs():
        if doc["kind"] == "ConfigMap":
            for key, text in doc["data"].items():
                out.append((path.name, key, text))
    return out


@pytest.mark.parametrize("item", configmap_configs(), ids=lambda i: f"{i[0]}:{i[1]}")
def test_configmap_configs_load(item, tmp_path):
    _, key, text = item
    cls = CONFIG_CLASSES[key.removesuffix(".yaml")]
    path = tmp_path / key
    path.write_text(text)
    config = load_config(cls, str(path))
    # Credentials come from the Secret, never from the config.
    assert config.storage_options == {}
    assert config.redacted_dict() == config.model_dump(mode="json")


def test_configmaps_are_mounted_under_the_names_the_args_use():
    for path in K8S:
        docs = load_docs(path)
        keys = {k for d in docs if d["kind"] == "ConfigMap" for k in d["data"]}
        for job in (d for d in docs if d["kind"] == "Job"):
            (c,) = job["spec"]["template"]["spec"]["containers"]
            assert Path(c["args"][2]).name in keys, (path.name, c["args"])


# --- kustomize ----------------------------------------------------------------------------

KUSTOMIZATION = REPO / "k8s" / "kustomization.yaml"


def kustomization() -> dict:
    return yaml.safe_load(KUSTOMIZATION.read_text())


def object_key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def test_kustomization_lists_existing_manifests():
    k = kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert k["kind"] == "Kustomization"
    resources = k["resources"]
    assert len(resources) == len(set(resources))
    for name in resources:
        assert (KUSTOMIZATION.parent / name).is_file(), name
    assert {"train-job.yaml", "predict-job.yaml", "label-job.yaml"} <= set(resources)
    # No generator that would define the files' own ConfigMaps a second time.
    assert "configMapGenerator" not in k
    listed = [d for name in resources for d in load_docs(KUSTOMIZATION.parent / name)]
    names = [object_key(d) for d in listed]
    assert len(names) == len(set(names))
    # Every ConfigMap a listed Job mounts is listed too.
    configmaps = {n for kind, n in names if kind == "ConfigMap"}
    for job in (d for d in listed if d["kind"] == "Job"):
        for vol in job["spec"]["template"]["spec"]["volumes"]:
            if "configMap" in vol:
                assert vol["configMap"]["name"] in configmaps


def test_kustomization_images_match_the_manifests():
    """`kustomize edit set image catena-mito=...` rewrites images named catena-mito."""
    (entry,) = kustomization()["images"]
    for _, job in jobs():
        for c in job["spec"]["template"]["spec"]["containers"]:
            name, tag = c["image"].rsplit(":", 1)
            assert name == entry["name"] and tag == entry["newTag"], c["image"]


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_every_object_names_its_stage(path):
    """`kubectl apply -l catena-mito/stage=STAGE` picks one stage out of the kustomization."""
    stage = path.name.removesuffix("-job.yaml")
    for doc in load_docs(path):
        assert doc["metadata"]["labels"]["catena-mito/stage"] == stage, object_key(doc)
    assert f"catena-mito/stage={stage}" in KUSTOMIZATION.read_text()


def test_kustomize_build_sets_the_image(tmp_path):
    """Build the kustomization as the docs say to use it, with an image of another
    registry; needs `kubectl` (its built-in kustomize) or `kustomize`, else skipped: the
    structural tests above still run."""
    kubectl, kustomize_bin = shutil.which("kubectl"), shutil.which("kustomize")
    if not (kubectl or kustomize_bin):
        pytest.skip("neither kubectl nor kustomize is installed")
    work = tmp_path / "k8s"
    shutil.copytree(REPO / "k8s", work)
    k = kustomization()
    # What `kustomize edit set image catena-mito=registry.example.org/catena-mito:0.2.0` writes.
    k["images"] = [{"name": "catena-mito", "newName": "registry.example.org/catena-mito",
                    "newTag": "0.2.0"}]
    (work / "kustomization.yaml").write_text(yaml.safe_dump(k))
    cmd = [kubectl, "kustomize", str(work)] if kubectl else [kustomize_bin, "build", str(work)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert sorted(map(object_key, built)) == sorted(object_key(d) for _, d in all_docs())
    for doc in (d for d in built if d["kind"] == "Job"):
        for c in doc["spec"]["template"]["spec"]["containers"]:
            assert c["image"] == "registry.example.org/catena-mito:0.2.0"
    for stage in ("train", "predict", "label"):
        picked = {object_key(d) for d in built if d["metadata"]["labels"]["catena-mito/stage"] == stage}
        assert picked == {object_key(d) for d in load_docs(REPO / "k8s" / f"{stage}-job.yaml")}


# --- job configs --------------------------------------------------------------------------


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_job_configs_load(path):
    cls = CONFIG_CLASSES[path.stem]
    config = load_config(cls, str(path))
    assert config.storage_options == {}
    data = config.model_dump()
    urls = [data[f] for f in URL_FIELDS if isinstance(data.get(f), str)]
    urls += [u for f in URL_FIELDS if isinstance(data.get(f), list) for u in data[f]]
    assert urls
    if path.parent.name == "s3":
        assert all(u.startswith("s3://") for u in urls), urls
    else:
        assert not any("://" in u for u in urls), urls


def test_local_configs_chain_train_predict_label():
    train = load_config(TrainConfig, str(REPO / "jobs/local/train.yaml"))
    predict = load_config(PredictConfig, str(REPO / "jobs/local/predict.yaml"))
    label = load_config(LabelConfig, str(REPO / "jobs/local/label.yaml"))
    assert predict.model_path.startswith(f"{train.runs_dir}/{train.exp_name}/")
    assert label.input_prediction_path == f"{predict.output_dir}/{predict.output_filename}"


def test_s3_configs_chain_train_predict_label():
    train = load_config(TrainConfig, str(REPO / "jobs/s3/train.yaml"))
    predict = load_config(PredictConfig, str(REPO / "jobs/s3/predict.yaml"))
    label = load_config(LabelConfig, str(REPO / "jobs/s3/label.yaml"))
    assert predict.model_path.startswith(f"{train.runs_dir}/{train.exp_name}/")
    assert label.input_prediction_path == f"{predict.output_dir}/{predict.output_filename}"


# --- Slurm --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SLURM, ids=lambda p: p.name)
def test_slurm_scripts_parse_and_are_executable(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert path.stat().st_mode & stat.S_IXUSR
    text = path.read_text()
    assert text.startswith("#!/bin/bash")
    assert "set -euo pipefail" in text


def fake_bin(tmp_path: Path, name: str, body: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / name
    tool.write_text("#!/bin/bash\n" + body)
    tool.chmod(0o755)


def run_script(tmp_path: Path, script: Path, *args: str, env: dict[str, str] | None = None):
    full_env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", **(env or {})}
    # The scheduler variables of whatever runs the tests must not leak into the script.
    for var in list(full_env):
        if var.startswith(("JOB_COMPLETION_INDEX", "CATENA_", "SLURM_")) and var not in (env or {}):
            full_env.pop(var)
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env=full_env, cwd=tmp_path
    )


SHARDED_SCRIPTS = ("predict.sbatch", "label-blocks.sbatch", "label-grow.sbatch", "label-relabel.sbatch")


def slurm_array(task_id: int, *tasks: int) -> dict[str, str]:
    """The variables Slurm sets in one task of an array made of ``tasks``."""
    return {
        "SLURM_ARRAY_TASK_ID": str(task_id),
        "SLURM_ARRAY_TASK_COUNT": str(len(tasks)),
        "SLURM_ARRAY_TASK_MIN": str(min(tasks)),
        "SLURM_ARRAY_TASK_MAX": str(max(tasks)),
    }


def fake_apptainer(tmp_path: Path) -> Path:
    """A stand-in `apptainer` that records its arguments and resolves the shard as the CLI
    would inside the container (one line: `shard INDEX COUNT`, or the error, exit 2)."""
    record = tmp_path / "apptainer.args"
    fake_bin(
        tmp_path,
        "apptainer",
        f'printf "%s\\n" "$@" > {record}\n'
        f'exec {sys.executable} -c "import sys\n'
        "from catena_mito.blockwise.sharding import resolve_shard\n"
        "from catena_mito.errors import ShardError\n"
        "try: print('shard', *resolve_shard())\n"
        "except ShardError as e: sys.exit(f'error: {e}')\n"
        '"\n',
    )
    return record


@pytest.mark.parametrize(
    ("script", "subcommand", "gpu"),
    [
        ("train.sbatch", ["train"], True),
        ("predict.sbatch", ["predict"], True),
        ("label-blocks.sbatch", ["label", "--phase", "blocks"], False),
        ("label-merge.sbatch", ["label", "--phase", "merge"], False),
        ("label-grow.sbatch", ["label", "--phase", "grow"], False),
        ("label-sizes.sbatch", ["label", "--phase", "sizes"], False),
        ("label-relabel.sbatch", ["label", "--phase", "relabel"], False),
        ("label-clean.sbatch", ["label", "--phase", "clean"], False),
    ],
)
def test_sbatch_scripts_run_the_image_with_shards_from_slurm(tmp_path, script, subcommand, gpu):
    """Run each sbatch script, as the task 5 of its default array, with a stand-in
    `apptainer`."""
    record = fake_apptainer(tmp_path)
    sharded = script in SHARDED_SCRIPTS
    slurm_env = slurm_array(5, *range(8)) if sharded else {}
    result = run_script(tmp_path, REPO / "jobs/slurm" / script, "my.yaml", env=slurm_env)
    assert result.returncode == 0, result.stderr
    args = record.read_text().split("\n")[:-1]
    assert args[0] == "run"
    assert ("--nv" in args) == gpu
    sif = args.index("catena.sif")
    assert args[sif + 1] == subcommand[0]
    rest = args[sif + 2 :]
    assert rest[rest.index("--config") + 1] == "my.yaml"
    for flag in subcommand[1:]:
        assert flag in rest
    # No explicit shard flags: the CLI reads SLURM_ARRAY_TASK_ID / CATENA_NUM_SHARDS.
    assert "--shard-index" not in rest and "--num-shards" not in rest
    if sharded:
        assert "shard 5 8" in result.stdout
    elif script != "train.sbatch":
        assert "shard 0 1" in result.stdout


def sbatch_array_default(text: str) -> str | None:
    found = re.search(r"^#SBATCH --array=(\S+)$", text, re.M)
    return found and found.group(1)


@pytest.mark.parametrize("script", SHARDED_SCRIPTS)
def test_sharded_sbatch_scripts_state_their_shard_count(script):
    """The count is CATENA_NUM_SHARDS, exported at the top with the default that matches
    the `#SBATCH --array=0-(N-1)` default; the task id is the shard index."""
    text = (REPO / "jobs/slurm" / script).read_text()
    found = re.search(r'^export CATENA_NUM_SHARDS=\$\{CATENA_NUM_SHARDS:-(\d+)\}$', text, re.M)
    assert found, script
    assert sbatch_array_default(text) == f"0-{int(found.group(1)) - 1}"
    assert text.index("export CATENA_NUM_SHARDS") < text.index("exec apptainer")
    assert "0..N-1" in text and "--array=5" in text


@pytest.mark.parametrize("script", ["label-merge.sbatch", "label-sizes.sbatch", "label-clean.sbatch"])
def test_single_process_sbatch_scripts_are_one_shard(tmp_path, script):
    text = (REPO / "jobs/slurm" / script).read_text()
    assert sbatch_array_default(text) is None
    assert re.search(r"^export CATENA_NUM_SHARDS=1$", text, re.M)
    # A count exported in the submitting shell does not leak into the one process.
    fake_apptainer(tmp_path)
    result = run_script(tmp_path, REPO / "jobs/slurm" / script, "my.yaml",
                        env={"CATENA_NUM_SHARDS": "8"})
    assert result.returncode == 0, result.stderr
    assert "shard 0 1" in result.stdout


@pytest.mark.parametrize("script", SHARDED_SCRIPTS)
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        # one failed task resubmitted alone: `sbatch --array=5 ...`
        (slurm_array(5, 5), "shard 5 8"),
        # `--array=3,5`
        (slurm_array(5, 3, 5), "shard 5 8"),
        (slurm_array(3, 3, 5), "shard 3 8"),
        # a bigger run: CATENA_NUM_SHARDS=16 sbatch --array=0-15 ...
        ({**slurm_array(12, *range(16)), "CATENA_NUM_SHARDS": "16"}, "shard 12 16"),
        # ... and one of its tasks resubmitted with the same count
        ({**slurm_array(12, 12), "CATENA_NUM_SHARDS": "16"}, "shard 12 16"),
    ],
    ids=["array=5", "array=3,5:5", "array=3,5:3", "16-shards", "16-shards:array=12"],
)
def test_resubmitted_slurm_tasks_keep_their_shard(tmp_path, script, env, expected):
    """Once, `--array=5` became shard 0 of 1, the whole volume, next to running tasks."""
    fake_apptainer(tmp_path)
    result = run_script(tmp_path, REPO / "jobs/slurm" / script, "my.yaml", env=env)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


@pytest.mark.parametrize("script", SHARDED_SCRIPTS)
def test_a_task_beyond_the_shard_count_is_refused(tmp_path, script):
    # `sbatch --array=0-15` without CATENA_NUM_SHARDS=16: tasks 8..15 fail, none wraps.
    fake_apptainer(tmp_path)
    result = run_script(tmp_path, REPO / "jobs/slurm" / script, "my.yaml",
                        env=slurm_array(9, *range(16)))
    assert result.returncode != 0
    assert "shard_index must be in [0, 8), got 9" in result.stderr


def test_label_sh_chains_the_phases_with_dependencies(tmp_path):
    log = tmp_path / "sbatch.log"
    # A stand-in sbatch: logs its arguments and answers "<id>;cluster" like --parsable does.
    fake_bin(
        tmp_path,
        "sbatch",
        f"n=$(( $(wc -l < {log} 2>/dev/null || echo 0) + 1 ))\n"
        f'echo "$*" >> {log}\n'
        'echo "$((1000 + n));cluster"\n',
    )
    result = run_script(tmp_path, REPO / "jobs/slurm/label.sh", "cfg.yaml", "4")
    assert result.returncode == 0, result.stderr
    from catena_mito.label import PHASES, SINGLE_PROCESS_PHASES

    lines = log.read_text().splitlines()
    order = [p for p in PHASES if p != "all"]
    # one submission per phase of the CLI, in its order, each after the one before
    assert len(lines) == len(order)
    for n, (phase, line) in enumerate(zip(order, lines)):
        assert f"label-{phase}.sbatch cfg.yaml" in line, (phase, line)
        assert (REPO / "jobs/slurm" / f"label-{phase}.sbatch").is_file()
        if n:
            assert f"--dependency=afterok:{1000 + n} " in line, (phase, line)
        else:
            assert "--dependency" not in line
        if phase in SINGLE_PROCESS_PHASES:
            assert "--array" not in line, phase
        else:
            # The count travels with the array, so every task is shard i of 4 of the same run.
            assert "--array=0-3" in line and "--export=ALL,CATENA_NUM_SHARDS=4 " in line, phase


def test_label_sh_rejects_a_bad_shard_count(tmp_path):
    fake_bin(tmp_path, "sbatch", "exit 99\n")
    result = run_script(tmp_path, REPO / "jobs/slurm/label.sh", "cfg.yaml", "zero")
    assert result.returncode == 2
    assert "SHARDS" in result.stderr


# --- the image ----------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [venv_tool("hadolint"), "--no-color", str(REPO / "containers" / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract():
    text = (REPO / "containers" / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert re.search(r"^ARG BASE_IMAGE=\S*pytorch\S*cuda", text, re.M)
    assert re.search(r"^ARG TORCH_SPEC=", text, re.M)
    for arg in ("PIP_FIND_LINKS", "PIP_NO_INDEX", "WHEELHOUSE"):
        assert re.search(rf"^ARG {arg}=", text, re.M), arg
    assert f"USER {UID}" in text
    # tini is PID 1: signals forwarded to catena-mito, zombies reaped; no -g (see below).
    assert instructions[-2:] == ['ENTRYPOINT ["/usr/bin/tini", "--", "catena-mito"]', 'CMD ["--help"]']
    # Installed as root, before USER, by apt only where the base lacks it (the offline
    # build has no network), and checked to run.
    tini_step = text.index("apt-get install -y --no-install-recommends tini")
    assert tini_step < text.index("USER 10001")
    assert "if ! [ -x /usr/bin/tini ]" in text and "/usr/bin/tini --version" in text
    assert "rm -rf /var/lib/apt/lists/*" in text
    assert re.search(r"^\s+TINI_SUBREAPER=1", text, re.M)
    # Dependencies are installed before the package source is copied (layer cache).
    assert text.index("COPY pyproject.toml") < text.index("COPY catena_mito")
    assert "--no-cache-dir" in text
    # No credentials baked in.
    assert not re.search(r"^(ENV|ARG)\s+AWS_", text, re.M)
    for line in (ln for ln in text.splitlines() if "hadolint ignore" in ln):
        # Every ignore comes with a comment saying why, on the lines just above.
        before = text[: text.index(line)].splitlines()[-1]
        assert before.startswith("#") and "ignore" not in before


def test_dockerignore_keeps_the_context_small():
    lines = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    # Deny by default, then allow only what the Dockerfile copies or mounts.
    assert lines[0] == "**"
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    assert {"pyproject.toml", "README.md", "catena_mito/**"} <= allowed
    wheelhouse = re.search(
        r"^ARG WHEELHOUSE=(\S+)", (REPO / "containers/Dockerfile").read_text(), re.M
    )
    assert f"{wheelhouse.group(1)}/**" in allowed
    assert (REPO / wheelhouse.group(1)).is_dir()


def test_build_local_script():
    path = REPO / "containers" / "build-local.sh"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert path.stat().st_mode & stat.S_IXUSR
    text = path.read_text()
    for needle in (
        "debootstrap",
        "podman import",
        "podman build --network=none",
        "--runtime runc",
        "PIP_NO_INDEX=1",
        "need runc",
        # The offline base carries the image's init: the Dockerfile cannot apt-get it.
        "python3-pip,ca-certificates,tini",
        "test -x /usr/bin/tini",
    ):
        assert needle in text, needle
    # Podman needs runc (RUN_OPTS asks for it; Debian's podman does not pull it in).
    install = "apt-get install -y podman buildah debootstrap runc"
    assert install in text
    assert install in (REPO / "docs" / "deploy.md").read_text()


def test_build_local_script_stops_when_runc_is_missing(tmp_path):
    """A fresh Debian machine with podman and debootstrap but no runc: the script says what
    to install before anything else runs (no podman call, no debootstrap)."""
    log = tmp_path / "calls.log"
    for tool in ("podman", "debootstrap"):
        fake_bin(tmp_path, tool, f'echo "{tool} $*" >> {log}\nexit 0\n')
    bin_dir = tmp_path / "bin"
    # A PATH with the stand-ins and the basic tools only, none of which is runc.
    for tool in ("bash", "dirname", "cat", "grep", "awk", "head", "date"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    if shutil.which("runc", path="/usr/sbin:/sbin") or Path("/usr/sbin/runc").exists():
        pytest.skip("runc is installed in /usr/sbin here; the script would find it")
    result = subprocess.run(
        ["bash", str(REPO / "containers" / "build-local.sh"), "--skip-smoke"],
        capture_output=True,
        text=True,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        timeout=60,
    )
    assert result.returncode == 1
    assert "'runc' not found" in result.stderr
    assert "apt-get install -y podman buildah debootstrap runc" in result.stderr
    assert not log.exists()


# --- Apptainer ----------------------------------------------------------------------------


def test_apptainer_recipe_parses():
    from spython.main.parse.parsers import SingularityParser

    path = REPO / "apptainer" / "catena.def"
    recipe = SingularityParser(str(path)).recipe
    (stage,) = recipe.values()
    assert stage.fromHeader
    runscript = [ln for ln in stage.cmd.strip().splitlines() if not ln.strip().startswith("#")]
    assert [ln.strip() for ln in runscript] == ['exec catena-mito "$@"']
    assert stage.test, "%test is missing"
    assert any("org.opencontainers.image.title" in label for label in stage.labels)
    assert any(e.startswith("PATH=/opt/catena/bin") for e in stage.environ)

    text = path.read_text()
    sections = re.findall(r"^%(\w+)", text, re.M)
    assert {"labels", "environment", "runscript", "test", "help"} <= set(sections)
    assert re.search(r"^Bootstrap: (docker|docker-daemon)$", text, re.M)
    test_section = text.split("%test", 1)[1].split("\n%", 1)[0]
    assert "catena-mito --help" in test_section
    help_section = text.split("%help", 1)[1].split("\n%", 1)[0]
    assert "apptainer run --nv catena.sif predict --config" in help_section
    assert "--bind" in help_section
    assert "CATENA_NUM_SHARDS" in help_section and "SLURM_ARRAY_TASK_COUNT" not in help_section
    # No tini in the runscript: Apptainer does its own init, and the recipe says so.
    runscript_section = text.split("%runscript", 1)[1].split("\n%", 1)[0]
    assert "tini" not in "".join(runscript) and "own init" in runscript_section


# --- the label Jobs, run as Kubernetes runs them ------------------------------------------


def label_job_args() -> dict[str, tuple[list[str], dict[str, str], int]]:
    """phase -> (args after `catena-mito`, env set by the manifest, completions)."""
    out = {}
    for job in (d for d in load_docs(REPO / "k8s" / "label-job.yaml") if d["kind"] == "Job"):
        (c,) = job["spec"]["template"]["spec"]["containers"]
        env = {k: e["value"] for k, e in env_of(c).items() if "value" in e}
        phase = c["args"][c["args"].index("--phase") + 1]
        out[phase] = (c["args"], env, job["spec"].get("completions", 1))
    return out


@pytest.mark.slow
def test_label_jobs_started_together_finish_in_order(tmp_path):
    """Start every pod of k8s/label-job.yaml at once, the waiting ones first, with the
    manifest's own args and env (shard index from JOB_COMPLETION_INDEX only), on a
    volume in many blocks: all exit 0 and the result equals a single `--phase all` run."""
    import numpy as np
    import zarr

    rng = np.random.default_rng(0)
    prob = (rng.random((24, 40, 40)) > 0.95).astype("uint8") * 255
    store = tmp_path / "pred.zarr"
    zarr.open_array(str(store), mode="w", shape=prob.shape, chunks=(8, 8, 8), dtype="uint8")[:] = (
        prob
    )

    def config(name: str) -> Path:
        text = (REPO / "jobs" / "local" / "label.yaml").read_text()
        cfg = yaml.safe_load(text)
        cfg.update(
            input_prediction_path=str(store),
            output_instance_dir=str(tmp_path / name),
            chunk_size=[8, 16, 16],
            thres_small_instances=3,
        )
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    cli = venv_tool("catena-mito")
    base_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CATENA_", "JOB_"))
    }

    reference = subprocess.run(
        [cli, "label", "--config", str(config("single")), "--phase", "all"],
        capture_output=True,
        text=True,
        env=base_env,
    )
    assert reference.returncode == 0, reference.stderr

    sharded_cfg = config("sharded")
    jobs_ = label_job_args()
    procs = []
    # Waiting phases first, so they really have to wait for the markers (every phase of
    # the file: grow and sizes do nothing in this connected-components config).
    for phase in reversed(list(jobs_)):
        args, env, completions = jobs_[phase]
        args = [a if not a.startswith("/etc/catena/") else str(sharded_cfg) for a in args]
        if "--wait-timeout" in args:
            args[args.index("--wait-timeout") + 1] = "120"
        for index in range(completions):
            pod_env = {**base_env, **env}
            if completions > 1:
                pod_env["JOB_COMPLETION_INDEX"] = str(index)
            procs.append(
                (
                    phase,
                    index,
                    subprocess.Popen(
                        [cli, *args],
                        env=pod_env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                )
            )
    for phase, index, proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{phase} {index}: {err[-2000:]}"

    single = zarr.open_array(str(tmp_path / "single" / "mito_instances"), mode="r")[:]
    sharded = zarr.open_array(str(tmp_path / "sharded" / "mito_instances"), mode="r")[:]
    assert single.max() > 10  # many objects, many crossing block faces
    np.testing.assert_array_equal(sharded, single)
