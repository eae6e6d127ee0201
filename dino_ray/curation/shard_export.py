"""The curate stage's outputs from per-shard decisions: manifest and dropped rows, one shard at a time.

Distributed curation leaves per-row decisions next to each shard; the stage's `manifest.parquet` and
`dropped.parquet` need each row's URI, id and label, which live in the embedding shards. Each shard's
task joins the two and returns its part of both tables (and its decode-failure counts); the driver
appends the parts to the two files as they come (`TableAppender`), so no table is ever whole in memory.
Ray-free: the orchestrator runs `export_shard` and `uris_of` as tasks.
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dino_ray import storage

from .shards import Shard

META = ("uri", "id", "label", "skip_reason")


def _meta(shard: Shard) -> pa.Table:
    tables = []
    for uri in shard.files:
        fs, path = storage.filesystem(uri)
        tables.append(pq.read_table(path, filesystem=fs, columns=list(META)))
    return pa.concat_tables(tables)


def uris_of(shard: Shard, pool_indices: np.ndarray) -> dict[int, str]:
    """URI of each given pool index that lies in this shard (duplicates name the copy they kept)."""
    meta = _meta(shard)
    valid = np.flatnonzero([not r for r in meta.column("skip_reason").to_pylist()])
    inside = pool_indices[(pool_indices >= shard.first) & (pool_indices < shard.first + shard.n_valid)]
    uris = meta.column("uri").to_pylist()
    return {int(p): str(uris[valid[p - shard.first]]) for p in inside}


def export_shard(shard: Shard, decisions_uri: str, rep_uris: dict[int, str], n_levels: int
                 ) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """(manifest rows, dropped rows, {"skipped": Counter of decode failures, "bad": URIs per reason})."""
    meta = _meta(shard)
    fs, path = storage.filesystem(decisions_uri)
    decided = pq.read_table(path, filesystem=fs)
    skip = [str(r or "") for r in meta.column("skip_reason").to_pylist()]
    valid = np.flatnonzero([not r for r in skip])
    n = len(skip)
    why = np.asarray(skip, dtype=object)
    of = np.full(n, "", dtype=object)
    reason = np.asarray(decided.column("reason").to_pylist(), dtype=object)
    dropped = np.asarray(decided.column("dropped").to_pylist(), dtype=object)
    dup = decided.column("duplicate_of").to_numpy()
    why[valid] = np.where(dropped != "", dropped, np.where(reason != "", "", "not_sampled"))
    has_rep = valid[dup >= 0]
    of[has_rep] = [rep_uris.get(int(d), "") for d in dup[dup >= 0]]
    kept = valid[reason != ""]
    cols = {"uri": meta.column("uri").take(kept), "id": meta.column("id").take(kept).cast(pa.string()),
            "label": meta.column("label").take(kept).cast(pa.int64()), "source": pa.array(["pool"] * kept.size),
            "reason": pa.array(reason[reason != ""].tolist(), pa.string())}
    for level in range(n_levels):
        cols[f"cluster_l{level}"] = decided.column(f"cluster_l{level}").take(pa.array(np.flatnonzero(reason != "")))
    out = np.flatnonzero(why != "")
    dropped_table = pa.table({"uri": meta.column("uri").take(out), "id": meta.column("id").take(out).cast(pa.string()),
                              "why": pa.array(why[out].tolist(), pa.string()),
                              "duplicate_of": pa.array(of[out].tolist(), pa.string())})
    skipped = Counter(r for r in skip if r)
    uris = meta.column("uri").to_pylist()
    bad = {r: [str(uris[i]) for i in range(n) if skip[i] == r][:20] for r in skipped}
    return pa.table(cols), dropped_table, {"skipped": skipped, "bad": bad, "rows": n}


class TableAppender:
    """One parquet file written part by part (the first part fixes the schema)."""

    def __init__(self, uri: str):
        self.fs, self.path = storage.filesystem(uri)
        parent = posixpath.dirname(self.path) if storage.is_remote(uri) else os.path.dirname(self.path)
        if parent:
            self.fs.create_dir(parent, recursive=True)
        self.stream: Any = None
        self.writer: pq.ParquetWriter | None = None

    def append(self, table: pa.Table) -> None:
        if self.writer is None:
            self.stream = self.fs.open_output_stream(self.path)
            self.writer = pq.ParquetWriter(self.stream, table.schema)
        self.writer.write_table(table.cast(self.writer.schema))

    def close(self, empty_schema: pa.Schema) -> None:
        if self.writer is None:
            self.append(empty_schema.empty_table())
        self.writer.close()
        self.stream.close()


def export_outputs(store: Any, result: Any, runner: Any, manifest_uri: str, dropped_uri: str, n_levels: int
                   ) -> dict[str, Any]:
    """Write manifest and dropped files from a `ShardedCurationResult`; returns decode-failure counts,
    a few bad URIs per reason, the number of files and the dropped counts by reason."""
    reps = result.representatives
    rep_uris: dict[int, str] = {}
    if reps.size:
        for found in runner.map(uris_of, [(s, reps) for s in store.shards]):
            rep_uris.update(found)
    manifest, dropped = TableAppender(manifest_uri), TableAppender(dropped_uri)
    skipped: Counter = Counter()
    bad: dict[str, list[str]] = {}
    by_reason: Counter = Counter()
    rows = 0
    schema = None
    for i in range(0, len(store.shards), 4):  # a few shards' tables at a time in the driver
        chunk = list(zip(store.shards[i:i + 4], result.decisions[i:i + 4]))
        for kept, gone, stats in runner.map(export_shard, [(s, d, rep_uris, n_levels) for s, d in chunk]):
            manifest.append(kept)
            dropped.append(gone)
            schema = schema or (kept.schema, gone.schema)
            skipped.update(stats["skipped"])
            for r, uris in stats["bad"].items():
                bad[r] = (bad.get(r, []) + uris)[:20]
            by_reason.update(gone.column("why").to_pylist())
            rows += stats["rows"]
    manifest.close(schema[0])
    dropped.close(schema[1])
    return {"skipped": dict(skipped), "bad": bad, "rows": rows, "dropped_by_reason": dict(by_reason)}
