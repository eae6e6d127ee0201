"""``python -m dino_ray.cluster_check cluster/``: ``OK`` or one line per problem, exit code 1 on any."""

from __future__ import annotations

import argparse

from .check import check_cluster
from .errors import ClusterCheckError
from .layout import CRD_DIR_ENV


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dino_ray.cluster_check",
                                     description="Check the KubeRay manifests, Dockerfile and versions offline.")
    parser.add_argument("cluster_dir", nargs="?", default="cluster")
    parser.add_argument("--jobs-dir", help="job YAMLs the entrypoints name (default: <repo>/jobs)")
    parser.add_argument("--crds", help=f"KubeRay CRD folder (default: ${CRD_DIR_ENV} or ../shared/schemas/...)")
    parser.add_argument("--pyproject", help="default: <repo>/pyproject.toml")
    parser.add_argument("--dockerfile", help="default: <cluster_dir>/Dockerfile")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        report = check_cluster(args.cluster_dir, jobs_dir=args.jobs_dir, crd_dir=args.crds,
                               pyproject=args.pyproject, dockerfile=args.dockerfile)
    except ClusterCheckError as exc:
        print(f"error: {exc}")
        return 1
    for problem in report.problems:
        print(problem)
    if not report.ok:
        print(f"{len(report.problems)} problem(s) in {args.cluster_dir}")
        return 1
    print(f"OK: {report.documents} manifests in {args.cluster_dir}, Dockerfile and pyproject agree")
    return 0
