"""Images inside container files: members of tar archives and rows of parquet files with image bytes.

Each such image has one URI string, which training indexes, curated manifests and feature shards store and
``dino_ray.data.sources.read_image_bytes`` resolves:

- a tar member: ``<archive>#<member>``, e.g. ``s3://bucket/shards/000.tar#cat/1.jpg``;
- a parquet row: ``<file.parquet>#row=<i>&column=<image column>``, e.g. ``/data/part-0.parquet#row=12&column=image``:
  ``i`` counts the file's rows from 0 across its row groups, and the column name is percent-encoded.

Parquet decodes whole row groups, so reading one row reads its row group; the last :data:`CACHED_ROW_GROUPS`
row groups read are kept per process, and rows read in file order (curate, eval) cost one read per row group.
Training reads in a random order, about one row group per image: write image parquet with small row groups
(Hugging Face ``datasets`` uses 100 rows for images).

Pure module (pyarrow, tarfile and ``dino_ray.storage``); which files and members a source holds, their ids
and labels, is ``sources``' business.
"""

from __future__ import annotations

import re
import tarfile
import threading
from collections import OrderedDict
from typing import Callable
from urllib.parse import quote, unquote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dino_ray import storage

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Two, not one: rows near a row-group boundary, and two readers interleaving files, stay cheap.
CACHED_ROW_GROUPS = 2
_ROW_FRAGMENT = re.compile(r"row=([^&]*)&column=(.+)")


def is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


# ----------------------------------------------------------------------------------------------
# Tar members


def tar_members(archive: str, wanted: Callable[[str], bool]) -> tuple[list[str], Exception | None]:
    """Names of the ``wanted`` regular members of one archive, in archive order, reading headers only (seeking
    over the data where the store allows). A truncated or corrupt archive gives the names read before the
    damage and the error, so one bad shard does not hide the others."""
    fs, path = storage.filesystem(archive)
    names: list[str] = []
    try:
        with fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            names.extend(m.name for m in tar if m.isfile() and wanted(m.name))
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        return names, e
    return names, None


def read_tar_member(archive: str, member: str) -> bytes:
    """Bytes of one member; ``FileNotFoundError`` when it is not there, ``StorageError`` when the store keeps
    failing (``storage.with_retries``)."""
    fs, path = storage.filesystem(archive)

    def read() -> bytes:
        with fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            try:
                handle = tar.extractfile(member)
            except KeyError:
                raise FileNotFoundError(f"no member {member!r} in the archive {archive!r}") from None
            if handle is None:
                raise FileNotFoundError(f"{member!r} in {archive!r} is not a regular file")
            return handle.read()

    return storage.with_retries(read, f"reading {archive}#{member}")


# ----------------------------------------------------------------------------------------------
# Parquet rows


def row_uri(file: str, row: int, column: str) -> str:
    """The URI of one row's image (module doc)."""
    return f"{file}#row={row}&column={quote(column, safe='')}"


def parse_row_uri(uri: str) -> tuple[str, int, str] | None:
    """``(file, row, column)`` of a parquet row URI; None for any other URI (a file, a tar member).

    A ``.parquet#row=`` URI whose index or column cannot be read is a ``ValueError`` naming it: it was
    written wrong, it is not a missing image."""
    file, sep, fragment = uri.rpartition("#")
    if not sep or not file.lower().endswith(".parquet") or not fragment.startswith("row="):
        return None
    match = _ROW_FRAGMENT.fullmatch(fragment)
    if match is None or not match.group(1).isdigit():
        raise ValueError(f"bad parquet row URI {uri!r}: expected <file.parquet>#row=<index>&column=<image column>, "
                         f"with the index an integer >= 0")
    return file, int(match.group(1)), unquote(match.group(2))


def image_bytes(value) -> bytes | None:
    """Encoded bytes from a parquet cell: binary, or a struct with a "bytes" field (Hugging Face datasets)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return value.tobytes()
    return bytes(value)


class RowGroupCache:
    """The last ``size`` row groups read in this process, one column each, most recently used last.

    Keyed by ``(file, column, first row)``: a rewritten file read again in the same process may be served
    from here, which readers of a fixed index never do."""

    def __init__(self, size: int = CACHED_ROW_GROUPS):
        self.size = size
        self._groups: OrderedDict[tuple[str, str, int], pa.ChunkedArray] = OrderedDict()
        self._lock = threading.Lock()  # a Ray actor may run its batches in threads

    def find(self, file: str, column: str, row: int) -> tuple[int, pa.ChunkedArray] | None:
        """``(first row, values)`` of the cached row group holding ``row``, if any."""
        with self._lock:
            for key, values in self._groups.items():
                if key[:2] == (file, column) and key[2] <= row < key[2] + len(values):
                    self._groups.move_to_end(key)
                    return key[2], values
        return None

    def put(self, file: str, column: str, start: int, values: pa.ChunkedArray) -> None:
        with self._lock:
            self._groups[(file, column, start)] = values
            self._groups.move_to_end((file, column, start))
            while len(self._groups) > self.size:
                self._groups.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._groups.clear()

    def __len__(self) -> int:
        return len(self._groups)


ROW_GROUPS = RowGroupCache()


def _read_row_group(file: str, row: int, column: str) -> tuple[int, pa.ChunkedArray]:
    """``(first row, column values)`` of the row group of ``file`` that holds ``row``."""
    fs, path = storage.filesystem(file)
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        if column not in names:
            raise ValueError(f"{file!r} has no image column {column!r} (asked for row {row}); its columns are "
                             f"{names}")
        start = 0
        for group in range(parquet.metadata.num_row_groups):
            n = parquet.metadata.row_group(group).num_rows
            if row < start + n:
                return start, parquet.read_row_group(group, columns=[column]).column(column)
            start += n
    raise FileNotFoundError(f"{file!r} has no row {row}: it has {start} rows")


def read_parquet_row(file: str, row: int, column: str) -> bytes:
    """The image bytes of one row (b"" for a null cell: a counted ``empty`` skip). ``FileNotFoundError`` names
    the file and the row when the row or the file is gone; ``StorageError`` when the store keeps failing."""
    found = ROW_GROUPS.find(file, column, row)
    if found is None:
        found = storage.with_retries(lambda: _read_row_group(file, row, column), f"reading {file} row {row}")
        ROW_GROUPS.put(file, column, *found)
    start, values = found
    return image_bytes(values[row - start].as_py()) or b""


def column_names(file: str) -> list[str]:
    """The column names of a parquet file (its footer only)."""
    fs, path = storage.filesystem(file)
    return pq.read_schema(path, filesystem=fs).names


def parquet_columns(file: str, columns: list[str], required: tuple[str, ...] = ()) -> tuple[int, dict[str, list]]:
    """The row count of a parquet file and the values of ``columns`` (ids, labels, URIs), reading no other
    column (not the image bytes); a missing column of ``columns`` or ``required`` is a ``ValueError`` naming
    the file and its columns."""
    fs, path = storage.filesystem(file)
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        for column in (*required, *columns):
            if column not in names:
                raise ValueError(f"column {column!r} not found in {file!r}; its columns are {names}")
        table = parquet.read(columns=columns) if columns else None
        return parquet.metadata.num_rows, {c: table.column(c).to_pylist() for c in columns}


def read_column(files: list[str], column: str) -> list:
    """One column of parquet files, concatenated."""
    return [value for file in files for value in parquet_columns(file, [column])[1][column]]
