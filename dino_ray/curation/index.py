"""faiss index over the pool: exact below a size threshold, IVF above, and its measured recall.

Every search goes through `search` so that the allowed-subset filter (images already removed by
dedup or decontamination) is applied inside faiss rather than by over-fetching and filtering.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import faiss
import numpy as np

from .config import IndexConfig

_NORM_TOLERANCE = 1e-2


def as_embeddings(x: np.ndarray, name: str, unit_norm: bool = True) -> np.ndarray:
    """Validate a [N, D] embedding matrix and return it C-contiguous float32, as faiss needs.

    Cosine similarity is computed as an inner product, which is only right for unit vectors,
    so `unit_norm` checks that the caller normalised them.
    """
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] matrix, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name} must hold floats, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    if unit_norm:
        norms = np.linalg.norm(arr, axis=1)
        worst = float(np.abs(norms - 1.0).max())
        if worst > _NORM_TOLERANCE:
            raise ValueError(
                f"{name} must be L2-normalised rows (cosine = inner product); max |norm - 1| = {worst:.3g}"
            )
    return arr


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run numpy's BLAS on one thread for the duration of the block.

    Our many medium-sized matrix products either run in our own thread pool or are too skinny
    to split; numpy's pthreads OpenBLAS spins its workers, which on a shared node made a
    250 x 4000 x 384 product 24x slower than single-threaded (measured under load). Uses
    threadpoolctl when installed (it restores the previous setting); otherwise changes nothing.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def ivf_nlist(n: int, cfg: IndexConfig) -> int:
    """Number of IVF lists for n vectors: the configured value or round(4 * sqrt(n))."""
    nlist = cfg.nlist if cfg.nlist is not None else round(4 * math.sqrt(n))
    return max(1, min(nlist, n))


def build_index(x: np.ndarray, cfg: IndexConfig, seed: int = 0) -> faiss.Index:
    """Inner-product index over x: exact IndexFlatIP for small pools, IndexIVFFlat above."""
    x = as_embeddings(x, "x")
    n, d = x.shape
    if n < cfg.exact_threshold:
        index = faiss.IndexFlatIP(d)
        index.add(x)
        return index
    nlist = ivf_nlist(n, cfg)
    index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = int(seed) % (2**31 - 1)  # faiss stores a C int
    ivf.cp.niter = cfg.train_iters
    # Our training sample is already sized by train_points_per_list; silence faiss's size warning.
    ivf.cp.min_points_per_centroid = 1
    ivf.cp.max_points_per_centroid = cfg.train_points_per_list
    n_train = min(n, nlist * cfg.train_points_per_list)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=n_train, replace=False))
    index.train(x[rows])
    index.add(x)
    ivf.nprobe = min(cfg.nprobe, nlist)
    return index


def index_kind(index: faiss.Index) -> str:
    """"flat" for exact search, "ivf" for an inverted-file index."""
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        return "flat"
    return "ivf"


def search(
    index: faiss.Index,
    q: np.ndarray,
    k: int,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of q against the index; missing neighbours come back as id -1.

    `allowed` is a boolean mask over the indexed rows; excluded rows are never returned.
    """
    q = as_embeddings(q, "q")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if q.shape[1] != index.d:
        raise ValueError(f"query dimension {q.shape[1]} does not match index dimension {index.d}")
    if allowed is None:
        return index.search(q, k)
    allowed = np.asarray(allowed, dtype=bool)
    if allowed.shape != (index.ntotal,):
        raise ValueError(f"allowed mask has shape {allowed.shape}, index holds {index.ntotal} rows")
    bitmap = np.packbits(allowed, bitorder="little")
    selector = faiss.IDSelectorBitmap(index.ntotal, faiss.swig_ptr(bitmap))
    if index_kind(index) == "ivf":
        params = faiss.SearchParametersIVF(sel=selector, nprobe=faiss.extract_index_ivf(index).nprobe)
    else:
        params = faiss.SearchParameters(sel=selector)
    distances, ids = index.search(q, k, params=params)
    del bitmap  # the selector points into it: keep it alive until the search has returned
    return distances, ids


def measure_recall(x: np.ndarray, index: faiss.Index, k: int, n_queries: int, seed: int) -> float:
    """Recall@k of the index against exact search, on queries sampled from x.

    A returned neighbour counts as correct when its similarity reaches the exact k-th one, so
    that ties between identical vectors do not count as misses. An exact index has recall 1 by
    construction, so it is not measured.
    """
    if index_kind(index) == "flat":
        return 1.0
    x = as_embeddings(x, "x")
    if x.shape[0] != index.ntotal:
        raise ValueError(f"x has {x.shape[0]} rows but the index holds {index.ntotal}")
    k = min(k, x.shape[0])
    n_queries = min(n_queries, x.shape[0])
    rows = np.random.default_rng(seed).choice(x.shape[0], size=n_queries, replace=False)
    queries = x[rows]
    approx_sim, approx_ids = index.search(queries, k)
    exact_sim, _ = faiss.knn(queries, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    kth = exact_sim[:, -1:] - 1e-5
    hits = (approx_ids >= 0) & (approx_sim >= kth)
    return float(hits.sum() / (n_queries * k))
