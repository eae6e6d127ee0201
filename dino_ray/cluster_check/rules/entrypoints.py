"""RayJob entrypoints: they run a job YAML that ships in the image, with a fixed, shared output root.

A wrong job path fails only after the cluster has come up; a missing or per-run output root means a
retried job cannot find its checkpoints, and later stages cannot find what earlier ones wrote.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..entrypoint import JobCommand, parse_entrypoint
from ..layout import Layout
from ..manifests import Manifest
from ..report import Problem
from .agreement import disagreements

_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")
_URI_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://")


def _job_file(job_yaml: str, layout: Layout, workdir: str | None) -> Path | None:
    """Where a job YAML named in the image (relative to WORKDIR, or absolute under it) lives in the repo."""
    rel = job_yaml
    if workdir and rel.startswith(workdir.rstrip("/") + "/"):
        rel = rel[len(workdir.rstrip("/")) + 1:]
    if not rel.startswith("jobs/"):
        return None
    return layout.jobs_dir / rel[len("jobs/"):]


def _job_yaml_problems(m: Manifest, command: JobCommand, layout: Layout, workdir: str | None) -> list[Problem]:
    target = _job_file(command.job_yaml, layout, workdir)
    if target is None:
        return [m.problem("spec.entrypoint", f"job YAML {command.job_yaml!r} must be under jobs/ "
                                             f"(relative to the image WORKDIR {workdir or '?'})")]
    if not target.is_file():
        return [m.problem("spec.entrypoint", f"job YAML {command.job_yaml!r} does not exist (looked for {target})")]
    if command.direct and not (os.access(target, os.X_OK) and target.read_bytes()[:2] == b"#!"):
        return [m.problem("spec.entrypoint", f"{command.job_yaml!r} is run directly but is not an "
                                             "executable file with a shebang")]
    return []


def _output_root_problems(m: Manifest, root: str | None) -> list[Problem]:
    if root is None:
        return [m.problem("spec.entrypoint", "no output_root=... override: a retried job must find its "
                                             "checkpoints (Train RunConfig names derive from output root + stage)")]
    if any(ch in root for ch in "$`*?{}<>") or not _URI_SCHEME.match(root) or root.startswith("file://"):
        return [m.problem("spec.entrypoint", f"output_root {root!r} must be a fixed remote URI such as "
                                             "s3://bucket/dino-ray/<run>: pods are ephemeral and retries must resume")]
    return []


def entrypoint_problems(m: Manifest, layout: Layout, workdir: str | None) -> list[Problem]:
    entrypoint = m.spec.get("entrypoint")
    if not isinstance(entrypoint, str) or not entrypoint.strip():
        return [m.problem("spec.entrypoint", "missing: a RayJob must run a job YAML")]
    try:
        command = parse_entrypoint(entrypoint)
    except ValueError as exc:
        return [m.problem("spec.entrypoint", str(exc))]
    problems = _job_yaml_problems(m, command, layout, workdir)
    stem = m.path.stem
    if stem.startswith("rayjob-") and Path(command.job_yaml).stem != stem[len("rayjob-"):]:
        problems.append(m.problem("spec.entrypoint", f"{m.path.name} should run jobs/{stem[len('rayjob-'):]}.yaml, "
                                                     f"not {command.job_yaml!r}"))
    for override in command.overrides:
        if not _OVERRIDE.match(override):
            problems.append(m.problem("spec.entrypoint", f"override {override!r} is not key=value"))
    return problems + _output_root_problems(m, command.output_root)


def shared_output_root_problems(manifests: list[Manifest]) -> list[Problem]:
    """Stage jobs read what earlier stages wrote, so every RayJob of the run shares one output root."""
    roots = []
    for m in manifests:
        if m.kind == "RayJob" and isinstance(m.spec.get("entrypoint"), str):
            try:
                root = parse_entrypoint(m.spec["entrypoint"]).output_root
            except ValueError:
                continue
            if root:
                roots.append((m, "spec.entrypoint", root))
    return disagreements(roots, lambda root, ref, ref_file: f"output_root {root!r} differs from {ref!r} in "
                                                            f"{ref_file}; the stages of one run must share it")
