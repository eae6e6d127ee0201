"""Object names: fixed, short enough for KubeRay's derived names, and unique per kind."""

from __future__ import annotations

import re

from ..manifests import Manifest
from ..report import Problem

MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47}  # KubeRay appends suffixes to build Service/cluster names
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def name_problems(m: Manifest) -> list[Problem]:
    """A RayCluster/RayJob needs a fixed DNS-1035 name: a retried run must map to the same object."""
    if m.kind not in MAX_NAME_LENGTH:
        return []
    name = (m.doc.get("metadata") or {}).get("name")
    if not isinstance(name, str):
        return [m.problem("metadata.name", "a fixed name is required (no generateName): a re-applied or retried "
                                           "run must map to the same object")]
    if not _DNS1035.match(name) or len(name) > MAX_NAME_LENGTH[m.kind]:
        return [m.problem("metadata.name", f"{name!r} must be a DNS-1035 label of at most "
                                           f"{MAX_NAME_LENGTH[m.kind]} characters for a {m.kind}")]
    return []


def duplicate_name_problems(manifests: list[Manifest]) -> list[Problem]:
    """Two objects of one kind and name would overwrite each other on `kubectl apply -f cluster/`."""
    first: dict[tuple[str, str], Manifest] = {}
    problems = []
    for m in manifests:
        key = (m.kind, m.name)
        if key in first:
            problems.append(m.problem("metadata.name", f"{m.kind} {m.name!r} is also defined in "
                                                       f"{first[key].source}"))
        first.setdefault(key, m)
    return problems
