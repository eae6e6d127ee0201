"""CRD loading and strict schema validation, in kubeconform's ``-strict`` sense.

The API server silently prunes fields a CRD does not declare, so a misspelled RayJob field
(``shutdownAfterJobFinish``) would be dropped without a word. Here every schema that lists
``properties`` and does not preserve unknown fields rejects undeclared ones.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any

import yaml

from .core_kinds import OBJECT_META, core_schemas
from .errors import ClusterCheckError
from .layout import CRD_DIR_ENV
from .manifests import YAML_LOADER
from .tree import path_str

CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
RAY_API_VERSION = "ray.io/v1"


def strict_schema(schema: dict) -> dict:
    """A copy of an OpenAPI v3 schema in which undeclared fields are errors (kubeconform -strict)."""
    out = dict(schema)
    props = schema.get("properties")
    if isinstance(props, dict):
        out["properties"] = {name: strict_schema(sub) for name, sub in props.items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        out["items"] = strict_schema(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if isinstance(schema.get(key), list):
            out[key] = [strict_schema(s) for s in schema[key]]
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        out["type"] = [schema["type"], "null"]
    return out


@functools.lru_cache(maxsize=None)
def crd_schema(crd_file: Path, version: str = "v1") -> dict:
    """The strict ``openAPIV3Schema`` of one version of a CRD file, loaded once per process."""
    if not crd_file.is_file():
        raise ClusterCheckError(f"KubeRay CRD not found: {crd_file} (set {CRD_DIR_ENV} or pass --crds)")
    with open(crd_file, "rb") as fh:
        crd = yaml.load(fh, Loader=YAML_LOADER)
    for entry in crd.get("spec", {}).get("versions", []):
        if entry.get("name") == version:
            schema = dict(entry["schema"]["openAPIV3Schema"])
            schema["properties"] = {**schema["properties"], "metadata": OBJECT_META}
            schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
            return strict_schema(schema)
    raise ClusterCheckError(f"{crd_file}: no CRD version {version!r}")


@functools.lru_cache(maxsize=None)
def schema_validator(crd_dir: Path, kind: str) -> Any:
    """A cached strict ``jsonschema`` Draft 4 validator for one kind (the CRDs are parsed once)."""
    try:
        import jsonschema
    except ImportError as exc:  # a dev-only dependency: the cluster image does not need it
        raise ClusterCheckError("schema checks need jsonschema: pip install 'jsonschema>=4'") from exc
    if kind in CRD_FILES:
        schema = crd_schema(crd_dir / CRD_FILES[kind])
    else:
        core = core_schemas(crd_schema(crd_dir / CRD_FILES["RayCluster"]))
        if kind not in core:
            raise KeyError(kind)
        schema = strict_schema(core[kind])
    return jsonschema.Draft4Validator(schema)


def _drop_nulls(node: Any) -> Any:
    """The API server prunes null fields of non-nullable schemas before validating, so do we."""
    if isinstance(node, dict):
        return {k: _drop_nulls(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_drop_nulls(v) for v in node]
    return node


def _format_schema_error(err: Any) -> tuple[str, str]:
    """jsonschema's own message, except unknown fields, which get a did-you-mean from the declared ones."""
    where = path_str(tuple(err.absolute_path)) or "(document)"
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        known = sorted((err.schema.get("properties") or {}))
        parts = []
        for key in (k for k in err.instance if k not in known):
            near = difflib.get_close_matches(str(key), known, n=1)
            parts.append(f"unknown field {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        return where, "; ".join(parts)
    return where, err.message


def validate_schema(doc: dict, crd_dir: Path) -> list[tuple[str, str]]:
    """Strict schema errors of one manifest as ``(field path, message)`` pairs; empty if valid."""
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if isinstance(api, str) and api.startswith("ray.io/") and api != RAY_API_VERSION:
        return [("apiVersion", f"{api!r} is not served by this project; use {RAY_API_VERSION!r}")]
    if kind in CRD_FILES and api != RAY_API_VERSION:
        return [("apiVersion", f"{kind} needs apiVersion {RAY_API_VERSION!r}, got {api!r}")]
    try:
        validator = schema_validator(Path(crd_dir).resolve(), str(kind))
    except KeyError:
        return [("kind", f"no schema for kind {kind!r} (apiVersion {api!r}); it cannot be checked here")]
    errors = sorted(validator.iter_errors(_drop_nulls(doc)), key=lambda e: [str(p) for p in e.absolute_path])
    return [_format_schema_error(e) for e in errors]
