"""The dedup / decontamination k-NN graph over shards: route rows to buckets, join inside each bucket.

Copies are near each other, so they land in the same region of embedding space. Buckets are the
cells of a coarse spherical k-means (trained on a sample in the driver); every row goes to its
nearest and its second-nearest bucket, so a pair split by a cell border still meets in one of them.
Each bucket task then builds the same index the in-memory path would (`index.build_index`: exact
when the whole pool is under `index.exact_threshold`, else IVF sized for the bucket) and the same
k-NN graph (`knn_graph`), and returns only what the driver needs: graph edges above the lowest
threshold in use (few: duplicates and near-duplicates), evaluation hits above the decontamination
threshold, and recall figures. With one bucket this is exactly the in-memory computation.

Pure numpy / faiss; the orchestrator runs `route_shard` and `join_bucket` as Ray tasks.
"""

from __future__ import annotations

import dataclasses

import faiss
import numpy as np

from .config import IndexConfig
from .index import build_index, index_kind, measure_recall, search
from .knn_graph import graph_recall, knn_graph
from .shards import Shard, read_shard


def route_shard(shard: Shard, center: np.ndarray | None, cells: np.ndarray) -> tuple:
    """(row count per bucket, then one (pool indices, vectors) piece per bucket) for one shard."""
    x, _ = read_shard(shard, center)
    ids = np.arange(shard.first, shard.first + x.shape[0], dtype=np.int64)
    n_cells = cells.shape[0]
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(cells)
    _, near = index.search(x, min(2, n_cells))
    pieces = []
    for b in range(n_cells):
        rows = np.flatnonzero((near == b).any(axis=1))
        pieces.append((ids[rows], np.ascontiguousarray(x[rows])))
    return (np.array([p[0].size for p in pieces]), *pieces)


def join_bucket(
    cfg: IndexConfig,
    exact: bool,
    k: int,
    min_similarity: float,
    seed: int,
    eval_sets: dict[str, tuple[np.ndarray, int, float]],
    *pieces: tuple[np.ndarray, np.ndarray],
) -> dict:
    """Graph edges (pool indices, src < dst, sim > min_similarity) and eval hits of one bucket.

    `eval_sets` maps a name to (embeddings, k, threshold); hits are (eval row, pool index, sim) among
    the eval row's k nearest bucket rows with sim > threshold.
    """
    ids = np.concatenate([p[0] for p in pieces])
    if ids.size == 0:
        return _empty(eval_sets)
    x = np.concatenate([p[1] for p in pieces])
    order = np.argsort(ids, kind="stable")  # pool order inside the bucket, as in the in-memory graph
    ids, x = ids[order], x[order]
    bucket_cfg = dataclasses.replace(cfg, exact_threshold=ids.size + 1 if exact else 1)
    index = build_index(x, bucket_cfg, seed)
    graph = knn_graph(index, x, k, cfg.search_batch_size)
    edges = graph.edges(min_similarity)
    src, dst = ids[edges.src], ids[edges.dst]
    out = {"n": int(ids.size), "kind": index_kind(index), "src": np.minimum(src, dst), "dst": np.maximum(src, dst),
           "sim": edges.sim, "hits": {}}
    if out["kind"] == "ivf":
        out["index_recall"] = measure_recall(x, index, k, cfg.recall_queries, seed)
        out["graph_recall"] = graph_recall(x, graph, cfg.recall_queries, seed)
    for name, (eval_x, eval_k, threshold) in eval_sets.items():
        sim, found = search(index, eval_x, min(eval_k, ids.size))
        row, col = np.nonzero((found >= 0) & (sim > threshold))
        out["hits"][name] = (row.astype(np.int64), ids[found[row, col]], sim[row, col])
    return out


def search_bucket(cfg: IndexConfig, exact: bool, allowed: np.ndarray, queries: np.ndarray, k: int, seed: int,
                  *pieces: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (sims, pool indices) of queries among the bucket's allowed rows (-inf / -1 where fewer)."""
    ids = np.concatenate([p[0] for p in pieces])
    x = np.concatenate([p[1] for p in pieces])
    ok = allowed[ids]
    ids, x = ids[ok], x[ok]
    sims = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
    found = np.full((queries.shape[0], k), -1, dtype=np.int64)
    if ids.size == 0:
        return sims, found
    order = np.argsort(ids, kind="stable")
    ids, x = ids[order], x[order]
    index = build_index(x, dataclasses.replace(cfg, exact_threshold=ids.size + 1 if exact else 1), seed)
    s, f = search(index, queries, min(k, ids.size))
    sims[:, :s.shape[1]] = s
    found[:, :f.shape[1]] = np.where(f >= 0, ids[np.maximum(f, 0)], -1)
    return sims, found


def merge_top_k(sims: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query row, the k best (sim, id) among several partial top-k lists, each id once (a row
    routed to two buckets comes back from both); ties go to the smaller id, as in one exact search."""
    s = np.concatenate(sims, axis=1)
    i = np.concatenate(ids, axis=1)
    s = np.where(i >= 0, s, -np.inf)
    if s.size == 0:
        return s[:, :k], i[:, :k]
    by_id = np.lexsort((-s, i), axis=1)  # each id's best similarity first
    s, i = np.take_along_axis(s, by_id, axis=1), np.take_along_axis(i, by_id, axis=1)
    repeat = np.zeros(i.shape, dtype=bool)
    repeat[:, 1:] = (i[:, 1:] == i[:, :-1]) & (i[:, 1:] >= 0)
    s = np.where(repeat, -np.inf, s)
    i = np.where(repeat, -1, i)
    best = np.lexsort((np.where(i >= 0, i, np.iinfo(np.int64).max), -s), axis=1)[:, :k]
    return np.take_along_axis(s, best, axis=1), np.take_along_axis(i, best, axis=1)


def top_k_hits(hits: list[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    """Pool indices among the k most similar hits of each eval row, over all buckets (each pool row once):
    what one top-k search over the whole pool followed by the threshold gives."""
    rows = np.concatenate([h[0] for h in hits])
    ids = np.concatenate([h[1] for h in hits])
    sims = np.concatenate([h[2] for h in hits])
    if rows.size == 0:
        return np.zeros(0, dtype=np.int64)
    pair = np.unique(np.stack([rows, ids], axis=1), axis=0, return_index=True)[1]
    rows, ids, sims = rows[pair], ids[pair], sims[pair]
    order = np.lexsort((ids, -sims, rows))
    rows, ids = rows[order], ids[order]
    start = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    rank = np.arange(rows.size) - np.repeat(start, np.diff(np.r_[start, rows.size]))
    return np.unique(ids[rank < k])


def _empty(eval_sets: dict) -> dict:
    none = np.zeros(0, dtype=np.int64)
    return {"n": 0, "kind": "flat", "src": none, "dst": none, "sim": np.zeros(0, np.float32),
            "hits": {name: (none, none, np.zeros(0, np.float32)) for name in eval_sets}}
