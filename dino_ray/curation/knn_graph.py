"""k-NN graph of the pool (every image against every other), and its thresholded edge list.

With an exact index the graph comes from faiss's BLAS-batched flat search. With an IVF index,
faiss would scan the lists query by query, which runs at a few GFLOP/s on CPU; because here the
queries are the indexed vectors themselves, the graph is instead computed list by list: the
members of one list are compared, with one matrix product, to the members of the nprobe lists
whose centroids are closest to that list's centroid. Same candidate count as IVF search, but at
GEMM speed. The price is that a query near a list border probes its list's neighbours rather than
its own, which `graph_recall` measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from .index import as_embeddings, index_kind, search

# Largest [queries x candidates] similarity block held at once (float32: 128 MB).
_BLOCK_ELEMENTS = 1 << 25


@dataclass
class KnnEdges:
    """Directed edges i -> j (j among the k neighbours of i) with their cosine similarity."""

    n_nodes: int
    src: np.ndarray  # int64 [E]
    dst: np.ndarray  # int64 [E]
    sim: np.ndarray  # float32 [E]

    def above(self, threshold: float) -> KnnEdges:
        """The sub-graph of edges with similarity strictly above threshold."""
        keep = self.sim > threshold
        return KnnEdges(self.n_nodes, self.src[keep], self.dst[keep], self.sim[keep])


@dataclass
class KnnGraph:
    """The k nearest other images of every pool image, most similar first (-1 / -inf if fewer)."""

    ids: np.ndarray  # int64 [N, k]
    sims: np.ndarray  # float32 [N, k]

    def edges(self, min_similarity: float) -> KnnEdges:
        """Edges with similarity strictly above min_similarity, as a sparse edge list."""
        keep = (self.ids >= 0) & (self.sims > min_similarity)
        rows = np.broadcast_to(np.arange(self.ids.shape[0], dtype=np.int64)[:, None], self.ids.shape)
        return KnnEdges(self.ids.shape[0], rows[keep], self.ids[keep], self.sims[keep].astype(np.float32))


def knn_graph(index: faiss.Index, x: np.ndarray, k: int, batch_size: int = 65_536) -> KnnGraph:
    """k nearest neighbours (excluding itself) of every row of x, the pool held by `index`."""
    x = as_embeddings(x, "x")
    if x.shape[0] != index.ntotal:
        raise ValueError(f"x has {x.shape[0]} rows but the index holds {index.ntotal}: pass the indexed pool")
    if k <= 0 or batch_size <= 0:
        raise ValueError(f"k and batch_size must be positive, got {k} and {batch_size}")
    if index_kind(index) == "ivf":
        return _ivf_self_join(index, x, k)
    return _flat_self_search(index, x, k, batch_size)


def knn_edges(
    index: faiss.Index,
    x: np.ndarray,
    k: int,
    min_similarity: float,
    batch_size: int = 65_536,
) -> KnnEdges:
    """Edges of the k-NN graph of x above min_similarity (DINOv2's graph: k=64, cosine > 0.6)."""
    return knn_graph(index, x, k, batch_size).edges(min_similarity)


def graph_recall(x: np.ndarray, graph: KnnGraph, n_queries: int, seed: int) -> float:
    """Recall@k of the graph rows against exact search, on sampled rows (ties count as hits)."""
    x = as_embeddings(x, "x")
    n = graph.ids.shape[0]
    if x.shape[0] != n:
        raise ValueError(f"x has {x.shape[0]} rows, the graph {n}")
    k = min(graph.ids.shape[1], n - 1)
    if k <= 0:
        return 1.0
    rows = np.random.default_rng(seed).choice(n, size=min(n_queries, n), replace=False)
    exact_sim, exact_ids = faiss.knn(x[rows], x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    exact_sim = np.where(exact_ids == rows[:, None], -np.inf, exact_sim)  # drop the self match
    kth = np.sort(exact_sim, axis=1)[:, 1:2] - 1e-5  # k-th best of the others
    hits = (graph.ids[rows, :k] >= 0) & (graph.sims[rows, :k] >= kth)
    return float(hits.sum() / (rows.size * k))


def _flat_self_search(index: faiss.Index, x: np.ndarray, k: int, batch_size: int) -> KnnGraph:
    n = x.shape[0]
    k_eff = min(k, n - 1)
    ids = np.full((n, k), -1, dtype=np.int64)
    sims = np.full((n, k), -np.inf, dtype=np.float32)
    if k_eff == 0:
        return KnnGraph(ids, sims)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        sim, found = search(index, x[start:stop], k_eff + 1)
        rows = np.arange(start, stop)[:, None]
        # Drop the self match (or, among exact copies, the last slot) to keep k others.
        is_self = found == rows
        drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k_eff)
        keep = np.ones(found.shape, dtype=bool)
        keep[np.arange(found.shape[0]), drop] = False
        ids[start:stop, :k_eff] = found[keep].reshape(-1, k_eff)
        sims[start:stop, :k_eff] = sim[keep].reshape(-1, k_eff)
    return KnnGraph(ids, sims)


def _ivf_self_join(index: faiss.Index, x: np.ndarray, k: int) -> KnnGraph:
    ivf = faiss.extract_index_ivf(index)
    nlist, nprobe = ivf.nlist, min(ivf.nprobe, ivf.nlist)
    owner = _list_of_each_vector(ivf)
    order = np.argsort(owner, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(owner, minlength=nlist))]
    centroids = ivf.quantizer.reconstruct_n(0, nlist)
    _, probes = faiss.knn(centroids, centroids, nprobe, metric=faiss.METRIC_INNER_PRODUCT)
    ids = np.full((x.shape[0], k), -1, dtype=np.int64)
    sims = np.full((x.shape[0], k), -np.inf, dtype=np.float32)
    for lst in range(nlist):
        members = order[bounds[lst]:bounds[lst + 1]]
        if members.size == 0:
            continue
        # The list itself goes first, so member j sits at candidate position j.
        others = [p for p in probes[lst] if p != lst and p >= 0]
        candidates = np.concatenate([members] + [order[bounds[p]:bounds[p + 1]] for p in others])
        _top_k_block(x, members, candidates, k, ids, sims)
    return KnnGraph(ids, sims)


def _top_k_block(
    x: np.ndarray,
    members: np.ndarray,
    candidates: np.ndarray,
    k: int,
    ids: np.ndarray,
    sims: np.ndarray,
) -> None:
    """Fill ids/sims rows of `members` with their top-k among `candidates` (members first)."""
    cand_x = x[candidates]
    k_eff = min(k, candidates.size - 1)
    if k_eff <= 0:
        return
    step = max(1, _BLOCK_ELEMENTS // candidates.size)
    for start in range(0, members.size, step):
        rows = members[start:start + step]
        block = x[rows] @ cand_x.T
        block[np.arange(rows.size), start + np.arange(rows.size)] = -np.inf  # self
        top = np.argpartition(block, -k_eff, axis=1)[:, -k_eff:]
        top_sim = np.take_along_axis(block, top, axis=1)
        rank = np.argsort(-top_sim, axis=1)
        ids[rows, :k_eff] = candidates[np.take_along_axis(top, rank, axis=1)]
        sims[rows, :k_eff] = np.take_along_axis(top_sim, rank, axis=1)


def _list_of_each_vector(ivf: faiss.IndexIVF) -> np.ndarray:
    """Inverted list holding each indexed vector (ids are row positions: no IDMap is used)."""
    owner = np.full(ivf.ntotal, -1, dtype=np.int64)
    for lst in range(ivf.nlist):
        size = ivf.invlists.list_size(lst)
        if size:
            owner[faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), size)] = lst
    if (owner < 0).any():
        raise ValueError("IVF index ids are not the row positions 0..N-1 of the pool; build it with build_index")
    return owner
