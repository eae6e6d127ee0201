"""The image itself: non-root, a WORKDIR for the relative entrypoints, COPY sources that exist, Ray pinned."""

from __future__ import annotations

from typing import Any

from ..layout import Layout
from ..report import Problem, source_name


def dockerfile_problems(facts: dict[str, Any], layout: Layout) -> list[Problem]:
    source = source_name(layout.dockerfile)
    problems = []
    user = facts["user"]
    if user is None or user.split(":")[0] in ("root", "0"):
        problems.append(Problem(source, "USER", f"the image must end as a non-root user, got {user!r}"))
    if not facts["workdir"]:
        problems.append(Problem(source, "WORKDIR", "set WORKDIR to where jobs/ is installed (entrypoints are "
                                                   "relative to it)"))
    for line, src in facts["copy_sources"]:
        if not list(layout.repo_root.glob(src.rstrip("/"))):
            problems.append(Problem(source, f"line {line}", f"COPY source {src!r} is missing from the build "
                                                           f"context {layout.repo_root}"))
    if not facts["ray_versions"]:
        problems.append(Problem(source, "FROM", "no Ray version found: base on rayproject/ray:<version>-... or "
                                                "pin ray==<version>"))
    return problems
