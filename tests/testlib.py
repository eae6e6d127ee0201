"""Plain helpers shared by tests. Kept out of conftest.py: with several conftest files in the tree,
``from conftest import ...`` resolves to whichever one pytest loaded last."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


class RestartableMlflowServer:
    """A real ``mlflow server`` that can be stopped and started again on the same port and store, as an
    outage looks to a client: connections refused, then the same server with the same runs back."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not start in {timeout} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        self.proc = None


def pipeline_in_thread(job, **run_kwargs):
    """Start ``Pipeline(job).run()`` in a daemon thread (a test pokes at the run meanwhile: kills a worker,
    stops a server); returns the thread and the list its exception, if any, lands in."""
    import threading

    from dino_ray.pipeline import Pipeline

    errors: list[BaseException] = []

    def run() -> None:
        try:
            Pipeline(job, ensure_ray=lambda: None).run(**run_kwargs)
        except BaseException as e:  # noqa: BLE001 - surfaced by the test
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)  # a failed assertion must not hang the session
    thread.start()
    return thread, errors


def encode(img, fmt: str, **kwargs) -> bytes:
    """A PIL image encoded as ``fmt`` (PNG, JPEG, TIFF ...): real bytes for decoders to read."""
    import io

    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int, color_type: int = 2) -> bytes:
    """A PNG whose header claims ``width x height`` (8-bit; ``color_type`` 0 gray, 2 RGB) but whose pixel data
    is a few bytes: what a decompression bomb or a cut-off download looks like to a decoder."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A tar archive at ``path`` holding ``members`` (name -> bytes), in that order."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path
