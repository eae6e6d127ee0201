"""Copy dedup of the pool and decontamination against evaluation sets (DINOv2 App. A.3).

Both reduce to connected components of a thresholded k-NN graph: self-dedup keeps one image per
component, decontamination drops every component that touches an evaluation image.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from .index import search
from .knn_graph import KnnEdges


@dataclass
class DedupResult:
    keep: np.ndarray  # bool [N]: the one representative of each component
    component: np.ndarray  # int64 [N]: component id, numbered by smallest member
    n_removed: int

    def duplicate_of(self) -> np.ndarray:
        """int64 [N]: for every removed image the kept copy of its component, -1 for kept images."""
        representative = np.full(int(self.component.max()) + 1, -1, dtype=np.int64)
        representative[self.component[self.keep]] = np.flatnonzero(self.keep)
        out = np.full(self.keep.size, -1, dtype=np.int64)
        out[~self.keep] = representative[self.component[~self.keep]]
        return out


@dataclass
class DecontaminationResult:
    removed: np.ndarray  # bool [N]: pool images to drop
    direct: np.ndarray  # bool [N]: pool images within the threshold of an evaluation image


def connected_components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Component id per node, numbered 0.. in order of each component's smallest member (scipy's compiled
    traversal; the numbering does not depend on edge order, so runs are reproducible)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as scipy_components

    src, dst = _check_edges(n, src, dst)
    graph = coo_matrix((np.ones(src.size, dtype=np.int32), (src, dst)), shape=(n, n)).tocsr()
    _, labels = scipy_components(graph, directed=True, connection="weak")
    smallest = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(smallest, labels, np.arange(n, dtype=np.int64))
    return np.unique(smallest[labels], return_inverse=True)[1].astype(np.int64)


def self_dedup(edges: KnnEdges, threshold: float, quality: np.ndarray | None = None) -> DedupResult:
    """Join copies (edges with cosine > threshold) and keep one image per component.

    The kept image is the highest-`quality` one when scores are given (ties and the no-score case
    go to the smallest index), so the choice never depends on search order or threads.
    """
    n = edges.n_nodes
    strong = edges.above(threshold)
    component = connected_components(n, strong.src, strong.dst)
    if quality is None:
        first = np.unique(component, return_index=True)[1]
    else:
        quality = np.asarray(quality, dtype=np.float64)
        if quality.shape != (n,) or not np.isfinite(quality).all():
            raise ValueError(f"quality must be {n} finite scores, got shape {quality.shape}")
        order = np.lexsort((np.arange(n), -quality, component))
        sorted_comp = component[order]
        is_first = np.ones(n, dtype=bool)
        is_first[1:] = sorted_comp[1:] != sorted_comp[:-1]
        first = order[is_first]
    keep = np.zeros(n, dtype=bool)
    keep[first] = True
    return DedupResult(keep=keep, component=component, n_removed=int(n - keep.sum()))


def decontaminate(
    index: faiss.Index,
    eval_x: np.ndarray,
    k: int,
    threshold: float,
    pool_component: np.ndarray | None = None,
) -> DecontaminationResult:
    """Pool images to drop because they are near-duplicates of evaluation images.

    Pool images with cosine > threshold to an evaluation image are hit directly; with
    `pool_component` (components of the pool graph at the same threshold) every image sharing a
    component with a hit goes too, which also catches copies beyond the k searched neighbours.
    """
    n = index.ntotal
    sim, ids = search(index, eval_x, min(k, n))
    direct = np.zeros(n, dtype=bool)
    direct[ids[(ids >= 0) & (sim > threshold)]] = True
    if pool_component is None:
        return DecontaminationResult(removed=direct.copy(), direct=direct)
    pool_component = np.asarray(pool_component)
    if pool_component.shape != (n,):
        raise ValueError(f"pool_component must have one id per indexed image ({n}), got shape {pool_component.shape}")
    return DecontaminationResult(removed=spread_to_components(direct, pool_component), direct=direct)


def spread_to_components(direct: np.ndarray, component: np.ndarray | None) -> np.ndarray:
    """bool [N]: the directly hit images and, given components, every image sharing a component with one."""
    if component is None:
        return direct.copy()
    tainted = np.zeros(int(component.max()) + 1, dtype=bool)
    tainted[component[direct]] = True
    return tainted[component]


def _check_edges(n: int, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    src = np.asarray(src, dtype=np.int64).ravel()
    dst = np.asarray(dst, dtype=np.int64).ravel()
    if src.shape != dst.shape:
        raise ValueError(f"src and dst must have the same length, got {src.size} and {dst.size}")
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= n):
        raise ValueError(f"edge endpoints must lie in [0, {n}), got range [{min(src.min(), dst.min())}, "
                         f"{max(src.max(), dst.max())}]")
    return src, dst
