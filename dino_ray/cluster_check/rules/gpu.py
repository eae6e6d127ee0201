"""GPU worker groups: without a GPU limit and toleration a "GPU" group schedules happily on CPU nodes."""

from __future__ import annotations

from typing import Any

from ..manifests import Manifest
from ..ray_spec import RayGroup, all_groups, container_path, pod_path
from ..report import Problem

GPU_RESOURCE = "nvidia.com/gpu"


def _positive_int(value: Any) -> bool:
    """A count Kubernetes accepts for an extended resource: an int or digit string, above zero."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value > 0
    return isinstance(value, str) and value.isdigit() and int(value) > 0


def _is_gpu_group(group: RayGroup) -> bool:
    """Named, sized or started as a GPU group: any of these means it is meant to hold GPUs."""
    asks = any(GPU_RESOURCE in (group.resources.get(k) or {}) for k in ("limits", "requests"))
    num_gpus = str((group.spec.get("rayStartParams") or {}).get("num-gpus", "0")).strip()
    return "gpu" in group.name.lower() or asks or num_gpus not in ("", "0")


def _tolerates_gpu(pod_spec: dict) -> bool:
    for tol in pod_spec.get("tolerations") or []:
        if (isinstance(tol, dict) and tol.get("key") == GPU_RESOURCE
                and tol.get("operator", "Equal") in ("Exists", "Equal")
                and tol.get("effect") in (None, "", "NoSchedule")):
            return True
    return False


def _has_memory_shm(group: RayGroup) -> bool:
    memory_volumes = {v.get("name") for v in group.pod_spec.get("volumes") or []
                      if isinstance(v, dict) and (v.get("emptyDir") or {}).get("medium") == "Memory"}
    return any(isinstance(mount, dict) and mount.get("mountPath") == "/dev/shm" and mount.get("name") in memory_volumes
               for mount in group.ray_container.get("volumeMounts") or [])


def _limit_problems(m: Manifest, group: RayGroup) -> list[Problem]:
    limit = (group.resources.get("limits") or {}).get(GPU_RESOURCE)
    request = (group.resources.get("requests") or {}).get(GPU_RESOURCE)
    if not _positive_int(limit):
        return [m.problem(container_path(group, "resources", "limits"),
                          f"GPU group {group.name!r} must set '{GPU_RESOURCE}' in its Ray container's limits to "
                          f"a positive integer, got {limit!r}")]
    if request is not None and str(request) != str(limit):
        return [m.problem(container_path(group, "resources", "requests"),
                          f"'{GPU_RESOURCE}' request {request!r} must equal the limit {limit!r}")]
    return []


def gpu_problems(m: Manifest) -> list[Problem]:
    problems = []
    for group in filter(_is_gpu_group, all_groups(m)):
        problems += _limit_problems(m, group)
        if not _tolerates_gpu(group.pod_spec):
            problems.append(m.problem(pod_path(group, "tolerations"),
                                      f"GPU group {group.name!r} does not tolerate the '{GPU_RESOURCE}' taint "
                                      "(key nvidia.com/gpu, operator Exists, effect NoSchedule)"))
        if not _has_memory_shm(group):
            problems.append(m.problem(container_path(group, "volumeMounts"),
                                      f"GPU group {group.name!r} needs /dev/shm mounted from an emptyDir with "
                                      "medium: Memory (NCCL and data loaders need more than Docker's 64 MB)"))
    return problems
