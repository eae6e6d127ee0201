"""Finding the Ray clusters in manifests: a RayCluster's spec, or the ``rayClusterSpec`` inside a RayJob.

Every GPU, version, autoscaler and lifecycle rule must hold for both, so rules iterate over
:func:`cluster_specs` and :func:`all_groups` instead of special-casing either kind.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import yaml

from .manifests import Manifest
from .tree import path_str


@dataclasses.dataclass(frozen=True)
class RayGroup:
    """The head or one worker group of a RayCluster spec (standalone or inline in a RayJob)."""

    name: str
    path: tuple
    spec: dict
    is_head: bool

    @property
    def pod_spec(self) -> dict:
        return ((self.spec.get("template") or {}).get("spec")) or {}

    @property
    def ray_container(self) -> dict:
        containers = self.pod_spec.get("containers") or [{}]  # KubeRay: the Ray container comes first
        return containers[0] if isinstance(containers[0], dict) else {}

    @property
    def resources(self) -> dict:
        return self.ray_container.get("resources") or {}


def cluster_specs(m: Manifest) -> Iterator[tuple[tuple, dict]]:
    """``(path, cluster spec)`` of the Ray cluster a manifest defines, if any."""
    if m.kind == "RayCluster":
        yield ("spec",), m.spec
    elif m.kind == "RayJob" and isinstance(m.spec.get("rayClusterSpec"), dict):
        yield ("spec", "rayClusterSpec"), m.spec["rayClusterSpec"]


def groups(cluster_path: tuple, cluster: dict) -> Iterator[RayGroup]:
    """The head group, then every worker group, of one cluster spec."""
    head = cluster.get("headGroupSpec")
    if isinstance(head, dict):
        yield RayGroup("head", cluster_path + ("headGroupSpec",), head, True)
    for i, worker in enumerate(cluster.get("workerGroupSpecs") or []):
        if isinstance(worker, dict):
            name = str(worker.get("groupName", f"#{i}"))
            yield RayGroup(name, cluster_path + ("workerGroupSpecs", i), worker, False)


def all_groups(m: Manifest) -> Iterator[RayGroup]:
    for cluster_path, cluster in cluster_specs(m):
        yield from groups(cluster_path, cluster)


def pod_path(group: RayGroup, *rest: Any) -> str:
    """Printable path of a field of the group's pod spec."""
    return path_str(group.path + ("template", "spec") + rest)


def container_path(group: RayGroup, *rest: Any) -> str:
    """Printable path of a field of the group's Ray container."""
    return pod_path(group, "containers", 0, *rest)


def runtime_env(m: Manifest) -> dict | None:
    """A RayJob's parsed ``runtimeEnvYAML`` mapping; None when absent or not a YAML mapping."""
    text = m.spec.get("runtimeEnvYAML")
    if m.kind != "RayJob" or not isinstance(text, str):
        return None
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        return None  # reported by the RayJob rules
    return parsed if isinstance(parsed, dict) else None
