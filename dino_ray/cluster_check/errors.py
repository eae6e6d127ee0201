"""The one failure that is not a manifest problem: the checker itself cannot run."""

from __future__ import annotations


class ClusterCheckError(RuntimeError):
    """Missing CRDs, a missing cluster directory or Dockerfile, jsonschema not installed.

    Kept apart from :class:`~dino_ray.cluster_check.report.Problem` so the CLI can tell "your
    manifests are wrong" (a report) from "I could not check them" (this error)."""
