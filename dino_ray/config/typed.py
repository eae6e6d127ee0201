"""Turn plain YAML mappings into typed dataclasses, failing early with the key path that is wrong.

Every config in dino-ray is a tree of dataclasses. Building one from a mapping checks, before any
cluster work starts: unknown keys (with a "did you mean"), wrong types, values outside the bounds that
a field declares in its metadata (``ge``/``gt``/``le``/``lt``/``choices``), and whatever a dataclass's
own ``validate()`` method rejects. The error always names the YAML file and the dotted key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A config problem, with the file and the dotted key path it concerns."""

    def __init__(self, message: str, key: str = "", source: str | None = None):
        self.message = message
        self.key = key
        self.source = source
        where = f"{source}: " if source else ""
        at = f"{key}: " if key else ""
        super().__init__(f"{where}{at}{message}")


def bounded(default: Any = dataclasses.MISSING, *, ge=None, gt=None, le=None, lt=None,
            choices=None, default_factory: Any = dataclasses.MISSING, operational: bool = False) -> Any:
    """A dataclass field with bounds that :func:`build` enforces. ``operational``: how a stage runs, not what
    it computes (logging, checkpoint cadence, retries): left out of the stage's key, see :func:`to_dict`."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices).items() if v is not None}
    if operational:
        meta["operational"] = True
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


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
                errors.append(str(e))
        raise ConfigError(f"{value!r} matches none of {_type_name(tp)}", key, source)
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {value!r}", key, source)
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"expected {len(args)} items, got {len(value)}: {value!r}", key, source)
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
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


def _check_bounds(value: Any, meta: typing.Mapping, key: str, source: str | None) -> None:
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        close = difflib.get_close_matches(str(value), [str(c) for c in meta["choices"]], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{value!r} is not one of {sorted(meta['choices'])}{hint}", key, source)
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if not isinstance(v, (int, float)):
            continue
        if "ge" in meta and not v >= meta["ge"]:
            raise ConfigError(f"{v!r} is out of range: must be >= {meta['ge']}", key, source)
        if "gt" in meta and not v > meta["gt"]:
            raise ConfigError(f"{v!r} is out of range: must be > {meta['gt']}", key, source)
        if "le" in meta and not v <= meta["le"]:
            raise ConfigError(f"{v!r} is out of range: must be <= {meta['le']}", key, source)
        if "lt" in meta and not v < meta["lt"]:
            raise ConfigError(f"{v!r} is out of range: must be < {meta['lt']}", key, source)


def build(cls: type, data: dict[str, Any] | None, prefix: str = "", source: str | None = None) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys, types and bounds are checked."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            raise ConfigError(f"unknown key{hint} (valid keys here: {', '.join(sorted(fields))})", key, source)
        kwargs[name] = _coerce(value, hints[name], key, source)
        _check_bounds(kwargs[name], fields[name].metadata, key, source)
    for name, f in fields.items():
        if name in kwargs:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            key = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"missing required key (expected {_type_name(hints[name])})", key, source)
    try:
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if callable(validate):
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


def operational(default_factory: Any) -> Any:
    """A dataclass sub-section that only observes or steers a run (e.g. the training monitor)."""
    return dataclasses.field(default_factory=default_factory, metadata={"operational": True})


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values (lists kept whole), e.g. for MLflow params."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = tree
    return out
