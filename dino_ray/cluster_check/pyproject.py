"""The facts of ``pyproject.toml`` the image and manifests must agree with: version, Python, Ray bound."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from .errors import ClusterCheckError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclasses.dataclass(frozen=True)
class ProjectFacts:
    """``project.version`` (the image tag's prefix), ``requires-python`` and the ``ray`` requirement."""

    version: str | None
    requires_python: str
    ray: Requirement | None


def pyproject_facts(path: Path) -> ProjectFacts:
    """Read once per check; unreadable TOML or requirements are a :class:`ClusterCheckError` naming the file."""
    try:
        project = tomllib.loads(path.read_text()).get("project", {})
        requirements = [Requirement(d) for d in project.get("dependencies", [])]
    except (tomllib.TOMLDecodeError, InvalidRequirement) as exc:
        raise ClusterCheckError(f"{path}: {exc}") from exc
    ray = [r for r in requirements if r.name == "ray"]
    return ProjectFacts(version=project.get("version"), requires_python=project.get("requires-python", ""),
                        ray=ray[0] if ray else None)
