"""Per-shard steps of distributed curation after clustering: offer sample candidates, write decisions.

Each function runs in one task on one shard's rows and returns little: the rows a shard offers for
a quota (its own best quota[c] per cluster, a superset of its share of the global pick) or the URI
of the per-row decisions it wrote. Ray-free, like the rest of the core.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dino_ray import storage

from .plan import REASONS
from .sampling import row_keys, take_per_group
from .shards import Shard

DROPPED = ("", "duplicate", "eval_copy")


def pick_shard(shard: Shard, keep: np.ndarray, assigned: tuple[np.ndarray, np.ndarray], quota: np.ndarray,
               key: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool indices, cluster, key) of this shard's quota[c] lowest-key points of every cluster c; the
    key is the distance to the centroid ("distance") or `row_keys` of the pool index ("random")."""
    label, distance = assigned
    rows = shard.first + np.flatnonzero(keep[shard.first:shard.first + shard.n_valid])
    order_key = distance.astype(np.float64) if key == "distance" else row_keys(rows, seed)
    chosen = take_per_group(label, order_key, quota)
    return rows[chosen], label[chosen], order_key[chosen]


def write_decisions(shard: Shard, uri: str, keep: np.ndarray | None, assigned: tuple | None, paths: np.ndarray,
                    reason: np.ndarray, dropped: np.ndarray, duplicate_of: np.ndarray) -> str:
    """One parquet file with every valid row of the shard: pool_index, dropped ("", "duplicate",
    "eval_copy"), duplicate_of (pool index or -1), reason ("" when not kept) and cluster_l<level>."""
    n = shard.n_valid
    ids = np.full((n, paths.shape[1]), -1, dtype=np.int64)
    if assigned is not None and paths.shape[1]:
        ids[np.flatnonzero(keep[shard.first:shard.first + n])] = paths[assigned[0]]
    names = np.asarray(("",) + REASONS, dtype=object)
    cols = {"pool_index": pa.array(np.arange(shard.first, shard.first + n, dtype=np.int64)),
            "dropped": pa.array(np.asarray(DROPPED, dtype=object)[dropped].tolist(), pa.string()),
            "duplicate_of": pa.array(duplicate_of.astype(np.int64)),
            "reason": pa.array(names[reason.astype(np.int64) + 1].tolist(), pa.string())}
    for level in range(ids.shape[1]):
        cols[f"cluster_l{level}"] = pa.array(ids[:, level])
    storage.write_parquet(uri, pa.table(cols))
    return uri


def read_decisions(uris: list[str]) -> dict[str, np.ndarray]:
    """All decision files concatenated (tests and small pools: O(N) in the caller)."""
    import pyarrow.parquet as pq

    tables = []
    for u in uris:
        fs, path = storage.filesystem(u)
        tables.append(pq.read_table(path, filesystem=fs))
    table = pa.concat_tables(tables)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
