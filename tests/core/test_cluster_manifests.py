"""The KubeRay manifests, Dockerfile and versions in cluster/, checked offline by dino_ray.cluster_check.

Every mutation is made on a copy of the repository files in tmp_path (the shipped files are never
touched), and each must fail with a message that names the offending field.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest
import yaml

from dino_ray import cluster_check
from testlib import CRD_DIR, require_path
from dino_ray.cluster_check import check_cluster, parse_dockerfile, parse_entrypoint, validate_schema

REPO = Path(__file__).resolve().parents[2]
JOB_NAMES = ("curate", "pretrain", "highres", "distill", "eval", "pipeline")
ROOT = "output_root=s3://change-me-bucket/dino-ray/runs/run-001"


@pytest.fixture(scope="module")
def crd_dir() -> Path:
    require_path(CRD_DIR / "ray.io_rayjobs.yaml", "KubeRay v1.7.0 CRDs")
    require_path(CRD_DIR / "ray.io_rayclusters.yaml", "KubeRay v1.7.0 CRDs")
    return CRD_DIR


def _write_stand_in_jobs(jobs: Path) -> None:
    jobs.mkdir(parents=True, exist_ok=True)
    for name in JOB_NAMES:
        path = jobs / f"{name}.yaml"
        path.write_text(f"#!/usr/bin/env -S dino-ray run\nstages: [{name}]\n")
        path.chmod(0o755)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A stand-in repository: the shipped cluster/ and pyproject.toml, stand-in jobs and sources."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(REPO / "cluster", root / "cluster")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    shutil.copytree(REPO / "requirements", root / "requirements")
    (root / "README.md").write_text("stand-in\n")
    (root / "dino_ray").mkdir()
    (root / "dino_ray" / "__init__.py").write_text("")
    _write_stand_in_jobs(root / "jobs")
    return root


@pytest.fixture
def repo(pristine, tmp_path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(pristine, root)
    return root


def _problems(root: Path, crd_dir: Path, **kwargs) -> list[str]:
    return [str(p) for p in check_cluster(root / "cluster", crd_dir=crd_dir, **kwargs).problems]


def _edit_text(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def _edit_yaml(path: Path, change: Callable[[list], None]) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    change(docs)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def _group(doc: dict, name: str) -> dict:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == name)


def _assert_named(problems: list[str], *fragments: str) -> None:
    assert problems, "the mutated copy passed every check"
    assert any(all(f in p for f in fragments) for p in problems), "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# The shipped files


def test_shipped_manifests_pass(crd_dir):
    report = check_cluster(REPO / "cluster", crd_dir=crd_dir)
    assert report.ok, "\n".join(map(str, report.problems))


def test_copy_with_stand_in_jobs_passes_and_covers_every_stage(repo, crd_dir):
    report = check_cluster(repo / "cluster", crd_dir=crd_dir)
    assert report.ok, "\n".join(map(str, report.problems))
    manifests, _ = cluster_check.load_manifests(repo / "cluster")
    kinds = [m.kind for m in manifests]
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == len(JOB_NAMES)
    entrypoints = {parse_entrypoint(m.spec["entrypoint"]).job_yaml for m in manifests if m.kind == "RayJob"}
    assert entrypoints == {f"jobs/{name}.yaml" for name in JOB_NAMES}


# ------------------------------------------------------------------------------------------------
# Schema (strict CRD validation)

TEXT_MUTATIONS = [
    pytest.param("rayjob-pretrain.yaml", "shutdownAfterJobFinishes: true", "shutdownAfterJobFinish: true",
                 ("unknown field 'shutdownAfterJobFinish'", "did you mean 'shutdownAfterJobFinishes'"),
                 id="misspelled-field"),
    pytest.param("raycluster.yaml", "      replicas: 0\n", '      replicas: "two"\n',
                 ("workerGroupSpecs[0].replicas", "'two' is not of type 'integer'"), id="replicas-two"),
    pytest.param("raycluster.yaml", 'num-cpus: "0"', "num-cpus: 0",
                 ("rayStartParams.num-cpus", "not of type 'string'"), id="int-start-param"),
    pytest.param("rayjob-highres.yaml", "cpu: \"64\"", "cpu: lots",
                 ("resources.limits.cpu",), id="bad-quantity"),
    pytest.param("mlflow.yaml", "imagePullPolicy: IfNotPresent", "imagePullPolcy: IfNotPresent",
                 ("unknown field 'imagePullPolcy'",), id="deployment-typo"),
    pytest.param("rayjob-eval.yaml", "apiVersion: ray.io/v1", "apiVersion: ray.io/v1alpha1",
                 ("apiVersion", "ray.io/v1alpha1"), id="old-api-version"),
]


@pytest.mark.parametrize("file, old, new, fragments", TEXT_MUTATIONS)
def test_schema_mutations_fail(repo, crd_dir, file, old, new, fragments):
    _edit_text(repo / "cluster" / file, old, new)
    _assert_named(_problems(repo, crd_dir), *fragments)


def test_strict_schema_keeps_int_or_string_and_null_pruning(crd_dir):
    doc = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"},
           "spec": {"headGroupSpec": {"rayStartParams": {}, "template": {
               "metadata": None,  # KubeRay samples write `metadata:`; the API server prunes the null
               "spec": {"containers": [{"name": "ray-head", "image": "rayproject/ray:2.60.0",
                                        "resources": {"limits": {"cpu": 1, "memory": "2G"},
                                                      "requests": {"cpu": "500m"}}}]}}}}}
    assert validate_schema(doc, crd_dir) == []
    doc["spec"]["headGroupSpec"]["template"]["spec"]["volumes"] = [{"name": "v", "emptyDir": {"medum": "Memory"}}]
    errors = validate_schema(doc, crd_dir)
    assert errors and errors[0][0].endswith("volumes[0].emptyDir") and "'medum'" in errors[0][1]


def test_unknown_kind_is_reported_not_ignored(crd_dir):
    doc = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "x"}, "spec": {}}
    assert validate_schema(doc, crd_dir)[0][0] == "kind"


def test_schema_validators_are_cached(crd_dir):
    first = cluster_check.schema_validator(crd_dir.resolve(), "RayJob")
    assert cluster_check.schema_validator(crd_dir.resolve(), "RayJob") is first


# ------------------------------------------------------------------------------------------------
# Our own rules


RULE_MUTATIONS = [
    pytest.param("rayjob-eval.yaml", "entrypoint: dino-ray run jobs/eval.yaml",
                 "entrypoint: dino-ray run jobs/evaluation.yaml",
                 ("spec.entrypoint", "'jobs/evaluation.yaml' does not exist"), id="missing-job-yaml"),
    pytest.param("rayjob-distill.yaml", "dino-ray:0.1.0-ray2.60.0", "dino-ray:0.1.0-ray2.59.0",
                 ("containers[0].image", "ray2.59.0", "differs"), id="image-tag-mismatch"),
    pytest.param("rayjob-highres.yaml", 'rayVersion: "2.60.0"', 'rayVersion: "2.59.0"',
                 ("rayVersion", "'2.59.0' differs"), id="ray-version-mismatch"),
    pytest.param("raycluster.yaml", "serviceType: ClusterIP", "serviceType: LoadBalancer",
                 ("headGroupSpec.serviceType", "LoadBalancer"), id="loadbalancer-head"),
    pytest.param("mlflow.yaml", "type: ClusterIP", "type: NodePort", ("spec.type", "NodePort"),
                 id="nodeport-service"),
    pytest.param("rayjob-pretrain.yaml", "submissionMode: K8sJobMode", "submissionMode: K8sMode",
                 ("spec.submissionMode", "'K8sMode'"), id="submission-mode"),
    pytest.param("rayjob-curate.yaml", f"yaml {ROOT}\n  #", "yaml output_root=s3://b/runs/$(date +%s)\n  #",
                 ("output_root", "fixed"), id="unfixed-output-root"),
    pytest.param("rayjob-curate.yaml", f"yaml {ROOT}\n  #", f"yaml {ROOT[:-1]}2\n  #", ("output_root", "differs"),
                 id="diverging-output-root"),
    pytest.param("rayjob-pretrain.yaml", "  jobId: dino-ray-pretrain-run-001\n", "",
                 ("spec.jobId", "fixed submission id"), id="no-job-id"),
    pytest.param("rayjob-eval.yaml", "  name: dino-ray-eval\n", "  generateName: dino-ray-eval-\n",
                 ("metadata.name", "fixed name"), id="generate-name"),
    pytest.param("raycluster.yaml", "mode: token", "mode: disabled", ("authOptions", "token"), id="no-auth"),
    pytest.param("secrets.example.yaml", '"<secret access key>"', '"wJalrXUtnFEMI/K7MDENG"',
                 ("stringData.AWS_SECRET_ACCESS_KEY", "placeholders"), id="real-secret-value"),
    pytest.param("mlflow.yaml", "key: POSTGRES_DB", "key: POSTGRES_DATABASE",
                 ("'dino-ray-mlflow-db' key 'POSTGRES_DATABASE' is not declared",), id="undeclared-secret-key"),
    pytest.param("mlflow.yaml", "$(POSTGRES_PASSWORD)@", "hunter2@", ("MLFLOW_BACKEND_STORE_URI", "password"),
                 id="password-in-url"),
    pytest.param("Dockerfile", "USER 1000:100\nWORKDIR", "USER root\nWORKDIR", ("USER", "non-root"),
                 id="root-image"),
    pytest.param("Dockerfile", "ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.0",
                 ("Dockerfile", "Ray 2.59.0", "differs from rayVersion 2.60.0"), id="dockerfile-ray-version"),
]


@pytest.mark.parametrize("file, old, new, fragments", RULE_MUTATIONS)
def test_rule_mutations_fail(repo, crd_dir, file, old, new, fragments):
    _edit_text(repo / "cluster" / file, old, new)
    _assert_named(_problems(repo, crd_dir), *fragments)


def test_copied_rayjob_needs_its_own_name(repo, crd_dir):
    cluster = repo / "cluster"
    shutil.copy(cluster / "rayjob-eval.yaml", cluster / "rayjob-pipeline.yaml")
    _assert_named(_problems(repo, crd_dir), "RayJob 'dino-ray-eval' is also defined in")


def test_inline_secret_env_fails(repo, crd_dir):
    def inline(docs):
        env = docs[0]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
        i = next(i for i, v in enumerate(env) if v["name"] == "AWS_SECRET_ACCESS_KEY")
        env[i] = {"name": "AWS_SECRET_ACCESS_KEY", "value": "not-a-real-key"}

    _edit_yaml(repo / "cluster" / "rayjob-pretrain.yaml", inline)
    _assert_named(_problems(repo, crd_dir), "env[", "AWS_SECRET_ACCESS_KEY has an inline value")


def test_secret_in_runtime_env_fails(repo, crd_dir):
    def add_runtime_env(docs):
        docs[0]["spec"]["runtimeEnvYAML"] = "env_vars:\n  MLFLOW_TRACKING_TOKEN: abc\n"

    _edit_yaml(repo / "cluster" / "rayjob-distill.yaml", add_runtime_env)
    _assert_named(_problems(repo, crd_dir), "runtimeEnvYAML", "MLFLOW_TRACKING_TOKEN")


def test_gpu_group_without_gpu_limits_fails(repo, crd_dir):
    def drop_gpus(docs):
        resources = _group(docs[0], "gpu-train")["template"]["spec"]["containers"][0]["resources"]
        for part in ("limits", "requests"):
            resources[part].pop("nvidia.com/gpu")

    _edit_yaml(repo / "cluster" / "raycluster.yaml", drop_gpus)
    _assert_named(_problems(repo, crd_dir), "GPU group 'gpu-train'", "nvidia.com/gpu", "resources.limits")


def test_gpu_group_without_toleration_or_shm_fails(repo, crd_dir):
    def strip(docs):
        pod = _group(docs[0], "gpu-embed")["template"]["spec"]
        pod.pop("tolerations")
        pod["containers"][0]["volumeMounts"] = [m for m in pod["containers"][0]["volumeMounts"]
                                                if m["mountPath"] != "/dev/shm"]

    _edit_yaml(repo / "cluster" / "rayjob-curate.yaml", strip)
    problems = _problems(repo, crd_dir)
    _assert_named(problems, "gpu-embed", "does not tolerate")
    _assert_named(problems, "gpu-embed", "/dev/shm")


def test_autoscaler_v2_needs_restart_policy_never(repo, crd_dir):
    def always(docs):
        _group(docs[0], "cpu-data")["template"]["spec"]["restartPolicy"] = "Always"

    _edit_yaml(repo / "cluster" / "raycluster.yaml", always)
    _assert_named(_problems(repo, crd_dir), "workerGroupSpecs[0].template.spec.restartPolicy", "Never")


def test_pyproject_ray_bound_must_admit_cluster_version(repo, crd_dir):
    _edit_text(repo / "pyproject.toml", '"ray[default,train,data,tune]>=2.60"',
               '"ray[default,train,data,tune]>=2.55,<2.60"')
    _assert_named(_problems(repo, crd_dir), "pyproject.toml", "excludes rayVersion 2.60.0")


def test_missing_job_yaml_in_jobs_dir_argument(repo, crd_dir, tmp_path):
    jobs = tmp_path / "other-jobs"
    _write_stand_in_jobs(jobs)
    assert _problems(repo, crd_dir, jobs_dir=jobs) == []
    (jobs / "highres.yaml").unlink()
    (jobs / "eval.yaml").chmod(0o644)  # rayjobs run `dino-ray run jobs/eval.yaml`: no run bit needed
    problems = _problems(repo, crd_dir, jobs_dir=jobs)
    assert len(problems) == 1
    _assert_named(problems, "rayjob-highres.yaml", "'jobs/highres.yaml' does not exist", str(jobs))


def test_direct_job_yaml_entrypoint_needs_run_bit(repo, crd_dir):
    _edit_text(repo / "cluster" / "rayjob-eval.yaml", "entrypoint: dino-ray run jobs/eval.yaml",
               "entrypoint: jobs/eval.yaml")
    assert _problems(repo, crd_dir) == []
    (repo / "jobs" / "eval.yaml").chmod(0o644)
    _assert_named(_problems(repo, crd_dir), "spec.entrypoint", "executable file with a shebang")


# ------------------------------------------------------------------------------------------------
# Parsers and CLI


def test_parse_entrypoint_forms():
    cmd = parse_entrypoint("dino-ray run jobs/pretrain.yaml output_root=s3://b/r 'train.lr=1e-4'")
    assert (cmd.job_yaml, cmd.overrides, cmd.direct) == ("jobs/pretrain.yaml", ["output_root=s3://b/r",
                                                                                "train.lr=1e-4"], False)
    assert parse_entrypoint("python -m dino_ray.cli run jobs/eval.yaml").job_yaml == "jobs/eval.yaml"
    assert parse_entrypoint("jobs/eval.yaml x=1").direct
    for bad in ("python train.py", "dino-ray run", "cd /app && dino-ray run jobs/x.yaml"):
        with pytest.raises(ValueError, match="entrypoint"):
            parse_entrypoint(bad)


def test_parse_dockerfile_substitutes_args_and_joins_lines(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text("# syntax=docker/dockerfile:1\nARG V=2.60.0\nFROM rayproject/ray:${V}-py311-gpu\n"
                    "RUN pip install \\\n    # a comment inside a continuation\n    \"ray==$V\"\nUSER 1000\n")
    ops = [(i.op, i.args) for i in parse_dockerfile(path)]
    assert ops == [("ARG", "V=2.60.0"), ("FROM", "rayproject/ray:2.60.0-py311-gpu"),
                   ("RUN", 'pip install "ray==2.60.0"'), ("USER", "1000")]
    facts = cluster_check.dockerfile_facts(path)
    assert [v for _, v in facts["ray_versions"]] == ["2.60.0", "2.60.0"] and facts["user"] == "1000"


def test_cli_prints_ok_or_problems(repo, crd_dir, capsys):
    cluster = str(repo / "cluster")
    assert cluster_check.main([cluster, "--crds", str(crd_dir)]) == 0
    assert capsys.readouterr().out.startswith("OK:")
    _edit_text(repo / "cluster" / "rayjob-pretrain.yaml", "shutdownAfterJobFinishes: true",
               "shutdownAfterJobFinish: true")
    assert cluster_check.main([cluster, "--crds", str(crd_dir)]) == 1
    out = capsys.readouterr().out
    assert "cluster/rayjob-pretrain.yaml[0] RayJob/dino-ray-pretrain: spec: unknown field" in out
    assert out.rstrip().endswith(f"problem(s) in {cluster}")
