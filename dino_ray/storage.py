"""One way to read and write URIs, local or ``s3://``.

Every stage names its inputs and outputs as URIs under the pipeline's ``output_root``. This module
turns such a URI into a ``pyarrow.fs.FileSystem`` plus a path, so that parquet, checkpoints and
small JSON manifests go through one code path whether they live on a laptop or in a bucket.

S3 endpoint and credentials come from the standard AWS environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``), so a local S3 (moto) works by
setting ``AWS_ENDPOINT_URL`` alone.

**Transient errors are not bad data.** Reads retry with exponential backoff (:data:`READ_RETRY`) on one
S3 client per process (building a client costs ~11 ms and a credentials lookup); a read that still fails
raises :class:`StorageError`, which callers let through, so a stage fails loudly instead of counting an
outage as a pile of bad images and silently training on fewer. A missing file (``FileNotFoundError``) is
not retried: it is a fact about the data, which callers count as a ``missing`` skip.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import posixpath
import time
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

log = logging.getLogger("dino_ray.storage")
T = TypeVar("T")


class StorageError(RuntimeError):
    """Storage stayed unreachable or failing through every retry. Deliberately not an ``OSError``: decoders
    treat ``OSError`` as a fact about one file, and this is a fact about the store."""


@dataclasses.dataclass(frozen=True)
class Retry:
    """``attempts`` tries with waits of ``backoff_s``, doubling up to ``max_backoff_s``, between them."""

    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0


# ~7.5 s of waiting plus the client's own attempts (~2 s each against an unreachable endpoint): rides out
# a throttling burst or a restarting endpoint, yet a dead store fails the stage in well under a minute.
READ_RETRY = Retry()


def with_retries(fn: Callable[[], T], what: str, retry: Retry | None = None) -> T:
    """``fn()``, retried on ``OSError`` except ``FileNotFoundError``; :class:`StorageError` after the last try.
    ``retry`` defaults to :data:`READ_RETRY` as it is at call time."""
    retry = retry or READ_RETRY
    wait = retry.backoff_s
    for attempt in range(1, retry.attempts + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError as e:
            if attempt == retry.attempts:
                raise StorageError(f"{what}: failed {retry.attempts} times, last: {type(e).__name__}: {e}") from e
            log.warning("%s: %s: %s (attempt %d of %d, retrying in %.1f s)", what, type(e).__name__, e, attempt,
                        retry.attempts, wait)
            time.sleep(wait)
            wait = min(wait * 2, retry.max_backoff_s)
    raise AssertionError("unreachable")


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme of ``base`` intact."""
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *[p.strip("/") for p in parts])
    return os.path.join(base, *parts)


def _s3_filesystem() -> pafs.S3FileSystem:
    """The process's S3 client for the current AWS environment (a changed endpoint, region or key id, as in
    tests or after a credentials rotation, gets a new one)."""
    env = os.environ
    return _s3_client(env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
                      env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"), env.get("AWS_ACCESS_KEY_ID"),
                      env.get("AWS_PROFILE"))


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, region: str | None, key_id: str | None, profile: str | None
               ) -> pafs.S3FileSystem:
    del key_id, profile  # part of the cache key only: pyarrow reads credentials from the environment
    kwargs: dict[str, Any] = {"allow_bucket_creation": True}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if region:
        kwargs["region"] = region
    elif endpoint:
        kwargs["region"] = "us-east-1"
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path, ``file://`` or ``s3://`` URI."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        return _s3_filesystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str, retry: Retry | None = None) -> bytes:
    """The file's bytes; transient errors are retried, then raise :class:`StorageError` (module doc)."""
    fs, path = filesystem(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return with_retries(read, f"reading {uri}", retry)


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically where the filesystem allows it (temp file + rename on local disks)."""
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_parquet(uri: str, table: Any) -> None:
    """A ``pyarrow.Table`` as one parquet file at ``uri`` (atomically, as :func:`write_bytes`)."""
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(uri, buf.getvalue())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


def delete(uri: str) -> None:
    """Remove a file or a whole directory tree; a missing path is not an error."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def move(src: str, dst: str) -> None:
    """Move a file or folder to ``dst`` on the same store (a rename locally; copy, then delete on S3,
    which has no directory rename)."""
    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    parent = dst_path.rstrip("/").rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if is_remote(src) and fs.get_file_info(src_path).type == pafs.FileType.Directory:
        pafs.copy_files(src_path, dst_path, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(src_path)
    else:
        fs.move(src_path, dst_path)


def list_files(uri: str, recursive: bool = True, unlisted: list[tuple[str, str]] | None = None) -> list[str]:
    """All file URIs below ``uri``, sorted, with the scheme of ``uri`` kept.

    A local tree is walked with :func:`walk_local`: what cannot be listed (a name that is not UTF-8, a broken
    symlink, a symlink loop) is appended to ``unlisted`` as ``(name, reason)`` instead of failing the listing.
    """
    if not is_remote(uri) and recursive:
        return walk_local(filesystem(uri)[1], unlisted if unlisted is not None else [])
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    prefix = "s3://" if uri.startswith("s3://") else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File)


def walk_local(root: str, unlisted: list[tuple[str, str]]) -> list[str]:
    """Files below a local folder, sorted, following symlinks once each.

    Names are read as bytes: a single non-UTF-8 name made a str listing raise ``UnicodeDecodeError`` for
    the whole tree; it is reported as ``non_utf8_name`` instead. Directories are visited once by inode, so
    a symlink cycle (``up -> ..``) cannot list the tree again and again (``symlink_loop``); a symlink whose
    target is gone is ``broken_symlink``.
    """
    files: list[str] = []
    seen: set[tuple[int, int]] = set()
    stack = [os.fsencode(root)]
    while stack:
        folder = stack.pop()
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            unlisted.append((os.fsdecode(folder), "symlink_loop"))
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            unlisted.append((os.fsdecode(folder), f"unreadable_folder: {e.strerror}"))
            continue
        for entry in entries:
            try:
                name = entry.path.decode("utf-8")
            except UnicodeDecodeError:
                unlisted.append((entry.path.decode("utf-8", "backslashreplace"), "non_utf8_name"))
                continue
            try:
                if entry.is_dir():  # follows symlinks
                    stack.append(entry.path)
                elif entry.is_file():
                    files.append(name)
                elif entry.is_symlink():
                    unlisted.append((name, "broken_symlink"))
                else:
                    unlisted.append((name, "not_a_file"))  # socket, fifo, device
            except OSError as e:  # ELOOP from a self-referencing symlink, EACCES
                unlisted.append((name, f"unreadable: {e.strerror}"))
    return sorted(files)


def list_children(uri: str) -> list[str]:
    """Direct children (files and folders) of a folder URI; empty when it does not exist."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    prefix = "s3://" if uri.startswith("s3://") else ""
    return sorted(prefix + i.path for i in infos)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder to ``uri`` (plain copy for local destinations)."""
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
