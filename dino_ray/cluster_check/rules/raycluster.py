"""RayCluster spec rules (standalone or inline in a RayJob) that the CRD schema cannot express."""

from __future__ import annotations

from ..images import semver
from ..manifests import Manifest
from ..ray_spec import cluster_specs, container_path, groups, pod_path
from ..report import Problem
from ..tree import dig, path_str

MIN_TOKEN_AUTH_RAY = (2, 52, 0)


def _autoscaler_problems(m: Manifest, cluster_path: tuple, cluster: dict) -> list[Problem]:
    where = path_str(cluster_path)
    options = cluster.get("autoscalerOptions") or {}
    problems = []
    if cluster.get("enableInTreeAutoscaling") is not True or options.get("version") != "v2":
        problems.append(m.problem(where, "use the in-tree autoscaler v2: enableInTreeAutoscaling: true and "
                                         "autoscalerOptions.version: v2"))
    head = next((g for g in groups(cluster_path, cluster) if g.is_head), None)
    head_env = {v.get("name") for v in (head.ray_container.get("env") or [] if head else []) if isinstance(v, dict)}
    if options.get("version") and "RAY_enable_autoscaler_v2" in head_env:
        problems.append(m.problem(f"{where}.autoscalerOptions.version", "set either autoscalerOptions.version or "
                                  "the head env RAY_enable_autoscaler_v2, not both"))
    if options.get("version") == "v2":
        for group in groups(cluster_path, cluster):
            policy = group.pod_spec.get("restartPolicy")
            if policy not in (None, "", "Never"):
                problems.append(m.problem(pod_path(group, "restartPolicy"),
                                          f"autoscaler v2 needs restartPolicy Never or unset, got {policy!r}"))
    return problems


def _auth_problems(m: Manifest, cluster_path: tuple, cluster: dict) -> list[Problem]:
    where = path_str(cluster_path + ("authOptions",))
    if (cluster.get("authOptions") or {}).get("mode") != "token":
        return [m.problem(where, "token authentication must be on: authOptions: {mode: token}")]
    version = semver(cluster.get("rayVersion", ""))
    if version is None or version < MIN_TOKEN_AUTH_RAY:
        return [m.problem(where, f"token auth needs rayVersion >= 2.52.0, got {cluster.get('rayVersion')!r}")]
    return []


def _lifecycle_problems(m: Manifest, cluster_path: tuple, cluster: dict) -> list[Problem]:
    """No work on the head, and every Ray container stops Ray in preStop so a removed pod leaves cleanly."""
    problems = []
    head = cluster.get("headGroupSpec") or {}
    if str(dig(head, "rayStartParams", "num-cpus")) != "0":
        problems.append(m.problem(path_str(cluster_path + ("headGroupSpec", "rayStartParams")),
                                  'set num-cpus: "0" so no task or actor lands on the head'))
    for group in groups(cluster_path, cluster):
        command = dig(group.ray_container, "lifecycle", "preStop", "exec", "command")
        if not command or "ray stop" not in " ".join(map(str, command)):
            problems.append(m.problem(container_path(group, "lifecycle"),
                                      f"group {group.name!r}: add a preStop hook running `ray stop`"))
    return problems


def cluster_spec_problems(m: Manifest) -> list[Problem]:
    problems = []
    for cluster_path, cluster in cluster_specs(m):
        if not cluster.get("rayVersion"):
            problems.append(m.problem(path_str(cluster_path + ("rayVersion",)), "missing"))
        problems += _autoscaler_problems(m, cluster_path, cluster)
        problems += _auth_problems(m, cluster_path, cluster)
        problems += _lifecycle_problems(m, cluster_path, cluster)
    return problems
