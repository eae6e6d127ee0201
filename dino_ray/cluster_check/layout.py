"""Where the files that the manifests are cross-checked against live."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

CRD_DIR_ENV = "DINO_RAY_KUBERAY_CRDS"


def default_crd_dir(repo_root: Path) -> Path:
    """The vendored KubeRay CRDs sit next to the repo, in the shared schemas folder."""
    return repo_root.parent / "shared" / "schemas" / "kuberay-v1.7.0"


@dataclasses.dataclass(frozen=True)
class Layout:
    """The checked directory and its neighbours (defaults: the repo layout, ``cluster/`` at the root)."""

    cluster_dir: Path
    repo_root: Path  # the docker build context; jobs/ and pyproject.toml live here
    jobs_dir: Path
    pyproject: Path
    dockerfile: Path
    crd_dir: Path

    @classmethod
    def resolve(cls, cluster_dir: str | Path, *, jobs_dir: str | Path | None = None,
                crd_dir: str | Path | None = None, pyproject: str | Path | None = None,
                dockerfile: str | Path | None = None) -> "Layout":
        cluster = Path(cluster_dir).resolve()
        root = cluster.parent
        crds = crd_dir or os.environ.get(CRD_DIR_ENV) or default_crd_dir(root)
        return cls(cluster_dir=cluster, repo_root=root,
                   jobs_dir=Path(jobs_dir or root / "jobs").resolve(),
                   pyproject=Path(pyproject or root / "pyproject.toml").resolve(),
                   dockerfile=Path(dockerfile or cluster / "Dockerfile").resolve(),
                   crd_dir=Path(crds).resolve())
