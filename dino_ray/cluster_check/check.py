"""Running every check over one directory, in a fixed order so the output is stable run to run."""

from __future__ import annotations

from pathlib import Path

from .dockerfile import dockerfile_facts
from .errors import ClusterCheckError
from .layout import Layout
from .manifests import Manifest, load_manifests
from .pyproject import pyproject_facts
from .report import Problem, Report
from .rules.apply_safety import apply_safety_problems
from .rules.dockerfile import dockerfile_problems
from .rules.entrypoints import entrypoint_problems, shared_output_root_problems
from .rules.exposure import exposure_problems
from .rules.gpu import gpu_problems
from .rules.names import duplicate_name_problems, name_problems
from .rules.raycluster import cluster_spec_problems
from .rules.rayjob import rayjob_problems
from .rules.secrets import secret_problems, secret_ref_problems
from .rules.versions import python_problems, version_problems, workdir_problems
from .schema import validate_schema


def _per_manifest_problems(m: Manifest, layout: Layout, workdir: str | None) -> list[Problem]:
    problems = [m.problem(where, message) for where, message in validate_schema(m.doc, layout.crd_dir)]
    problems += name_problems(m) + secret_problems(m) + exposure_problems(m) + gpu_problems(m)
    problems += cluster_spec_problems(m) + apply_safety_problems(m)
    if m.kind == "RayJob":
        problems += rayjob_problems(m) + entrypoint_problems(m, layout, workdir)
    return problems


def _resolve(cluster_dir: str | Path, **paths: str | Path | None) -> Layout:
    """The layout, after making sure the files every cross-check reads are there."""
    layout = Layout.resolve(cluster_dir, **paths)
    if not layout.cluster_dir.is_dir():
        raise ClusterCheckError(f"not a directory: {layout.cluster_dir}")
    for required in (layout.dockerfile, layout.pyproject):
        if not required.is_file():
            raise ClusterCheckError(f"missing {required}")
    return layout


def check_cluster(cluster_dir: str | Path, *, jobs_dir: str | Path | None = None,
                  crd_dir: str | Path | None = None, pyproject: str | Path | None = None,
                  dockerfile: str | Path | None = None) -> Report:
    """Run every check over ``cluster_dir``; paths not given follow the repo layout (see :class:`Layout`)."""
    layout = _resolve(cluster_dir, jobs_dir=jobs_dir, crd_dir=crd_dir, pyproject=pyproject, dockerfile=dockerfile)
    manifests, problems = load_manifests(layout.cluster_dir)
    docker = dockerfile_facts(layout.dockerfile)
    project = pyproject_facts(layout.pyproject)
    problems += dockerfile_problems(docker, layout) + python_problems(layout, docker, project)
    for m in manifests:
        problems += _per_manifest_problems(m, layout, docker["workdir"])
    problems += version_problems(manifests, layout, docker, project) + secret_ref_problems(manifests)
    problems += workdir_problems(manifests, docker["workdir"]) + shared_output_root_problems(manifests)
    problems += duplicate_name_problems(manifests)
    return Report(problems=problems, documents=len(manifests))
