"""Plain helpers shared by tests. Kept out of conftest.py: with several conftest files in the tree,
``from conftest import ...`` resolves to whichever one pytest loaded last."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CRD_DIR = REPO.parent / "shared" / "schemas" / "kuberay-v1.7.0"


def in_ci() -> bool:
    """CI sets ``CI=true``; there a missing fixture file is a failure, never a silent skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_path(path: Path, what: str) -> Path:
    """Return ``path`` if it exists; else skip locally, or fail under CI, with a message naming it.

    A plain clone without ``../shared`` would otherwise be green while testing nothing real."""
    if not path.exists():
        message = (f"{what} not found at {path} (tests expect the project's shared/ folder beside the "
                   f"repository: ../shared)")
        if in_ci():
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
