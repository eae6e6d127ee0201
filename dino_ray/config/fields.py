"""Config fields: each bound is declared once, on the field, and checked wherever a config is made.

The convention for every config dataclass of dino-ray (everything reachable from ``JobConfig``):

- a per-field rule is declared on the field: ``bounded(default, ge=, gt=, le=, lt=)`` for numbers (on
  every item of a list or tuple), a ``Literal[...]`` type for a fixed set of choices;
- a rule between fields lives in ``validate(self) -> None``, which raises ``ValueError`` naming the key(s);
- the class derives from :class:`Checked`, whose ``__post_init__`` checks the declared bounds and then
  calls ``validate()``; the YAML loader (:func:`dino_ray.config.typed.build`) uses the same checks, so
  a config built in code fails exactly like one read from a job file.

Also here: the field metadata that other code discovers by walking the types (``operational`` fields
left out of a stage's key, ``uri`` fields made absolute and ``input`` fields checked to exist).
Nothing here imports more than the standard library.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Iterator, Literal, Union, get_args, get_origin

_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


class ConfigError(ValueError):
    """A config problem, with the file and the dotted key path it concerns; ``problems`` holds every
    single problem when several were found at once (each with its own key)."""

    def __init__(self, message: str, key: str = "", source: str | None = None,
                 problems: list["ConfigError"] | None = None):
        self.message = message
        self.key = key
        self.source = source
        self.problems = problems or [self]
        where = f"{source}: " if source else ""
        at = f"{key}: " if key else ""
        super().__init__(f"{where}{at}{message}")

    @classmethod
    def combine(cls, errors: list["ConfigError"], source: str | None = None) -> "ConfigError":
        """One error that reports all of ``errors`` (flattened), each line naming its key."""
        flat = [p for e in errors for p in e.problems]
        if len(flat) == 1:
            e = flat[0]
            return e if e.source or not source else cls(e.message, e.key, source)
        lines = "".join(f"\n  {p.key + ': ' if p.key else ''}{p.message}" for p in flat)
        return cls(f"{len(flat)} problems:{lines}", "", source, flat)


def bounded(default: Any = dataclasses.MISSING, *, ge=None, gt=None, le=None, lt=None, choices=None,
            hint: str | None = None, default_factory: Any = dataclasses.MISSING, operational: bool = False,
            uri: bool = False, input: Literal["optional", "required"] | None = None) -> Any:
    """A dataclass field with bounds, checked by :class:`Checked` and by the YAML loader.

    ``ge``/``gt``/``le``/``lt``: numeric bounds (also on each item of a list/tuple; a bounded number must be
    finite). ``choices``: allowed values (prefer a ``Literal[...]`` type). ``hint``: appended to a bound's
    error. ``operational``: how a stage runs, not what it computes (logging, checkpoint cadence, retries):
    left out of the stage's key, see :func:`dino_ray.config.typed.to_dict`. ``uri``: a local path or URI,
    made absolute by ``JobConfig.absolutize``. ``input``: what the stage reads, checked to exist before any
    cluster work when its stage runs; ``"optional"``: empty means unused or filled in from an upstream stage,
    ``"required"``: must be set (on a section field, e.g. a ``SourceConfig``, it applies to its URIs)."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, hint=hint, input=input).items()
            if v is not None}
    if operational:
        meta["operational"] = True
    if uri:
        meta["uri"] = True
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def operational(default_factory: Any) -> Any:
    """A dataclass sub-section that only observes or steers a run (e.g. the training monitor)."""
    return dataclasses.field(default_factory=default_factory, metadata={"operational": True})


def literal_choices(tp: Any) -> tuple | None:
    """The allowed values of a ``Literal`` type, also inside ``Optional[...]``, ``list[...]``, ``tuple[...]``."""
    origin = get_origin(tp)
    if origin is Literal:
        return get_args(tp)
    if origin in (Union, types.UnionType, list, tuple, typing.Sequence):
        found = [c for a in get_args(tp) if a is not Ellipsis and (c := literal_choices(a)) is not None]
        return tuple(v for c in found for v in c) if found else None
    return None


def problem(value: Any, meta: typing.Mapping, choices: tuple | None = None) -> tuple[Any, str] | None:
    """``(offending value, reason)`` when ``value`` breaks the field's declared rules, else None."""
    if value is None:
        return None
    values = value if isinstance(value, (list, tuple)) else [value]
    allowed = [c for c in (choices, meta.get("choices")) if c is not None]
    for v in values:
        for options in allowed:
            if v not in options:
                close = difflib.get_close_matches(str(v), [str(c) for c in options], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                shown = list(options) if options is choices else sorted(options)
                return v, f"is not one of {shown}{hint}"
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        for name, (op, ok) in _BOUNDS.items():
            if name in meta and not ok(v, meta[name]):
                hint = f" ({meta['hint']})" if "hint" in meta else ""
                return v, f"is out of range: must be {op} {meta[name]}{hint}"
        if any(b in meta for b in _BOUNDS) and not math.isfinite(v):
            return v, "is out of range: must be a finite number"
    return None


_RULES: dict[type, list[tuple[str, typing.Mapping, tuple | None]]] = {}


def field_rules(cls: type) -> list[tuple[str, typing.Mapping, tuple | None]]:
    """``(name, metadata, Literal choices)`` of the fields of ``cls`` that declare a rule (cached)."""
    rules = _RULES.get(cls)
    if rules is None:
        hints = typing.get_type_hints(cls)
        rules = []
        for f in dataclasses.fields(cls):
            choices = literal_choices(hints.get(f.name))
            if choices is not None or any(k in f.metadata for k in ("choices", *_BOUNDS)):
                rules.append((f.name, f.metadata, choices))
        _RULES[cls] = rules
    return rules


class Checked:
    """Base of the config dataclasses: construction checks the fields' declared rules, then ``validate()``.

    Errors of direct construction read ``<label>.<field>=<value> <reason>``; ``label`` is the class name
    unless the class sets ``config_label`` (a plain class attribute, not a field)."""

    def __post_init__(self) -> None:
        label = getattr(type(self), "config_label", type(self).__name__)
        errors = []
        for name, meta, choices in field_rules(type(self)):
            value = getattr(self, name)
            found = problem(value, meta, choices)
            if found is not None:
                bad, reason = found
                item = "" if bad is value else f": item {bad!r}"
                errors.append(f"{label}.{name}={value!r}{item} {reason}")
        if errors:
            raise ValueError("; ".join(errors))
        self.validate()

    def validate(self) -> Any:
        """Rules between fields; raise ValueError naming the key(s)."""


@dataclasses.dataclass
class UriField:
    """One URI found by :func:`uri_fields`: its dotted key, value, and how to replace it."""

    key: str
    value: str
    input: str | None  # None: not an input; "optional" or "required" (see :func:`bounded`)
    owner: Any
    name: str
    index: int | None = None

    def set(self, value: str) -> None:
        if self.index is None:
            setattr(self.owner, self.name, value)
        else:
            getattr(self.owner, self.name)[self.index] = value


def uri_fields(obj: Any, prefix: str = "", active_only: bool = False, need: str | None = None) -> Iterator[UriField]:
    """Every ``uri`` field under the dataclass tree ``obj``, walking sections and lists of sections.
    ``active_only`` skips sections whose ``enabled`` is false (they read nothing)."""
    if active_only and getattr(obj, "enabled", True) is False:
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        want = "required" if "required" in (need, f.metadata.get("input")) else f.metadata.get("input", need)
        if f.metadata.get("uri"):
            if isinstance(value, list):
                for i, v in enumerate(value):
                    yield UriField(f"{key}[{i}]", v, want, obj, f.name, i)
            elif value is not None:
                yield UriField(key, value, want, obj, f.name)
        elif dataclasses.is_dataclass(value):
            yield from uri_fields(value, key, active_only, want)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if dataclasses.is_dataclass(v):
                    yield from uri_fields(v, f"{key}[{i}]", active_only, want)
