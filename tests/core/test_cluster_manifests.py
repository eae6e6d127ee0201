"""The KubeRay manifests, Dockerfile, build script and demo-data step in cluster/, checked offline.

Most checks are dino_ray.cluster_check's: every mutation is made on a copy of the repository files in
tmp_path (the shipped files are never touched), and each must fail with a message that names the
offending field. The rest pin down what the issue behind cluster/README.md asked for and no schema can
say: what `kubectl apply -f cluster/` applies, the "restricted" Pod Security Standard on every pod,
images that never float, a build that records its commit, and jobs whose data a documented step wrote.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
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
IMAGE = "ghcr.io/your-org/dino-ray:0.1.0-ray2.60.0-000000000000"  # the placeholder cluster/build.sh replaces


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
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == len(JOB_NAMES) and kinds.count("Job") == 1
    entrypoints = {parse_entrypoint(m.spec["entrypoint"]).job_yaml for m in manifests if m.kind == "RayJob"}
    assert entrypoints == {f"jobs/{name}.yaml" for name in JOB_NAMES}


# ------------------------------------------------------------------------------------------------
# Schema (strict CRD validation)

TEXT_MUTATIONS = [
    pytest.param("jobs/rayjob-pretrain.yaml", "shutdownAfterJobFinishes: true", "shutdownAfterJobFinish: true",
                 ("unknown field 'shutdownAfterJobFinish'", "did you mean 'shutdownAfterJobFinishes'"),
                 id="misspelled-field"),
    pytest.param("raycluster.yaml", "      replicas: 0\n", '      replicas: "two"\n',
                 ("workerGroupSpecs[0].replicas", "'two' is not of type 'integer'"), id="replicas-two"),
    pytest.param("raycluster.yaml", 'num-cpus: "0"', "num-cpus: 0",
                 ("rayStartParams.num-cpus", "not of type 'string'"), id="int-start-param"),
    pytest.param("jobs/rayjob-highres.yaml", "cpu: \"64\"", "cpu: lots",
                 ("resources.limits.cpu",), id="bad-quantity"),
    pytest.param("mlflow.yaml", "imagePullPolicy: IfNotPresent", "imagePullPolcy: IfNotPresent",
                 ("unknown field 'imagePullPolcy'",), id="deployment-typo"),
    pytest.param("jobs/rayjob-eval.yaml", "apiVersion: ray.io/v1", "apiVersion: ray.io/v1alpha1",
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
    pytest.param("jobs/rayjob-eval.yaml", "    dino-ray run jobs/eval.yaml", "    dino-ray run jobs/evaluation.yaml",
                 ("spec.entrypoint", "'jobs/evaluation.yaml' does not exist"), id="missing-job-yaml"),
    pytest.param("jobs/rayjob-distill.yaml", "dino-ray:0.1.0-ray2.60.0", "dino-ray:0.1.0-ray2.59.0",
                 ("containers[0].image", "ray2.59.0", "differs"), id="image-tag-mismatch"),
    pytest.param("jobs/rayjob-highres.yaml", 'rayVersion: "2.60.0"', 'rayVersion: "2.59.0"',
                 ("rayVersion", "'2.59.0' differs"), id="ray-version-mismatch"),
    pytest.param("raycluster.yaml", "serviceType: ClusterIP", "serviceType: LoadBalancer",
                 ("headGroupSpec.serviceType", "LoadBalancer"), id="loadbalancer-head"),
    pytest.param("mlflow.yaml", "type: ClusterIP", "type: NodePort", ("spec.type", "NodePort"),
                 id="nodeport-service"),
    pytest.param("jobs/rayjob-pretrain.yaml", "submissionMode: K8sJobMode", "submissionMode: K8sMode",
                 ("spec.submissionMode", "'K8sMode'"), id="submission-mode"),
    pytest.param("jobs/rayjob-curate.yaml", f"    dino-ray run jobs/curate.yaml {ROOT}\n",
                 "    dino-ray run jobs/curate.yaml output_root=s3://b/runs/$(date +%s)\n", ("output_root", "fixed"),
                 id="unfixed-output-root"),
    pytest.param("jobs/rayjob-curate.yaml", f"    dino-ray run jobs/curate.yaml {ROOT}\n",
                 f"    dino-ray run jobs/curate.yaml {ROOT[:-1]}2\n", ("output_root", "differs"),
                 id="diverging-output-root"),
    pytest.param("jobs/rayjob-pretrain.yaml", "  jobId: dino-ray-pretrain-run-001\n", "",
                 ("spec.jobId", "fixed submission id"), id="no-job-id"),
    pytest.param("jobs/rayjob-eval.yaml", "  name: dino-ray-eval\n", "  generateName: dino-ray-eval-\n",
                 ("metadata.name", "fixed name"), id="generate-name"),
    pytest.param("raycluster.yaml", "mode: token", "mode: disabled", ("authOptions", "token"), id="no-auth"),
    pytest.param("secrets.example.yaml.template", '"<secret access key>"', '"wJalrXUtnFEMI/K7MDENG"',
                 ("stringData.AWS_SECRET_ACCESS_KEY", "placeholders"), id="real-secret-value"),
    pytest.param("mlflow.yaml", "key: POSTGRES_DB", "key: POSTGRES_DATABASE",
                 ("'dino-ray-mlflow-db' key 'POSTGRES_DATABASE' is not declared",), id="undeclared-secret-key"),
    pytest.param("mlflow.yaml", "$(POSTGRES_PASSWORD)@", "hunter2@", ("MLFLOW_BACKEND_STORE_URI", "password"),
                 id="password-in-url"),
    pytest.param("Dockerfile", "USER 1000:100\nWORKDIR", "USER root\nWORKDIR", ("USER", "non-root"),
                 id="root-image"),
    pytest.param("Dockerfile", "ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.0",
                 ("Dockerfile", "Ray 2.59.0", "differs from rayVersion 2.60.0"), id="dockerfile-ray-version"),
    pytest.param("jobs/rayjob-curate.yaml", f"&image {IMAGE}", "&image ghcr.io/your-org/dino-ray:0.1.0-ray2.60.0",
                 ("image", "must end in the git commit"), id="tag-without-commit"),
]


@pytest.mark.parametrize("file, old, new, fragments", RULE_MUTATIONS)
def test_rule_mutations_fail(repo, crd_dir, file, old, new, fragments):
    _edit_text(repo / "cluster" / file, old, new)
    _assert_named(_problems(repo, crd_dir), *fragments)


def test_copied_rayjob_needs_its_own_name(repo, crd_dir):
    cluster = repo / "cluster"
    shutil.copy(cluster / "jobs" / "rayjob-eval.yaml", cluster / "jobs" / "rayjob-pipeline.yaml")
    _assert_named(_problems(repo, crd_dir), "RayJob 'dino-ray-eval' is also defined in")


def test_inline_secret_env_fails(repo, crd_dir):
    def inline(docs):
        env = docs[0]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
        i = next(i for i, v in enumerate(env) if v["name"] == "AWS_SECRET_ACCESS_KEY")
        env[i] = {"name": "AWS_SECRET_ACCESS_KEY", "value": "not-a-real-key"}

    _edit_yaml(repo / "cluster" / "jobs" / "rayjob-pretrain.yaml", inline)
    _assert_named(_problems(repo, crd_dir), "env[", "AWS_SECRET_ACCESS_KEY has an inline value")


def test_secret_in_runtime_env_fails(repo, crd_dir):
    def add_runtime_env(docs):
        docs[0]["spec"]["runtimeEnvYAML"] = "env_vars:\n  MLFLOW_TRACKING_TOKEN: abc\n"

    _edit_yaml(repo / "cluster" / "jobs" / "rayjob-distill.yaml", add_runtime_env)
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

    _edit_yaml(repo / "cluster" / "jobs" / "rayjob-curate.yaml", strip)
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
    _edit_text(repo / "cluster" / "jobs" / "rayjob-eval.yaml", "    dino-ray run jobs/eval.yaml",
               "    jobs/eval.yaml")
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
    _edit_text(repo / "cluster" / "jobs" / "rayjob-pretrain.yaml", "shutdownAfterJobFinishes: true",
               "shutdownAfterJobFinish: true")
    assert cluster_check.main([cluster, "--crds", str(crd_dir)]) == 1
    out = capsys.readouterr().out
    assert "cluster/jobs/rayjob-pretrain.yaml[0] RayJob/dino-ray-pretrain: spec: unknown field" in out
    assert out.rstrip().endswith(f"problem(s) in {cluster}")


# ------------------------------------------------------------------------------------------------
# `kubectl apply -f cluster/`: nothing that overwrites a Secret or starts a job


def _kubectl_reads(folder: Path, recursive: bool = False) -> list[Path]:
    """The files `kubectl apply -f folder/` (``-R``: recursive) reads: *.yaml, *.yml, *.json."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix in (".yaml", ".yml", ".json"))


def _kinds(files: list[Path]) -> list[str]:
    return [doc["kind"] for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]


def test_kubectl_apply_of_the_cluster_folder_is_safe():
    top_level = _kinds(_kubectl_reads(REPO / "cluster"))
    assert sorted(set(top_level)) == ["Deployment", "PersistentVolumeClaim", "RayCluster", "Service"], top_level
    everything = _kinds(_kubectl_reads(REPO / "cluster", recursive=True))
    assert "Secret" not in everything, "even `kubectl apply -R -f cluster/` must not apply the Secret template"
    assert (REPO / "cluster" / "secrets.example.yaml.template").is_file()


def test_secret_template_in_a_yaml_file_fails(repo, crd_dir):
    cluster = repo / "cluster"
    (cluster / "secrets.example.yaml.template").rename(cluster / "secrets.example.yaml")
    _assert_named(_problems(repo, crd_dir), "cluster/secrets.example.yaml[0] Secret/dino-ray-s3",
                  "overwrite the real Secret")


@pytest.mark.parametrize("name", ["rayjob-pipeline.yaml", "prepare-demo-data.yaml"])
def test_job_at_the_top_of_the_cluster_folder_fails(repo, crd_dir, name):
    cluster = repo / "cluster"
    (cluster / "jobs" / name).rename(cluster / name)
    _assert_named(_problems(repo, crd_dir), f"cluster/{name}[0]", "`kubectl apply -f cluster/` would start")


# ------------------------------------------------------------------------------------------------
# The "restricted" Pod Security Standard, on every pod the manifests make


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def _manifests() -> list:
    manifests, problems = cluster_check.load_manifests(REPO / "cluster")
    assert not problems
    return manifests


def _pod_templates(m) -> list[tuple[str, dict, list[tuple[str, dict]]]]:
    """``(where, pod spec, securityContexts of containers the operator adds)`` of every pod ``m`` makes."""
    from dino_ray.cluster_check.ray_spec import cluster_specs, groups

    pods = []
    if m.kind in ("Deployment", "Job"):
        pods.append(("spec.template.spec", m.spec["template"]["spec"], []))
    for path, cluster in cluster_specs(m):
        for group in groups(path, cluster):
            # KubeRay runs the autoscaler beside the head with autoscalerOptions.securityContext; the
            # init container it adds to workers copies the worker container's securityContext.
            extra = []
            if group.is_head and cluster.get("enableInTreeAutoscaling"):
                options = cluster.get("autoscalerOptions") or {}
                extra.append(("autoscalerOptions.securityContext", options.get("securityContext") or {}))
            pods.append((".".join(map(str, group.path)), group.pod_spec, extra))
    if m.kind == "RayJob" and m.spec.get("submitterPodTemplate"):
        pods.append(("spec.submitterPodTemplate.spec", m.spec["submitterPodTemplate"]["spec"], []))
    return pods


def _restricted_violations(pod: dict, extra: list[tuple[str, dict]]) -> list[str]:
    """What the "restricted" profile (Kubernetes Pod Security Standards) forbids, plus what this project
    asks of every pod: runAsNonRoot and the RuntimeDefault seccomp profile set on the pod itself."""
    out = [f"spec.{key}" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    pod_sc = pod.get("securityContext") or {}
    if pod_sc.get("runAsNonRoot") is not True or (pod_sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        out.append("pod securityContext: set runAsNonRoot: true and seccompProfile.type: RuntimeDefault")
    if pod_sc.get("runAsUser") == 0:
        out.append("pod securityContext.runAsUser is 0")
    for volume in pod.get("volumes") or []:
        if not set(volume) - {"name"} <= RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']}: {sorted(set(volume) - {'name'} - RESTRICTED_VOLUMES)}")
    containers = [(f"{field}[{c.get('name')}]", c.get("securityContext") or {}, c)
                  for field in ("initContainers", "containers", "ephemeralContainers") for c in pod.get(field) or []]
    for where, sc, container in containers + [(where, sc, {}) for where, sc in extra]:
        capabilities = sc.get("capabilities") or {}
        checks = {
            "privileged": not sc.get("privileged"),
            "allowPrivilegeEscalation: false": sc.get("allowPrivilegeEscalation") is False,
            "capabilities.drop: [ALL]": "ALL" in (capabilities.get("drop") or []),
            "capabilities.add beyond NET_BIND_SERVICE": set(capabilities.get("add") or []) <= {"NET_BIND_SERVICE"},
            "runAsNonRoot": sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True and sc.get("runAsUser") != 0,
            "seccompProfile": ((sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
                               in ("RuntimeDefault", "Localhost")),
            "hostPort": not any(port.get("hostPort") for port in container.get("ports") or []),
        }
        out += [f"{where}: {name}" for name, ok in checks.items() if not ok]
    return out


def test_every_pod_meets_the_restricted_pod_security_standard():
    seen = []
    for m in _manifests():
        for where, pod, extra in _pod_templates(m):
            seen.append(f"{m.source} {m.kind}/{m.name} {where}")
            assert not _restricted_violations(pod, extra), (seen[-1], _restricted_violations(pod, extra))
    # 1 head + 2 worker groups + 1 submitter per RayJob, head + 2 groups of the RayCluster, MLflow and
    # PostgreSQL, the demo-data Job: the walk must not silently skip a kind
    assert len(seen) == 6 * 4 + 3 + 2 + 1, seen


def test_the_restricted_check_catches_what_the_old_manifests_had():
    old_style = {"securityContext": {"runAsNonRoot": True},
                 "containers": [{"name": "ray-head", "securityContext": {"runAsNonRoot": True,
                                                                         "allowPrivilegeEscalation": False}}],
                 "volumes": [{"name": "logs", "hostPath": {"path": "/var/log"}}]}
    violations = _restricted_violations(old_style, [("autoscalerOptions.securityContext", {"runAsNonRoot": True})])
    assert "pod securityContext: set runAsNonRoot: true and seccompProfile.type: RuntimeDefault" in violations
    assert "containers[ray-head]: capabilities.drop: [ALL]" in violations
    assert "autoscalerOptions.securityContext: allowPrivilegeEscalation: false" in violations
    assert "volume logs: ['hostPath']" in violations


def test_every_rayjob_hardens_its_submitter_pod():
    """KubeRay's default submitter pod has no securityContext: a restricted namespace would reject it."""
    rayjobs = [m for m in _manifests() if m.kind == "RayJob"]
    assert len(rayjobs) == len(JOB_NAMES)
    for m in rayjobs:
        template = m.spec.get("submitterPodTemplate")
        assert template and template["spec"]["restartPolicy"] == "Never", m.source
        container = template["spec"]["containers"][0]
        assert not container.get("command"), f"{m.source}: KubeRay fills in `ray job submit` only without a command"


def test_every_ray_head_has_a_memory_backed_dev_shm():
    from dino_ray.cluster_check.ray_spec import all_groups

    heads = [(m, g) for m in _manifests() for g in all_groups(m) if g.is_head]
    assert len(heads) == len(JOB_NAMES) + 1
    for m, head in heads:
        memory = {v["name"] for v in head.pod_spec["volumes"] if (v.get("emptyDir") or {}).get("medium") == "Memory"}
        mounts = {mount["mountPath"]: mount["name"] for mount in head.ray_container["volumeMounts"]}
        assert mounts.get("/dev/shm") in memory, m.source


def test_postgres_runs_as_its_image_user_on_a_volume_it_can_write():
    postgres = next(m for m in _manifests() if m.kind == "Deployment" and m.name == "mlflow-postgres")
    pod = postgres.spec["template"]["spec"]
    sc = pod["securityContext"]
    assert sc["runAsUser"] == sc["runAsGroup"] == sc["fsGroup"] == 999  # the official image's postgres user
    container = pod["containers"][0]
    pgdata = next(e["value"] for e in container["env"] if e["name"] == "PGDATA")
    data_mount = next(v["mountPath"] for v in container["volumeMounts"] if v["name"] == "data")
    assert pgdata.startswith(data_mount + "/"), "initdb needs PGDATA below the mount (lost+found at its root)"


# ------------------------------------------------------------------------------------------------
# Images: pinned, and built with the commit they hold


def test_no_image_floats():
    from dino_ray.cluster_check.images import image_repo_tag
    from dino_ray.cluster_check.tree import walk

    images = {node for m in _manifests() for path, node in walk(m.doc) if path and path[-1] == "image"}
    assert IMAGE in images and len(images) == 2, images  # the project image and PostgreSQL
    for image in images:
        tag = image_repo_tag(image)[1]
        assert "@sha256:" in image or (tag and tag != "latest"), f"{image} floats: pin a tag or a digest"


def test_dockerfile_records_the_commit_it_was_built_from():
    ops = [(i.op, i.args) for i in parse_dockerfile(REPO / "cluster" / "Dockerfile")]
    assert ("ARG", "GIT_COMMIT") in ops  # no default: a build without --build-arg GIT_COMMIT fails
    assert ("ENV", "DINO_RAY_GIT_COMMIT=${GIT_COMMIT}") in ops  # what dino-ray's MLflow tags read
    guard = next(args for op, args in ops if op == "RUN" and "GIT_COMMIT" in args)
    assert guard.startswith('test -n "${GIT_COMMIT}" ||')
    assert ops.index(("ARG", "GIT_COMMIT")) > max(i for i, (op, _) in enumerate(ops) if op == "COPY")


GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
STUB_DOCKER = '''#!{python}
"""docker stand-in: logs its arguments; `inspect` answers a digest derived from the reference."""
import hashlib, os, sys
with open(os.environ["DOCKER_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1] == "inspect":
    ref = sys.argv[-1]
    print(ref.rsplit(":", 1)[0] + "@sha256:" + hashlib.sha256(ref.encode()).hexdigest())
'''


@pytest.fixture
def build_tree(tmp_path) -> tuple[Path, dict]:
    """A git checkout holding the image's inputs (stand-ins for README.md and dino_ray/), and the
    environment that makes cluster/build.sh call a docker stand-in."""
    root = tmp_path / "checkout"
    for folder in ("cluster", "jobs", "requirements"):
        shutil.copytree(REPO / folder, root / folder)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    (root / "README.md").write_text("stand-in\n")
    (root / "dino_ray").mkdir()
    (root / "dino_ray" / "__init__.py").write_text("")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*GIT, "-C", str(root), "add", "."], check=True)
    subprocess.run([*GIT, "-C", str(root), "commit", "-q", "-m", "stand-in"], check=True)
    docker = tmp_path / "docker"
    docker.write_text(STUB_DOCKER.format(python=sys.executable))
    docker.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "DOCKER": str(docker), "DOCKER_LOG": str(tmp_path / "docker.log"),
           "HOME": str(tmp_path)}
    return root, env


def _build(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    # run from outside the checkout: build.sh changes to the repository root itself
    return subprocess.run(["bash", str(root / "cluster" / "build.sh"), *args], cwd=root.parent, env=env,
                          capture_output=True, text=True, timeout=60)


def test_build_script_tags_with_the_commit_and_pins_every_manifest(build_tree, crd_dir):
    root, env = build_tree
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    proc = _build(root, env, "ghcr.io/acme/dino-ray")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    image = f"ghcr.io/acme/dino-ray:0.1.0-ray2.60.0-{commit[:12]}"
    calls = Path(env["DOCKER_LOG"]).read_text().splitlines()
    assert f"build -f cluster/Dockerfile --build-arg GIT_COMMIT={commit} -t {image} ." in calls
    assert f"push {image}" in calls and "pull -q postgres:16" in calls
    manifests = [*root.glob("cluster/*.yaml"), *root.glob("cluster/jobs/*.yaml")]
    text = "".join(p.read_text() for p in manifests)
    assert IMAGE not in text and text.count(f"{image}@sha256:") == 6 + 1 + 1 + 1  # RayJobs, RayCluster, MLflow, Job
    assert "image: postgres:16@sha256:" in (root / "cluster" / "mlflow.yaml").read_text()
    report = check_cluster(root / "cluster", crd_dir=crd_dir)
    assert report.ok, "\n".join(map(str, report.problems))

    # a rebuild after a new commit re-pins over the pinned references
    subprocess.run([*GIT, "-C", str(root), "commit", "-q", "--allow-empty", "-m", "next"], check=True)
    assert _build(root, env, "ghcr.io/acme/dino-ray").returncode == 0
    text = "".join(p.read_text() for p in manifests)
    assert f"{image}@" not in text and text.count("ghcr.io/acme/dino-ray:0.1.0-ray2.60.0-") == 9


def test_build_script_refuses_uncommitted_image_inputs_and_bad_arguments(build_tree):
    root, env = build_tree
    (root / "dino_ray" / "new.py").write_text("")
    proc = _build(root, env, "ghcr.io/acme/dino-ray")
    assert proc.returncode == 1 and "commit these first" in proc.stderr and "dino_ray/new.py" in proc.stderr
    assert not Path(env["DOCKER_LOG"]).exists()  # nothing was built
    assert _build(root, env, "ghcr.io/acme/dino-ray:latest").returncode == 1
    assert _build(root, env).returncode == 1


def test_build_script_pin_only_rewrites_the_manifests(build_tree):
    root, env = build_tree
    ref = "registry.example:5000/ml/dino-ray:0.1.0-ray2.60.0-abcdef012345@sha256:" + "0" * 64
    proc = _build(root, env, "--pin", ref)
    assert proc.returncode == 0, proc.stderr
    assert f"image: &image {ref}\n" in (root / "cluster" / "raycluster.yaml").read_text()
    assert f"image: {ref}\n" in (root / "cluster" / "jobs" / "prepare-demo-data.yaml").read_text()
    assert not Path(env["DOCKER_LOG"]).exists()


# ------------------------------------------------------------------------------------------------
# The demo data: written by a documented step, where every shipped job reads it


DEMO_ROOT = "s3://change-me-bucket/dino-ray/demo-data"


def _prepare_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_demo_data", REPO / "cluster" / "prepare_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rayjob_commands() -> dict[str, object]:
    return {m.path.name: parse_entrypoint(m.spec["entrypoint"]) for m in _manifests() if m.kind == "RayJob"}


def test_the_prepare_job_writes_where_every_rayjob_reads():
    job = next(m for m in _manifests() if m.kind == "Job" and m.name == "dino-ray-prepare-demo-data")
    command = job.spec["template"]["spec"]["containers"][0]["command"]
    assert command == ["python", "cluster/prepare_demo_data.py", DEMO_ROOT]
    copied = [i.args for i in parse_dockerfile(REPO / "cluster" / "Dockerfile") if i.op == "COPY"]
    assert any(args.split()[-2:] == ["cluster/prepare_demo_data.py", "./cluster/prepare_demo_data.py"]
               for args in copied), "the image must hold the script the Job runs"
    expected = _prepare_module().data_overrides(DEMO_ROOT)
    for name, cmd in _rayjob_commands().items():
        data = [o for o in cmd.overrides if not o.startswith("output_root=")]
        assert data == expected, f"{name}: the same data overrides in every RayJob, so stage keys agree"


def test_print_overrides_gives_the_shell_the_rayjobs_overrides(capsys):
    """cluster/README.md, step 9: `eval "set -- $(... --print-overrides URI)"` must yield those words."""
    module = _prepare_module()
    assert module.main(["--print-overrides", DEMO_ROOT + "/"]) == 0
    words = shlex.split(capsys.readouterr().out)
    assert words == module.data_overrides(DEMO_ROOT) and len(words) == 9
    assert words[1] == f"curate.eval_sets=[{{uri: {DEMO_ROOT}/eval/test}}]"


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """What the prepare step writes (to a local folder here; S3 is the same code path through storage)."""
    out = tmp_path_factory.mktemp("demo") / "demo-data"
    assert _prepare_module().prepare(str(out)) is True
    return out


def test_every_data_uri_of_every_rayjob_is_written_by_the_prepare_step(demo_data):
    """The issue: the RayJobs read outputs/demo-data, which no pod has. Loading each job with its shipped
    overrides, the demo root swapped for the prepared folder, must pass validation, and no URI may be
    left anywhere else."""
    from dino_ray.config.loader import load_job
    from dino_ray.config.typed import to_dict
    from dino_ray.cluster_check.tree import walk

    for name, cmd in _rayjob_commands().items():
        assert not any("outputs/demo-data" in o for o in cmd.overrides), name
        overrides = [o.replace(DEMO_ROOT, str(demo_data)) for o in cmd.overrides]
        cfg = load_job(REPO / cmd.job_yaml, overrides)  # validation checks the inputs of the stages it runs
        uris = [node for path, node in walk(to_dict(cfg)) if path and path[-1] == "uri" and node]
        assert uris, name
        for uri in uris:
            assert uri.startswith(str(demo_data) + "/") and Path(uri).exists(), f"{name}: {uri}"
    assert _prepare_module().prepare(str(demo_data)) is False  # idempotent: complete, nothing written


def test_prepare_writes_its_marker_last_and_skips_a_complete_bucket(s3_bucket, monkeypatch):
    from dino_ray import storage

    module = _prepare_module()
    uploads = []

    def tiny(out, seed=0):  # the real writer takes ~10 s; the S3 logic is what this test is about
        out.mkdir(parents=True)
        (out / "pool").mkdir()
        (out / "pool" / "a.png").write_bytes(b"png")
        (out / module.MARKER).touch()
        return out

    def upload_dir(local, uri, real=storage.upload_dir):  # records whether the marker was there before
        uploads.append(storage.exists(f"{uri}/{module.MARKER}"))
        real(local, uri)

    monkeypatch.setattr(module.demo_data, "prepare", tiny)
    monkeypatch.setattr(module.storage, "upload_dir", upload_dir)
    root = f"{s3_bucket}/dino-ray/demo-data"
    assert module.prepare(root) is True and uploads == [False]
    assert storage.exists(f"{root}/pool/a.png") and storage.exists(f"{root}/{module.MARKER}")
    assert module.prepare(root + "/") is False and uploads == [False]


def test_the_readme_prepares_the_data_before_any_rayjob_runs():
    readme = (REPO / "cluster" / "README.md").read_text()
    prepare = readme.index("kubectl apply -f cluster/jobs/prepare-demo-data.yaml")
    assert prepare < readme.index("kubectl wait job/dino-ray-prepare-demo-data --for=condition=complete")
    assert prepare < readme.index("kubectl apply -f cluster/jobs/rayjob-")
    assert prepare < readme.index("dino-ray submit jobs/pipeline.yaml")
    assert "--print-overrides s3://$BUCKET/dino-ray/demo-data" in readme
    # why the step exists: the image never holds the local demo data
    assert "**/outputs" in (REPO / ".dockerignore").read_text().splitlines()


def test_entrypoints_survive_the_shells_between_kuberay_and_the_driver():
    """KubeRay's submitter pastes the entrypoint into a bash script after `ray job submit --`; Ray's CLI
    re-joins the words with subprocess.list2cmdline; the job supervisor runs that through /bin/sh. The
    driver must see the words cluster_check parsed (the YAML-list overrides hold spaces and brackets)."""
    if not shutil.which("bash"):
        pytest.skip("no bash")
    python = shlex.quote(sys.executable)
    for m in (m for m in _manifests() if m.kind == "RayJob"):
        entrypoint = m.spec["entrypoint"]
        joined = subprocess.run(
            ["bash", "-ce", f'{python} -c "import subprocess, sys; print(subprocess.list2cmdline(sys.argv[1:]))" '
                            f"{entrypoint}"], capture_output=True, text=True, check=True).stdout.rstrip("\n")
        argv = subprocess.run(["/bin/sh", "-c", f'{python} -c "import json, sys; print(json.dumps(sys.argv[1:]))" '
                                                f"{joined}"], capture_output=True, text=True, check=True).stdout
        assert json.loads(argv) == shlex.split(entrypoint), m.source
