"""No secret in git: env values, URLs, runtime envs and Secret templates, and refs to undeclared keys."""

from __future__ import annotations

import re

from ..manifests import Manifest
from ..ray_spec import runtime_env
from ..report import Problem
from ..tree import path_str, walk

SECRET_NAME_MARKERS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")
_URL_CREDENTIALS = re.compile(r"://[^/\s:@]+:([^/\s@]+)@")
_ENV_REFERENCE = re.compile(r"\$\([A-Za-z_][A-Za-z0-9_]*\)")  # $(VAR): Kubernetes expands it from the pod env
_PLACEHOLDER = re.compile(r"^<[^<>]+>$")


def _secret_like(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in SECRET_NAME_MARKERS)


def _env_var_problems(m: Manifest, where: str, var: dict) -> list[Problem]:
    name = str(var.get("name", ""))
    value = var.get("value")
    problems = []
    if _secret_like(name):
        if "value" in var:
            problems.append(m.problem(where, f"env {name} has an inline value; secrets must come from "
                                             "valueFrom.secretKeyRef (see cluster/secrets.example.yaml.template)"))
        elif not (var.get("valueFrom") or {}).get("secretKeyRef"):
            problems.append(m.problem(where, f"env {name} looks secret but does not use valueFrom.secretKeyRef"))
    match = _URL_CREDENTIALS.search(value) if isinstance(value, str) else None
    if match and not _ENV_REFERENCE.fullmatch(match.group(1)):
        problems.append(m.problem(where, f"env {name} embeds a password in a URL; reference a secret-backed "
                                         "variable as $(VAR) instead"))
    return problems


def _template_problems(m: Manifest) -> list[Problem]:
    """A Secret shipped in cluster/ documents which keys exist; its values must be placeholders."""
    problems = []
    for field in ("stringData", "data"):
        for key, value in (m.doc.get(field) or {}).items():
            if not _PLACEHOLDER.match(str(value)):
                problems.append(m.problem(f"{field}.{key}", "a Secret in cluster/ is a template: its values "
                                          "must be <placeholders>, never real credentials"))
    return problems


def secret_problems(m: Manifest) -> list[Problem]:
    problems = []
    for path, node in walk(m.doc):
        if path and path[-1] == "env" and isinstance(node, list):
            for i, var in enumerate(node):
                if isinstance(var, dict):
                    problems += _env_var_problems(m, path_str(path + (i,)), var)
    env_vars = (runtime_env(m) or {}).get("env_vars") or {}
    for name in env_vars if isinstance(env_vars, dict) else []:
        if _secret_like(str(name)):
            problems.append(m.problem("spec.runtimeEnvYAML.env_vars", f"{name} is a secret in runtimeEnvYAML; "
                                      "put it in a Kubernetes Secret and the pod env instead"))
    if m.kind == "Secret":
        problems += _template_problems(m)
    return problems


def _declared_secrets(manifests: list[Manifest]) -> dict[str, set[str]]:
    declared: dict[str, set[str]] = {}
    for m in manifests:
        if m.kind == "Secret":
            keys = set(m.doc.get("stringData") or {}) | set(m.doc.get("data") or {})
            declared.setdefault(m.name, set()).update(keys)
    return declared


def _secret_ref(path: tuple, node: dict) -> tuple | None:
    """``(secret name, key)`` a node needs: a required secretKeyRef, or token auth's ``auth_token``."""
    if path[-1] == "secretKeyRef" and not node.get("optional"):
        return node.get("name"), node.get("key")
    if path[-1] == "authOptions" and node.get("mode") == "token" and node.get("secretName"):
        return node.get("secretName"), "auth_token"
    return None


def secret_ref_problems(manifests: list[Manifest]) -> list[Problem]:
    """Every referenced secret/key must be declared in a Secret template, so the README's step works."""
    declared = _declared_secrets(manifests)
    problems = []
    for m in manifests:
        seen: set[tuple] = set()  # YAML aliases repeat the same env list in every group: report once
        for path, node in walk(m.doc):
            ref = _secret_ref(path, node) if path and isinstance(node, dict) else None
            if ref and ref not in seen and ref[1] not in declared.get(str(ref[0]), set()):
                seen.add(ref)
                problems.append(m.problem(path_str(path), f"secret {ref[0]!r} key {ref[1]!r} is not declared "
                                                          "in any Secret template in this directory"))
    return problems
