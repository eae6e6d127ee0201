"""Reading the Dockerfile well enough for the cross-checks: instructions, ARG defaults, final stage."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from .images import image_repo_tag, semver

_ARG_REF = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_RAY_PIN = re.compile(r"\bray(?:\[[^\]]*\])?==(\d+\.\d+\.\d+)")
_RAY_IMAGES = ("rayproject/ray", "rayproject/ray-ml")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, with the line it starts on (for error messages)."""

    line: int
    op: str
    args: str


def _join_lines(text: str) -> list[Instruction]:
    """Instructions with ``\\`` continuations joined; comments inside a continuation are dropped, as docker does."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        start = start or number
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        op, _, args = (pending + stripped).partition(" ")
        instructions.append(Instruction(start, op.upper(), args.strip()))
        pending, start = "", 0
    return instructions


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with line continuations joined and ``ARG`` defaults substituted."""
    args_defaults: dict[str, str] = {}
    out = []
    for ins in _join_lines(path.read_text()):
        text = _ARG_REF.sub(lambda g: args_defaults.get(g.group(1) or g.group(2), g.group(0)), ins.args)
        if ins.op == "ARG" and "=" in text:
            name, _, value = text.partition("=")
            args_defaults[name.strip()] = value.strip().strip('"')
        out.append(Instruction(ins.line, ins.op, text))
    return out


def _final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [i for i, ins in enumerate(instructions) if ins.op == "FROM"]
    return instructions[starts[-1]:] if starts else []


def _from_image(ins: Instruction) -> str:
    words = [w for w in ins.args.split() if not w.startswith("--")]
    return words[0] if words else ""


def _copy_sources(ins: Instruction) -> list[str]:
    """Build-context paths a COPY/ADD reads (none for ``--from`` stage copies or URLs)."""
    words = json.loads(ins.args) if ins.args.startswith("[") else ins.args.split()
    if any(w.startswith("--from") for w in words):
        return []
    words = [w for w in words if not w.startswith("--")]
    return [w for w in words[:-1] if "://" not in w]


def _ray_versions(ins: Instruction) -> list[tuple[int, str]]:
    """Ray versions an instruction pins: a ``rayproject/ray:X.Y.Z-...`` base or a ``ray==X.Y.Z`` install."""
    if ins.op == "FROM":
        repo, tag = image_repo_tag(_from_image(ins))
        version = semver(tag)
        return [(ins.line, "%d.%d.%d" % version)] if repo.endswith(_RAY_IMAGES) and version else []
    if ins.op == "RUN":
        return [(ins.line, v) for v in _RAY_PIN.findall(ins.args)]
    return []


def dockerfile_facts(path: Path) -> dict[str, Any]:
    """What the cross-checks need: base image, ray versions pinned, final USER and WORKDIR, COPY sources."""
    instructions = parse_dockerfile(path)
    final = _final_stage(instructions)
    users = [ins.args for ins in final if ins.op == "USER"]
    workdirs = [ins.args for ins in final if ins.op == "WORKDIR"]
    return {
        "base": _from_image(final[0]) if final else "",
        "ray_versions": [found for ins in instructions for found in _ray_versions(ins)],
        "user": users[-1] if users else None,
        "workdir": workdirs[-1] if workdirs else None,
        "copy_sources": [(ins.line, s) for ins in final if ins.op in ("COPY", "ADD") for s in _copy_sources(ins)],
    }
