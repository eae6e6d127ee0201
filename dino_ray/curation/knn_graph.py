"""Thresholded k-NN graph of the pool, kept as an edge list.

Only edges above the lowest threshold any later step needs are stored: a 1B x 64 dense graph
would not fit in memory, the thresholded one is sparse (DINOv2 drops ~15% of the pool as copies).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from .index import as_embeddings, search


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


def knn_edges(
    index: faiss.Index,
    x: np.ndarray,
    k: int,
    min_similarity: float,
    batch_size: int = 65_536,
) -> KnnEdges:
    """Search every row of x (the indexed pool) for its k neighbours; keep edges > min_similarity.

    Self matches are dropped; the query itself takes one of the k slots, as in DINOv2's graph.
    """
    x = as_embeddings(x, "x")
    if x.shape[0] != index.ntotal:
        raise ValueError(f"x has {x.shape[0]} rows but the index holds {index.ntotal}: search the indexed pool")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    k = min(k, index.ntotal)
    srcs, dsts, sims = [], [], []
    for start in range(0, x.shape[0], batch_size):
        stop = min(start + batch_size, x.shape[0])
        sim, ids = search(index, x[start:stop], k)
        rows = np.arange(start, stop, dtype=np.int64)[:, None]
        keep = (ids >= 0) & (ids != rows) & (sim > min_similarity)
        srcs.append(np.broadcast_to(rows, ids.shape)[keep])
        dsts.append(ids[keep].astype(np.int64))
        sims.append(sim[keep].astype(np.float32))
    return KnnEdges(x.shape[0], np.concatenate(srcs), np.concatenate(dsts), np.concatenate(sims))
