"""Read a job YAML (with ``base:`` inheritance and command-line overrides) into a typed JobConfig.

Resolution order, later wins: dataclass defaults (the DINOv2 ViT-g recipe) < the chain of ``base:``
files (a preset such as ``jobs/presets/demo.yaml``) < the job file < ``key.path=value`` overrides.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from dino_ray.config.typed import ConfigError, build, to_dict


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # keys merged from ``<<: *anchor`` may be overridden: that is what the merge is for
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"key {key!r} appears twice in one mapping (lines {seen[key] + 1} and "
                              f"{key_node.start_mark.line + 1}); the first value would be silently dropped")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a job file: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start}): is this a job YAML file?", source=str(path)) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader) or {}
    except ConfigError as e:
        raise ConfigError(e.message, source=str(path)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", source=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of keys", source=str(path))
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_raw(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[str]]:
    """The merged mapping of ``path`` and its ``base:`` chain, plus the files read (base first)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"circular base: {' -> '.join(map(str, _seen + (path,)))}", source=str(path))
    data = _load_yaml(path)
    bases = data.pop("base", None)
    if bases is None:
        return data, [str(path)]
    merged: dict[str, Any] = {}
    files: list[str] = []
    for b in [bases] if isinstance(bases, str) else list(bases):
        if not isinstance(b, str):
            raise ConfigError(f"base must be a path or a list of paths, got {b!r}", "base", str(path))
        raw, read = load_raw((path.parent / b), _seen + (path,))
        merged = deep_merge(merged, raw)
        files += read
    return deep_merge(merged, data), files + [str(path)]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=1e-4`` -> (["train", "lr"], 1e-4); the value is read as YAML (so lists work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {p} is not a mapping", ".".join(parts))
            node = child
        node[parts[-1]] = value
    return data


def load_job(path: str | os.PathLike, overrides: Sequence[str] = (), check_inputs: bool = True):
    """Load, merge, override and validate a job file into a :class:`JobConfig`. ``check_inputs=False`` skips
    the checks that the job's input paths exist (for ``dino-ray plan``, which reads only the recipe)."""
    from dino_ray.config.schema import JobConfig

    raw, files = load_raw(path)
    raw = apply_overrides(raw, overrides)
    source = str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    cfg = build(JobConfig, raw, "", source)
    cfg.sources = files
    cfg.absolutize()
    if check_inputs:
        cfg.check_inputs(source)
    return cfg


def config_hash(obj: Any) -> str:
    """A stable short hash of a dataclass (or plain) config, for manifests."""
    blob = json.dumps(to_dict(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
