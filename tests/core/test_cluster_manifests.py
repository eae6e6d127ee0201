"""The KubeRay manifests, Dockerfile, build script and demo-data step in cluster/, checked offline.

tools/check_cluster.py is run on a copy of the repository files in tmp_path (the shipped files are never
touched): each mutation must fail with a message that names the file and the offending field. The
validators the tool hands generic checks to (the KubeRay CRDs with jsonschema, kubernetes-validate,
hadolint) each get bad manifests here, to show they are wired in. The other project rules are asserted
on the shipped files directly: what `kubectl apply -f cluster/` applies, no secret in git, the shape of
every Ray cluster and RayJob, nothing exposed, the "restricted" Pod Security Standard on every pod, a
build that records its commit, and jobs whose data a documented step wrote.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from testlib import CRD_DIR, require_path

REPO = Path(__file__).resolve().parents[2]
JOB_NAMES = ("curate", "pretrain", "highres", "distill", "eval", "pipeline")
ROOT = "output_root=s3://change-me-bucket/dino-ray/runs/run-001"
IMAGE = "ghcr.io/your-org/dino-ray:0.1.0-ray2.60.0-000000000000"  # the placeholder cluster/build.sh replaces


@functools.cache
def _tool():
    """tools/check_cluster.py as a module (tools/ is not a package, and not installed)."""
    spec = importlib.util.spec_from_file_location("check_cluster", REPO / "tools" / "check_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Manifest(NamedTuple):
    path: Path
    source: str  # "cluster/jobs/rayjob-eval.yaml[0] RayJob/dino-ray-eval"
    doc: dict

    kind = property(lambda self: self.doc.get("kind"))
    name = property(lambda self: (self.doc.get("metadata") or {}).get("name"))
    spec = property(lambda self: self.doc.get("spec") or {})


def _manifests(cluster: Path = REPO / "cluster") -> list[Manifest]:
    return [Manifest(*found) for found in _tool().load(cluster)]


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
    """A stand-in repository: the shipped cluster/, pyproject.toml and locks, stand-in jobs and sources."""
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


def _problems(root: Path, crd_dir: Path, jobs_dir: Path | None = None) -> list[str]:
    return _tool().check(root / "cluster", jobs_dir or root / "jobs", crd_dir)[1]


def _edit_text(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def _assert_named(problems: list[str], *fragments: str) -> None:
    assert problems, "the mutated copy passed every check"
    assert any(all(f in p for f in fragments) for p in problems), "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# tools/check_cluster.py on the shipped files


def test_shipped_cluster_folder_passes(crd_dir, capsys):
    assert _tool().main([str(REPO / "cluster"), "--crds", str(crd_dir)]) == 0, capsys.readouterr().out


def test_copy_with_stand_in_jobs_passes_and_covers_every_stage(repo, crd_dir):
    count, problems = _tool().check(repo / "cluster", repo / "jobs", crd_dir)
    assert problems == [] and count == 16  # 6 RayJobs, the RayCluster, 5 in mlflow.yaml, the Job, 3 Secrets
    manifests = _manifests(repo / "cluster")
    kinds = [m.kind for m in manifests]
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == len(JOB_NAMES) and kinds.count("Job") == 1
    entrypoints = {_tool().job_command(m.spec["entrypoint"])[0] for m in manifests if m.kind == "RayJob"}
    assert entrypoints == {f"jobs/{name}.yaml" for name in JOB_NAMES}
    images = {node for m in manifests for path, node in _tool().walk(m.doc) if path and path[-1] == "image"}
    assert images == {IMAGE, "postgres:16"}  # the project image and PostgreSQL (build.sh pins it by digest)


def test_cli_prints_ok_or_problems(repo, crd_dir, capsys):
    cluster = str(repo / "cluster")
    assert _tool().main([cluster, "--crds", str(crd_dir)]) == 0
    assert capsys.readouterr().out.startswith("OK: 16 manifests")
    _edit_text(repo / "cluster" / "jobs" / "rayjob-pretrain.yaml", "shutdownAfterJobFinishes: true",
               "shutdownAfterJobFinish: true")
    assert _tool().main([cluster, "--crds", str(crd_dir)]) == 1
    out = capsys.readouterr().out
    assert "cluster/jobs/rayjob-pretrain.yaml[0] RayJob/dino-ray-pretrain: spec: Additional properties" in out
    assert _tool().main([cluster, "--crds", str(repo)]) == 1
    assert capsys.readouterr().out.startswith(f"error: missing {repo / 'ray.io_rayclusters.yaml'}")


def test_cli_runs_as_a_script(crd_dir):
    """What cluster/README.md and cluster/build.sh tell people to run."""
    proc = subprocess.run([sys.executable, "tools/check_cluster.py", "cluster/", "--crds", str(crd_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("OK:"), proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------
# Mutations of a copy: each fails with a message naming the file and the field. First the validators
# the tool delegates to, then the project's own rules (entrypoints, one image, one Ray version).

MUTATIONS = [
    # the KubeRay v1.7.0 CRD schemas, through jsonschema, with undeclared fields made errors
    pytest.param("cluster/jobs/rayjob-pretrain.yaml", "shutdownAfterJobFinishes: true", "shutdownAfterJobFinish: true",
                 ("RayJob/dino-ray-pretrain: spec:", "'shutdownAfterJobFinish' was unexpected"),
                 id="crd-misspelled-field"),
    pytest.param("cluster/raycluster.yaml", "      replicas: 0\n", '      replicas: "two"\n',
                 ("spec.workerGroupSpecs[0].replicas", "'two' is not of type 'integer'"), id="crd-replicas-two"),
    pytest.param("cluster/raycluster.yaml", 'num-cpus: "0"', "num-cpus: 0",
                 ("spec.headGroupSpec.rayStartParams.num-cpus", "not of type 'string'"), id="crd-int-start-param"),
    pytest.param("cluster/jobs/rayjob-eval.yaml", "apiVersion: ray.io/v1", "apiVersion: ray.io/v1alpha1",
                 ("RayJob/dino-ray-eval: apiVersion:", "use 'ray.io/v1'"), id="crd-old-api-version"),
    # kubernetes-validate (strict) for the core kinds
    pytest.param("cluster/mlflow.yaml", "imagePullPolicy: IfNotPresent", "imagePullPolcy: IfNotPresent",
                 ("Deployment/mlflow: spec.template.spec.containers[0]:", "'imagePullPolcy' was unexpected"),
                 id="core-unknown-field"),
    pytest.param("cluster/mlflow.yaml", "port: 5432", "port: five",
                 ("Service/mlflow-postgres: spec.ports[0].port:", "'five' is not of type 'integer'"),
                 id="core-wrong-type"),
    # hadolint for the Dockerfile
    pytest.param("cluster/Dockerfile", "USER 1000:100\nWORKDIR", "USER root\nWORKDIR",
                 ("cluster/Dockerfile: line ", "DL3002 Last USER should not be root"), id="hadolint-root-user"),
    # the project's own rules
    pytest.param("cluster/jobs/rayjob-eval.yaml", "    dino-ray run jobs/eval.yaml",
                 "    dino-ray run jobs/evaluation.yaml",
                 ("spec.entrypoint", "'jobs/evaluation.yaml' does not exist"), id="missing-job-yaml"),
    pytest.param("cluster/jobs/rayjob-eval.yaml", "    dino-ray run jobs/eval.yaml",
                 "    dino-ray run jobs/distill.yaml",
                 ("spec.entrypoint", "rayjob-eval.yaml must run jobs/eval.yaml"), id="wrong-job-for-file"),
    pytest.param("cluster/jobs/rayjob-eval.yaml", "    dino-ray run jobs/eval.yaml",
                 "    python train.py jobs/eval.yaml",
                 ("spec.entrypoint", "must be `dino-ray run jobs/<name>.yaml"), id="not-dino-ray-run"),
    pytest.param("cluster/jobs/rayjob-curate.yaml", f"    dino-ray run jobs/curate.yaml {ROOT}\n",
                 "    dino-ray run jobs/curate.yaml output_root=s3://b/runs/$RUN\n",
                 ("spec.entrypoint", "fixed remote URI"),
                 id="unfixed-output-root"),
    pytest.param("cluster/jobs/rayjob-curate.yaml", f"    dino-ray run jobs/curate.yaml {ROOT}\n",
                 f"    dino-ray run jobs/curate.yaml {ROOT[:-1]}2\n", ("spec.entrypoint", "output_root", "differs"),
                 id="diverging-output-root"),
    pytest.param("cluster/jobs/rayjob-distill.yaml", "dino-ray:0.1.0-ray2.60.0", "dino-ray:0.1.0-ray2.59.0",
                 ("RayJob/dino-ray-distill: spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].image",
                  "ray2.59.0", "differs"), id="image-tag-mismatch"),
    pytest.param("cluster/jobs/rayjob-highres.yaml", 'rayVersion: "2.60.0"', 'rayVersion: "2.59.0"',
                 ("spec.rayClusterSpec.rayVersion", "Ray 2.59.0 differs from ray==2.60.0"), id="ray-version-mismatch"),
    pytest.param("cluster/Dockerfile", "ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.0",
                 ("cluster/Dockerfile: FROM", "Ray 2.59.0 differs from ray==2.60.0"), id="dockerfile-ray-version"),
    pytest.param("requirements/gpu.lock", "\nray==2.60.0", "\nray==2.61.0",
                 ("raycluster.yaml[0] RayCluster/dino-ray: spec.rayVersion", "differs from ray==2.61.0"),
                 id="lock-ray-version"),
    pytest.param("pyproject.toml", '"ray[default,train,data,tune]>=2.60"', '"ray[default,train,data,tune]>=2.55,<2.60"',
                 ("pyproject.toml: project.dependencies", "excludes Ray 2.60.0"), id="pyproject-ray-bound"),
    pytest.param("cluster/jobs/rayjob-curate.yaml", f"&image {IMAGE}",
                 "&image ghcr.io/your-org/dino-ray:0.1.0-ray2.60.0",
                 ("containers[0].image", "image tag '0.1.0-ray2.60.0' must be 0.1.0-ray<Ray version>-<7 to 40 hex"),
                 id="tag-without-commit"),
    pytest.param("pyproject.toml", 'version = "0.1.0"', 'version = "0.2.0"',
                 ("containers[0].image", "must be 0.2.0-ray<Ray version>"), id="tag-without-project-version"),
    pytest.param("cluster/mlflow.yaml", "image: postgres:16", "image: postgres:latest",
                 ("Deployment/mlflow-postgres: spec.template.spec.containers[0].image", "floats"), id="floating-image"),
]


@pytest.mark.parametrize("file, old, new, fragments", MUTATIONS)
def test_mutations_fail_naming_the_field(repo, crd_dir, file, old, new, fragments):
    _edit_text(repo / file, old, new)
    _assert_named(_problems(repo, crd_dir), *fragments)


def test_a_kind_no_validator_knows_is_reported_not_skipped(repo, crd_dir):
    (repo / "cluster" / "widget.yaml").write_text("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n")
    _assert_named(_problems(repo, crd_dir), "cluster/widget.yaml[0] Widget/w: kind:", "Couldn't find schema")


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


def test_job_command_forms():
    job_command = _tool().job_command
    assert job_command("dino-ray run jobs/pretrain.yaml output_root=s3://b/r 'train.lr=1e-4'") == (
        "jobs/pretrain.yaml", ["output_root=s3://b/r", "train.lr=1e-4"], False)
    assert job_command("python -m dino_ray.cli run jobs/eval.yaml")[0] == "jobs/eval.yaml"
    assert job_command("jobs/eval.yaml x=1")[2]
    for bad in ("python train.py", "dino-ray run", "cd /app && dino-ray run jobs/x.yaml"):
        with pytest.raises(ValueError, match="dino-ray run"):
            job_command(bad)


def test_dockerfile_reading_joins_lines_and_substitutes_args(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text("# syntax=docker/dockerfile:1\n# a comment ending in a backslash \\\nARG V=2.60.0\n"
                    "FROM rayproject/ray:${V}-py311-gpu\nRUN pip install \\\n    # inside a continuation\n"
                    "    \"ray==$V\"\nUSER 1000\n")
    assert _tool().dockerfile(path) == [["ARG", "V=2.60.0"], ["FROM", "rayproject/ray:2.60.0-py311-gpu"],
                                        ["RUN", 'pip install "ray==2.60.0"'], ["USER", "1000"]]


# ------------------------------------------------------------------------------------------------
# The image: non-root, in the WORKDIR the pods use, on a Python pyproject allows, from files that exist


def test_the_image_runs_as_a_numeric_non_root_user_in_app():
    steps = _tool().dockerfile(REPO / "cluster" / "Dockerfile")
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    user = [args for op, args in final if op == "USER"][-1]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0", "runAsNonRoot needs a numeric non-root USER"
    assert [args for op, args in final if op == "WORKDIR"][-1] == "/app"  # the entrypoints' jobs/ are relative to it
    for m in _manifests():
        for path, node in _tool().walk(m.doc):
            assert not (path and path[-1] == "workingDir" and node != "/app"), f"{m.source}: {_tool().path_str(path)}"
    python = re.search(r"-py(\d)(\d+)", final[0][1])
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f"{python[1]}.{python[2]}" in SpecifierSet(requires), f"the base image's Python is outside {requires}"
    for op, args in final:
        if op in ("COPY", "ADD") and "--from" not in args:
            for src in [w for w in args.split() if not w.startswith("--")][:-1]:
                assert list(REPO.glob(src.rstrip("/"))), f"cluster/Dockerfile: COPY source {src} is missing"


def test_dockerfile_records_the_commit_it_was_built_from():
    ops = [tuple(step) for step in _tool().dockerfile(REPO / "cluster" / "Dockerfile")]
    assert ("ARG", "GIT_COMMIT") in ops  # no default: a build without --build-arg GIT_COMMIT fails
    assert ("ENV", "DINO_RAY_GIT_COMMIT=${GIT_COMMIT}") in ops  # what dino-ray's MLflow tags read
    guard = next(args for op, args in ops if op == "RUN" and "GIT_COMMIT" in args)
    assert guard.startswith('test -n "${GIT_COMMIT}" ||')
    assert ops.index(("ARG", "GIT_COMMIT")) > max(i for i, (op, _) in enumerate(ops) if op == "COPY")


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


# ------------------------------------------------------------------------------------------------
# No secret in git, and every Secret key a pod needs is documented


SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")
URL_PASSWORD = re.compile(r"://[^/\s:@]+:(?!\$\([A-Za-z_]\w*\)@)[^/\s@]+@")  # $(VAR): expanded from a Secret


def _secret_violations(manifests: list[Manifest]) -> list[str]:
    """Inline secret values, passwords in URLs, secrets in runtimeEnvYAML, real values in the Secret
    template, and Secret keys the pods read that the template does not declare."""
    tool, out = _tool(), []
    secrets = [m for m in manifests if m.kind == "Secret"]
    declared = {(m.name, key) for m in secrets for key in m.doc.get("stringData") or {}}
    out += [f"{m.source}: data: write <placeholders> in stringData" for m in secrets if m.doc.get("data")]
    out += [f"{m.source}: stringData.{key}: must be a <placeholder>" for m in secrets
            for key, value in (m.doc.get("stringData") or {}).items() if not re.fullmatch(r"<[^<>]+>", str(value))]
    for m in manifests:
        for path, node in tool.walk(m.doc):
            where = f"{m.source}: {tool.path_str(path)}"
            name = str(node.get("name")) if isinstance(node, dict) else ""
            if len(path) > 1 and path[-2] == "env" and any(w in name.upper() for w in SECRET_WORDS):
                if not (node.get("valueFrom") or {}).get("secretKeyRef"):
                    out.append(f"{where}: env {name} must come from valueFrom.secretKeyRef, not an inline value")
            if len(path) > 1 and path[-2] == "env" and URL_PASSWORD.search(str(node.get("value", ""))):
                out.append(f"{where}: env {name} has a password in a URL; use $(VAR) from a secretKeyRef")
            if path and path[-1] == "secretKeyRef" and not node.get("optional"):
                if (node.get("name"), node.get("key")) not in declared:
                    out.append(f"{where}: Secret {node.get('name')!r} key {node.get('key')!r} is not declared")
            if path and path[-1] == "authOptions" and (node.get("secretName"), "auth_token") not in declared:
                out.append(f"{where}: Secret {node.get('secretName')!r} key 'auth_token' is not declared")
        runtime_env = yaml.safe_load(m.spec.get("runtimeEnvYAML") or "{}") if m.kind == "RayJob" else {}
        out += [f"{m.source}: spec.runtimeEnvYAML: {var} is a secret; use a Secret and the pod env"
                for var in runtime_env.get("env_vars") or {} if any(w in var.upper() for w in SECRET_WORDS)]
    return sorted(set(out))  # YAML aliases repeat one env list in every group


def test_no_secret_is_inline_and_every_secret_key_is_declared():
    assert _secret_violations(_manifests()) == []


def _env(doc: dict, name: str) -> dict:
    head = doc["spec"].get("rayClusterSpec", doc["spec"]).get("headGroupSpec") or doc["spec"]
    env = head["template"]["spec"]["containers"][0]["env"]
    return next(var for var in env if var["name"] == name)


SECRET_MUTATIONS = [
    pytest.param("cluster/secrets.example.yaml.template[0]",
                 lambda d: d["stringData"].update(AWS_SECRET_ACCESS_KEY="wJalrXUtnFEMI/K7MDENG"),
                 "stringData.AWS_SECRET_ACCESS_KEY: must be a <placeholder>", id="real-secret-value"),
    pytest.param("cluster/jobs/rayjob-pretrain.yaml[0]",
                 lambda d: _env(d, "AWS_SECRET_ACCESS_KEY").update(value="not-a-real-key", valueFrom=None),
                 "env AWS_SECRET_ACCESS_KEY must come from valueFrom.secretKeyRef", id="inline-secret"),
    pytest.param("cluster/mlflow.yaml[3]", lambda d: _env(d, "MLFLOW_BACKEND_STORE_URI").update(
        value="postgresql://mlflow:hunter2@mlflow-postgres:5432/mlflow"), "MLFLOW_BACKEND_STORE_URI has a password",
                 id="password-in-url"),
    pytest.param("cluster/mlflow.yaml[1]", lambda d: _env(d, "POSTGRES_DB")["valueFrom"]["secretKeyRef"].update(
        key="POSTGRES_DATABASE"), "'dino-ray-mlflow-db' key 'POSTGRES_DATABASE' is not declared",
                 id="undeclared-secret-key"),
    pytest.param("cluster/jobs/rayjob-distill.yaml[0]",
                 lambda d: d["spec"].update(runtimeEnvYAML="env_vars:\n  MLFLOW_TRACKING_TOKEN: abc\n"),
                 "spec.runtimeEnvYAML: MLFLOW_TRACKING_TOKEN is a secret", id="secret-in-runtime-env"),
]


def _mutated(document: str, change: Callable[[dict], object]) -> list[Manifest]:
    """The shipped manifests, ``change`` applied to a copy of the document ``cluster/x.yaml[i]``."""
    manifests = [m._replace(doc=copy.deepcopy(m.doc)) for m in _manifests()]
    change(next(m.doc for m in manifests if m.source.startswith(document + " ")))
    return manifests


@pytest.mark.parametrize("document, change, fragment", SECRET_MUTATIONS)
def test_the_secret_check_catches(document, change, fragment):
    _assert_named(_secret_violations(_mutated(document, change)), fragment)


# ------------------------------------------------------------------------------------------------
# Every Ray cluster and RayJob: shaped for this project, resumable, and reachable only inside the cluster


GPU = "nvidia.com/gpu"


def _clusters() -> list[tuple[Manifest, str, dict]]:
    """``(manifest, field path, RayCluster spec)``: the RayCluster, and the cluster of every RayJob."""
    return [(m, "spec", m.spec) if m.kind == "RayCluster" else (m, "spec.rayClusterSpec", m.spec["rayClusterSpec"])
            for m in _manifests() if m.kind in ("RayCluster", "RayJob")]


def _groups(where: str, cluster: dict) -> list[tuple[str, dict]]:
    """``(field path, group spec)`` of the head, then of every worker group."""
    workers = cluster.get("workerGroupSpecs") or []
    return [(f"{where}.headGroupSpec", cluster["headGroupSpec"])] + [
        (f"{where}.workerGroupSpecs[{i}]", group) for i, group in enumerate(workers)]


def test_every_ray_cluster_is_shaped_for_this_project():
    gpu_groups = 0
    for m, where, cluster in _clusters():
        at = f"{m.source}: {where}"
        assert (cluster.get("authOptions") or {}).get("mode") == "token", f"{at}.authOptions: token auth must be on"
        assert cluster.get("enableInTreeAutoscaling") is True and (cluster.get("autoscalerOptions") or {}).get(
            "version") == "v2", f"{at}: the in-tree autoscaler v2"
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0", f"{at}.headGroupSpec.rayStartParams: no work on the head"
        for group_at, group in _groups(where, cluster):
            at, pod = f"{m.source}: {group_at}.template.spec", group["template"]["spec"]
            ray = pod["containers"][0]
            assert pod.get("restartPolicy", "Never") == "Never", f"{at}.restartPolicy: autoscaler v2 needs Never"
            stop = ((ray.get("lifecycle") or {}).get("preStop") or {}).get("exec", {}).get("command") or []
            assert "ray stop" in " ".join(stop), f"{at}.containers[0].lifecycle: a preStop hook running `ray stop`"
            volumes = pod.get("volumes") or []
            memory = {v["name"] for v in volumes if (v.get("emptyDir") or {}).get("medium") == "Memory"}
            mounts = {mount["mountPath"]: mount["name"] for mount in ray.get("volumeMounts") or []}
            assert mounts.get("/dev/shm") in memory, f"{at}.containers[0].volumeMounts: /dev/shm from memory"
            resources = ray.get("resources") or {}
            if "gpu" in group.get("groupName", "") or GPU in (resources.get("limits") or {}):
                gpu_groups += 1
                limit = str(resources["limits"].get(GPU))
                assert limit.isdigit() and int(limit) > 0, f"{at}.containers[0].resources.limits: '{GPU}'"
                assert str(resources.get("requests", {}).get(GPU, limit)) == limit, f"{at}: GPU requests = limits"
                assert any(t.get("key") == GPU and t.get("effect", "NoSchedule") == "NoSchedule"
                           for t in pod.get("tolerations") or []), f"{at}.tolerations: tolerate the '{GPU}' taint"
    assert gpu_groups == 7  # gpu-train in the RayCluster, one GPU group per RayJob


def test_every_rayjob_is_resumable_and_releases_its_cluster():
    rayjobs = [m for m in _manifests() if m.kind == "RayJob"]
    assert len(rayjobs) == len(JOB_NAMES)
    for m in rayjobs:
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", m.name or "") and len(m.name) <= 47, (
            f"{m.source}: metadata.name: a fixed DNS-1035 name of at most 47 characters (KubeRay appends suffixes)")
        job_id = m.spec.get("jobId")
        assert isinstance(job_id, str) and job_id and "$" not in job_id, f"{m.source}: spec.jobId: a fixed id"
        assert isinstance(m.spec.get("backoffLimit"), int) and m.spec["backoffLimit"] >= 0, (
            f"{m.source}: spec.backoffLimit: a failed run is retried and resumes from output_root")
        assert m.spec.get("shutdownAfterJobFinishes") is True, f"{m.source}: spec.shutdownAfterJobFinishes: true"
        assert m.spec.get("submissionMode") == "K8sJobMode", f"{m.source}: spec.submissionMode"
    names = [(m.kind, m.name) for m in _manifests()]
    assert len(names) == len(set(names)), "two objects of one kind and name overwrite each other"
    assert all(len(m.name) <= 53 for m in _manifests() if m.kind == "RayCluster")


def test_nothing_is_reachable_from_outside_the_cluster():
    """The Ray dashboard runs jobs for whoever reaches it: ClusterIP only, reached with kubectl port-forward."""
    for m in _manifests():
        assert m.kind not in ("Ingress", "HTTPRoute", "GRPCRoute", "Gateway", "Route"), m.source
        if m.kind == "Service":
            assert m.spec.get("type", "ClusterIP") == "ClusterIP" and not m.spec.get("externalIPs"), m.source
        for path, node in _tool().walk(m.doc):
            exposes = path and path[-1] in ("hostNetwork", "hostPort", "enableIngress") and node
            assert not exposes, f"{m.source}: {_tool().path_str(path)}"
    for m, where, cluster in _clusters():
        head = cluster["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{m.source}: {where}.headGroupSpec.serviceType"
        service = (head.get("headService") or {}).get("spec") or {}
        assert service.get("type", "ClusterIP") == "ClusterIP", f"{m.source}: {where}.headGroupSpec.headService"



def _group(doc: dict, name: str) -> dict:
    cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return next(g for g in groups if g.get("groupName", "head") == name)


def _pod(doc: dict, group: str) -> dict:
    return _group(doc, group)["template"]["spec"]


SHAPE = "test_every_ray_cluster_is_shaped_for_this_project"
RAYJOBS = "test_every_rayjob_is_resumable_and_releases_its_cluster"
EXPOSURE = "test_nothing_is_reachable_from_outside_the_cluster"
SHAPE_MUTATIONS = [
    pytest.param("cluster/raycluster.yaml[0]", lambda d: d["spec"]["authOptions"].update(mode="disabled"), SHAPE,
                 "spec.authOptions: token auth", id="no-auth"),
    pytest.param("cluster/raycluster.yaml[0]", lambda d: _group(d, "head")["rayStartParams"].update({"num-cpus": "1"}),
                 SHAPE, "headGroupSpec.rayStartParams: no work on the head", id="work-on-the-head"),
    pytest.param("cluster/raycluster.yaml[0]", lambda d: _pod(d, "cpu-data").update(restartPolicy="Always"), SHAPE,
                 "workerGroupSpecs[0].template.spec.restartPolicy", id="restart-policy"),
    pytest.param("cluster/raycluster.yaml[0]", lambda d: _pod(d, "head")["containers"][0].pop("lifecycle"), SHAPE,
                 "headGroupSpec.template.spec.containers[0].lifecycle", id="no-ray-stop"),
    pytest.param("cluster/raycluster.yaml[0]", lambda d: [_pod(d, "gpu-train")["containers"][0]["resources"][part].pop(
        "nvidia.com/gpu") for part in ("limits", "requests")], SHAPE,
                 "containers[0].resources.limits: 'nvidia.com/gpu'", id="gpu-group-without-gpus"),
    pytest.param("cluster/jobs/rayjob-curate.yaml[0]", lambda d: _pod(d, "gpu-embed").pop("tolerations"), SHAPE,
                 "workerGroupSpecs[1].template.spec.tolerations", id="gpu-group-without-toleration"),
    pytest.param("cluster/jobs/rayjob-curate.yaml[0]", lambda d: _pod(d, "gpu-embed")["containers"][0].update(
        volumeMounts=[]), SHAPE, "workerGroupSpecs[1].template.spec.containers[0].volumeMounts: /dev/shm", id="no-shm"),
    pytest.param("cluster/jobs/rayjob-pretrain.yaml[0]", lambda d: d["spec"].pop("jobId"), RAYJOBS, "spec.jobId",
                 id="no-job-id"),
    pytest.param("cluster/jobs/rayjob-pretrain.yaml[0]", lambda d: d["spec"].update(submissionMode="K8sMode"), RAYJOBS,
                 "spec.submissionMode", id="submission-mode"),
    pytest.param("cluster/jobs/rayjob-pretrain.yaml[0]", lambda d: d["spec"].update(shutdownAfterJobFinishes=False),
                 RAYJOBS, "spec.shutdownAfterJobFinishes", id="cluster-kept-after-the-job"),
    pytest.param("cluster/jobs/rayjob-eval.yaml[0]", lambda d: d.update(metadata={"generateName": "dino-ray-eval-"}),
                 RAYJOBS, "metadata.name: a fixed DNS-1035 name", id="generate-name"),
    pytest.param("cluster/jobs/rayjob-pipeline.yaml[0]", lambda d: d["metadata"].update(name="dino-ray-eval"), RAYJOBS,
                 "two objects of one kind and name", id="copied-rayjob-keeps-its-name"),
    pytest.param("cluster/raycluster.yaml[0]", lambda d: _group(d, "head").update(serviceType="LoadBalancer"), EXPOSURE,
                 "spec.headGroupSpec.serviceType", id="loadbalancer-head"),
    pytest.param("cluster/mlflow.yaml[2]", lambda d: d["spec"].update(type="NodePort"), EXPOSURE,
                 "Service/mlflow-postgres", id="nodeport-service"),
    pytest.param("cluster/jobs/rayjob-eval.yaml[0]", lambda d: _pod(d, "head")["containers"][0]["ports"][0].update(
        hostPort=8265), EXPOSURE, "containers[0].ports[0].hostPort", id="host-port"),
]


@pytest.mark.parametrize("document, change, test, fragment", SHAPE_MUTATIONS)
def test_the_shape_checks_catch(monkeypatch, document, change, test, fragment):
    mutated = _mutated(document, change)
    monkeypatch.setattr(sys.modules[__name__], "_manifests", lambda cluster=None: mutated)
    with pytest.raises(AssertionError, match=re.escape(fragment)):
        globals()[test]()

# ------------------------------------------------------------------------------------------------
# The "restricted" Pod Security Standard, on every pod the manifests make


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def _pod_templates(m: Manifest) -> list[tuple[str, dict, list[tuple[str, dict]]]]:
    """``(where, pod spec, securityContexts of containers the operator adds)`` of every pod ``m`` makes."""
    pods = []
    if m.kind in ("Deployment", "Job"):
        pods.append(("spec.template.spec", m.spec["template"]["spec"], []))
    if m.kind in ("RayCluster", "RayJob"):
        cluster = m.spec.get("rayClusterSpec", m.spec)
        for group_at, group in _groups("spec.rayClusterSpec" if m.kind == "RayJob" else "spec", cluster):
            # KubeRay runs the autoscaler beside the head with autoscalerOptions.securityContext; the
            # init container it adds to workers copies the worker container's securityContext.
            extra = []
            if group_at.endswith("headGroupSpec") and cluster.get("enableInTreeAutoscaling"):
                options = cluster.get("autoscalerOptions") or {}
                extra.append(("autoscalerOptions.securityContext", options.get("securityContext") or {}))
            pods.append((group_at, group["template"]["spec"], extra))
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
            seen.append(f"{m.source} {where}")
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


def test_postgres_runs_as_its_image_user_on_a_volume_it_can_write():
    postgres = next(m for m in _manifests() if m.kind == "Deployment" and m.name == "mlflow-postgres")
    pod = postgres.spec["template"]["spec"]
    sc = pod["securityContext"]
    assert sc["runAsUser"] == sc["runAsGroup"] == sc["fsGroup"] == 999  # the official image's postgres user
    container = pod["containers"][0]
    pgdata = next(e["value"] for e in container["env"] if e["name"] == "PGDATA")
    data_mount = next(v["mountPath"] for v in container["volumeMounts"] if v["name"] == "data")
    assert pgdata.startswith(data_mount + "/"), "initdb needs PGDATA below the mount (lost+found at its root)"


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
    assert _problems(root, crd_dir) == []

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


def _rayjob_commands() -> dict[str, tuple[str, list[str], bool]]:
    """``(job YAML, overrides, run directly)`` of every RayJob's entrypoint, by file name."""
    return {m.path.name: _tool().job_command(m.spec["entrypoint"]) for m in _manifests() if m.kind == "RayJob"}


def test_the_prepare_job_writes_where_every_rayjob_reads():
    job = next(m for m in _manifests() if m.kind == "Job" and m.name == "dino-ray-prepare-demo-data")
    command = job.spec["template"]["spec"]["containers"][0]["command"]
    assert command == ["python", "cluster/prepare_demo_data.py", DEMO_ROOT]
    copied = [args for op, args in _tool().dockerfile(REPO / "cluster" / "Dockerfile") if op == "COPY"]
    assert any(args.split()[-2:] == ["cluster/prepare_demo_data.py", "./cluster/prepare_demo_data.py"]
               for args in copied), "the image must hold the script the Job runs"
    expected = _prepare_module().data_overrides(DEMO_ROOT)
    for name, (_, overrides, _) in _rayjob_commands().items():
        data = [o for o in overrides if not o.startswith("output_root=")]
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

    for name, (job_yaml, overrides, _) in _rayjob_commands().items():
        assert not any("outputs/demo-data" in o for o in overrides), name
        overrides = [o.replace(DEMO_ROOT, str(demo_data)) for o in overrides]
        cfg = load_job(REPO / job_yaml, overrides)  # validation checks the inputs of the stages it runs
        uris = [node for path, node in _tool().walk(to_dict(cfg)) if path and path[-1] == "uri" and node]
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
    driver must see the words tools/check_cluster.py parsed (the YAML-list overrides hold spaces and brackets)."""
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
