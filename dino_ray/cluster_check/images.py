"""Container image references and the Ray versions written inside them."""

from __future__ import annotations

import re

_SEMVER = re.compile(r"(\d+)\.(\d+)\.(\d+)")


def semver(text: str) -> tuple[int, int, int] | None:
    """The first ``X.Y.Z`` in ``text`` (``2.60.0-py311-gpu`` -> ``(2, 60, 0)``), or None."""
    match = _SEMVER.search(str(text))
    return tuple(int(g) for g in match.groups()) if match else None  # type: ignore[return-value]


def image_repo_tag(image: str) -> tuple[str, str]:
    """``(repository, tag)`` of an image reference; the tag is empty when none is given."""
    ref = image.split("@", 1)[0]
    repo, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:  # "host:5000/name" has no tag
        return ref, ""
    return repo, tag
