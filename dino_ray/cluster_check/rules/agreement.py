"""Values that must be the same in every manifest: the first one found is the reference."""

from __future__ import annotations

from typing import Callable

from ..manifests import Manifest
from ..report import Problem

# (manifest, where in it, value)
Found = tuple[Manifest, str, str]


def disagreements(found: list[Found], describe: Callable[[str, str, str], str]) -> list[Problem]:
    """One problem per value that differs from the first; ``describe(value, reference, reference file)``."""
    if not found:
        return []
    ref_m, _, reference = found[0]
    return [m.problem(where, describe(value, reference, ref_m.source))
            for m, where, value in found if value != reference]
