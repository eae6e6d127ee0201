"""Parquet files of per-image vectors (embeddings, cached eval features) with their ids and labels.

Vectors are stored as fixed-size lists of float32, one column per feature, so the files read back
with plain pyarrow (no Ray extension types) on any machine.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dino_ray import storage

META_COLUMNS = ("id", "uri", "label", "skip_reason")


def write_features(uri: str, meta: Mapping[str, Sequence], features: Mapping[str, np.ndarray]) -> None:
    cols: dict[str, pa.Array] = {}
    n = len(next(iter(meta.values())))
    for k, v in meta.items():
        cols[k] = pa.array(list(v))
    for k, arr in features.items():
        arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(n, -1)
        cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])
    storage.write_parquet(uri, pa.table(cols))


def read_features(uris: str | Sequence[str], columns: Sequence[str] | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(meta columns, feature matrices) of one file or several shard files, concatenated in order."""
    uris = [uris] if isinstance(uris, str) else list(uris)
    tables = []
    for u in uris:
        fs, path = storage.filesystem(u)
        tables.append(pq.read_table(path, filesystem=fs, columns=list(columns) if columns else None))
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    meta, feats = {}, {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            feats[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        else:
            meta[name] = np.asarray(col.to_pylist(), dtype=object if pa.types.is_string(col.type) else None)
    return meta, feats
