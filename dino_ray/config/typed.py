"""Turn plain YAML mappings into typed dataclasses, failing early with the key path that is wrong.

Every config in dino-ray is a tree of dataclasses (the convention: :mod:`dino_ray.config.fields`). Building
one from a mapping checks, before any cluster work starts: unknown keys (with a "did you mean"), wrong
types, ``Literal`` choices, values outside the bounds that a field declares with ``bounded()``, and whatever
a dataclass's own ``validate()`` method rejects. Every problem found is reported at once, each naming the
YAML file and the dotted key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from dino_ray.config.fields import Checked, ConfigError, bounded, field_rules, operational, problem

__all__ = ["ConfigError", "bounded", "build", "flatten", "operational", "to_dict"]


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)):
            return True, (args[0] if len(args) == 1 else Union[tuple(args)])
    return False, tp


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"must not be null (expected {_type_name(tp)})", key, source)
    tp = inner
    if tp is Any:
        return value
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping for {tp.__name__}, got {value!r}", key, source)
        return build(tp, value, key, source)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{value!r} is not one of {list(allowed)}{hint}", key, source)
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.extend(p.message for p in e.problems)
        raise ConfigError(f"{value!r} matches none of {_type_name(tp)} ({'; '.join(errors)})", key, source)
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {value!r}", key, source)
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"expected {len(args)} items, got {len(value)}: {value!r}", key, source)
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items, errors = [], []
        for i, v in enumerate(value):
            try:
                items.append(_coerce(v, item_tp, f"{key}[{i}]", source))
            except ConfigError as e:
                errors.append(e)
        if errors:
            raise ConfigError.combine(errors, source)
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", key, source)
        kt, vt = get_args(tp) or (Any, Any)
        return {k: _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"expected true/false, got {value!r}", key, source)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"expected an integer, got {value!r}", key, source)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"expected a number, got {value!r}", key, source)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"expected a string, got {value!r}", key, source)
    return value


def build(cls: type, data: dict[str, Any] | None, prefix: str = "", source: str | None = None) -> Any:
    """Build dataclass ``cls`` from ``data``: unknown keys, types and declared bounds are checked for every
    key, and all problems found are reported together (each with its key path); then the object is made,
    which runs its ``validate()``."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    rules = {name: (meta, choices) for name, meta, choices in field_rules(cls)}
    kwargs: dict[str, Any] = {}
    errors: list[ConfigError] = []
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            errors.append(ConfigError(f"unknown key{hint} (valid keys here: {', '.join(sorted(fields))})", key,
                                      source))
            continue
        try:
            kwargs[name] = _coerce(value, hints[name], key, source)
        except ConfigError as e:
            errors.append(e)
            continue
        found = problem(kwargs[name], *rules[name]) if name in rules else None
        if found is not None:
            errors.append(ConfigError(f"{found[0]!r} {found[1]}", key, source))
    for name, f in fields.items():
        if name in data:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            key = f"{prefix}.{name}" if prefix else name
            errors.append(ConfigError(f"missing required key (expected {_type_name(hints[name])})", key, source))
    if errors:
        raise ConfigError.combine(errors, source)
    try:
        obj = cls(**kwargs)  # a Checked config runs its validate() here
        validate = getattr(obj, "validate", None)
        if not isinstance(obj, Checked) and callable(validate):
            validate()
    except ConfigError as e:
        if e.source is None and source is not None:
            raise ConfigError(e.message, e.key or prefix, source) from None
        raise
    except (ValueError, TypeError, OSError) as e:
        raise ConfigError(str(e), prefix, source) from e
    return obj


def to_dict(obj: Any, results_only: bool = False) -> Any:
    """Plain, YAML-friendly mapping of a dataclass tree (tuples become lists). ``results_only`` leaves out
    the operational fields (see :func:`bounded`): what decides a stage's results, so changing ``log_every``
    or the monitor neither re-runs a finished stage nor throws its checkpoints away."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name), results_only) for f in dataclasses.fields(obj)
                if not (results_only and f.metadata.get("operational"))}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v, results_only) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v, results_only) for k, v in obj.items()}
    return obj


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values (lists kept whole), e.g. for MLflow params."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = tree
    return out
