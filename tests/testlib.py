"""Plain helpers shared by tests. Kept out of conftest.py: with several conftest files in the tree,
``from conftest import ...`` resolves to whichever one pytest loaded last."""

from __future__ import annotations

import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
