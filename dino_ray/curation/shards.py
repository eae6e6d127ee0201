"""The sharded embedding store of distributed curation: parquet files grouped into shards of rows.

A shard is a run of consecutive parquet files (the curate stage's embedding shards, or files written
by `write_shards`) that one Ray task reads at a time; the driver only keeps file names and row
counts. Rows whose `skip_reason` is set (images that did not decode) are not pool rows: pool indices
count the valid rows in file order, exactly the rows `curate_arrays` would get, so both paths number
images the same way. Ray-free: the orchestrator ships `Shard`s to tasks, which call `read_shard`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dino_ray import storage

EMBEDDING = "embedding"
SKIP = "skip_reason"


@dataclass(frozen=True)
class Shard:
    files: tuple[str, ...]
    n_rows: int  # rows in the files, valid or not
    first: int = 0  # pool index of the shard's first valid row
    n_valid: int = -1  # valid rows (-1 until counted)


@dataclass
class ShardStore:
    shards: list[Shard]
    dim: int
    # Subtracted from every row, which is then re-normalised (the stage's `embed.center`); None: as stored.
    center: np.ndarray | None = None

    @property
    def n(self) -> int:
        return sum(s.n_valid for s in self.shards)

    def with_valid_counts(self, counts: Sequence[int]) -> ShardStore:
        """The store with each shard's valid-row count and first pool index filled in."""
        firsts = np.r_[0, np.cumsum(counts)[:-1]].astype(int)
        shards = [dataclasses.replace(s, first=int(f), n_valid=int(c)) for s, f, c in zip(self.shards, firsts, counts)]
        return ShardStore(shards, self.dim, self.center)


def open_shards(files: Sequence[str], shard_rows: int) -> ShardStore:
    """Group parquet files (in order) into shards of about shard_rows rows, from their footers only."""
    if not files:
        raise ValueError("no embedding files to curate")
    groups: list[list[str]] = [[]]
    rows: list[int] = [0]
    dim = 0
    for uri in files:
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f)
            n = meta.metadata.num_rows
            field = meta.schema_arrow.field(EMBEDDING)
        if not pa.types.is_fixed_size_list(field.type):
            raise ValueError(f"{uri}: column {EMBEDDING!r} must be a fixed-size list of floats, got {field.type}")
        dim = field.type.list_size
        if rows[-1] and rows[-1] + n > shard_rows:
            groups.append([])
            rows.append(0)
        groups[-1].append(uri)
        rows[-1] += n
    return ShardStore([Shard(tuple(g), r) for g, r in zip(groups, rows)], dim)


def write_shards(uri: str, x: np.ndarray, shard_rows: int) -> ShardStore:
    """Write an [N, D] array as parquet shards under uri (tests, benchmarks); every row valid."""
    shards = []
    for i, start in enumerate(range(0, x.shape[0], shard_rows)):
        part = np.ascontiguousarray(x[start:start + shard_rows], dtype=np.float32)
        file = storage.join(uri, f"shard-{i:05d}.parquet")
        storage.write_parquet(file, pa.table({EMBEDDING: _vectors(part)}))
        shards.append(Shard((file,), part.shape[0], start, part.shape[0]))
    return ShardStore(shards, x.shape[1])


def read_shard(shard: Shard, center: np.ndarray | None = None, columns: Sequence[str] = ()) -> tuple[np.ndarray, dict]:
    """(float32 [n_valid, D] unit rows, {column: values of the valid rows}) of one shard."""
    tables = []
    for uri in shard.files:
        fs, path = storage.filesystem(uri)
        schema = pq.read_schema(path, filesystem=fs)
        wanted = [EMBEDDING] + [c for c in (SKIP, *columns) if c in schema.names]
        tables.append(pq.read_table(path, filesystem=fs, columns=list(dict.fromkeys(wanted))))
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    col = table.column(EMBEDDING).combine_chunks()
    x = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size).astype(np.float32)
    valid = np.ones(len(col), dtype=bool)
    if SKIP in table.column_names:
        valid = np.asarray([not r for r in table.column(SKIP).to_pylist()], dtype=bool)
    x = x[valid] if not valid.all() else x
    if center is not None:
        x = x - center.astype(np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    extra = {c: np.asarray(table.column(c).to_pylist(), dtype=object)[valid]
             for c in columns if c in table.column_names}
    return np.ascontiguousarray(x), extra


def count_valid(shard: Shard) -> tuple[int, np.ndarray]:
    """(valid rows, float64 sum of their raw embeddings): the first pass, which also yields the mean."""
    x, _ = read_shard(dataclasses.replace(shard), None)
    return x.shape[0], x.astype(np.float64).sum(axis=0)


def _vectors(x: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
