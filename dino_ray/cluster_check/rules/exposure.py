"""Nothing reachable from outside the cluster: the Ray dashboard runs jobs for whoever reaches it."""

from __future__ import annotations

from ..manifests import Manifest
from ..ray_spec import cluster_specs
from ..report import Problem
from ..tree import dig, path_str, walk

EXPOSING_KINDS = ("Ingress", "HTTPRoute", "GRPCRoute", "Gateway", "Route")


def _exposes(service_type: object) -> bool:
    return service_type not in (None, "ClusterIP")


def _head_problems(m: Manifest) -> list[Problem]:
    problems = []
    for cluster_path, cluster in cluster_specs(m):
        head = cluster.get("headGroupSpec") or {}
        where = path_str(cluster_path + ("headGroupSpec",))
        service_type = head.get("serviceType")
        if _exposes(service_type):
            problems.append(m.problem(f"{where}.serviceType", f"head serviceType {service_type!r} exposes the Ray "
                                      "dashboard outside the cluster; use ClusterIP and kubectl port-forward"))
        head_service_type = dig(head, "headService", "spec", "type")
        if _exposes(head_service_type):
            problems.append(m.problem(f"{where}.headService.spec.type",
                                      f"head Service type {head_service_type!r} exposes the dashboard"))
        if head.get("enableIngress"):
            problems.append(m.problem(f"{where}.enableIngress", "an Ingress exposes the Ray dashboard; keep it off"))
    return problems


def _service_problems(m: Manifest) -> list[Problem]:
    problems = []
    service_type = m.spec.get("type")
    if _exposes(service_type):
        problems.append(m.problem("spec.type", f"Service type {service_type!r} exposes it outside the cluster; "
                                               "use ClusterIP and kubectl port-forward"))
    if m.spec.get("externalIPs"):
        problems.append(m.problem("spec.externalIPs", "externalIPs expose the Service outside the cluster"))
    return problems


def exposure_problems(m: Manifest) -> list[Problem]:
    problems = _head_problems(m)
    if m.kind == "Service":
        problems += _service_problems(m)
    if m.kind in EXPOSING_KINDS:
        problems.append(m.problem("kind", f"{m.kind} exposes services outside the cluster; use port-forward"))
    for path, node in walk(m.doc):
        if path and path[-1] == "hostNetwork" and node is True:
            problems.append(m.problem(path_str(path), "hostNetwork exposes every port (the dashboard too)"))
        if path and path[-1] == "hostPort" and node:
            problems.append(m.problem(path_str(path), "hostPort exposes a port on the node"))
    return problems
