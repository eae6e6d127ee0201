"""Sizes written in a config: ``80GB`` and friends (torch-free, used by validation and ``dino-ray plan``)."""

from __future__ import annotations

import re

GiB = 2 ** 30
_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str | float | int) -> int:
    """``80GB`` / ``80GiB`` / ``80`` (GiB) -> bytes. GPU vendors' "80GB" means 80 GiB of HBM (an A100-80GB
    has 81,920 MiB), so GB is read as GiB here, as nvidia-smi shows it."""
    if isinstance(text, (int, float)):
        return int(float(text) * GiB)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 80GB, 40GiB or 16000MiB")
    if unit in ("", "gb"):
        unit = "gib"
    if unit in ("mb", "tb", "kb"):
        unit = unit[0] + "ib"
    return int(float(m.group(1)) * _UNITS[unit])


