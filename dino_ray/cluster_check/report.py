"""What the checks hand back: one :class:`Problem` per finding, collected in a :class:`Report`."""

from __future__ import annotations

import dataclasses
from pathlib import Path


def source_name(path: Path) -> str:
    """``cluster/raycluster.yaml``: short enough for one-line findings, still unambiguous in the repo."""
    return f"{path.parent.name}/{path.name}"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One finding: which file/document, which field, and what is wrong with it."""

    source: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.where}: {self.message}" if self.where else f"{self.source}: {self.message}"


@dataclasses.dataclass(frozen=True)
class Report:
    """What :func:`~dino_ray.cluster_check.check_cluster` found; ``ok`` when there is nothing to fix."""

    problems: list[Problem]
    documents: int

    @property
    def ok(self) -> bool:
        return not self.problems
