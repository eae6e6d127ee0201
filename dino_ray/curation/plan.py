"""The curation plan on in-memory arrays: index, dedup, decontaminate, cluster, sample, retrieve.

This is the whole decision logic of the curate stage; the Ray stage only embeds images, calls
`curate_arrays` and writes the kept rows. Each step reads only what the previous steps left
(removed images are never clustered, sampled or retrieved).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import faiss
import numpy as np

from .config import CurationConfig
from .dedup import connected_components, decontaminate, self_dedup
from .index import as_embeddings, build_index, index_kind, ivf_nlist, measure_recall
from .kmeans import HierarchicalKMeansResult, hierarchical_kmeans, kmeans_with_config
from .knn_graph import KnnEdges, graph_recall, knn_graph
from .retrieval import RetrievalResult, retrieve_by_cluster, retrieve_nearest
from .sampling import balanced_sample

# Why an image is kept. When several steps pick the same image, the earliest in this order wins.
REASONS = ("all", "balanced_sample", "retrieved_sample", "retrieved_cluster")


@dataclass
class CurationResult:
    keep: np.ndarray  # int64 [K], sorted pool indices to keep
    reason: np.ndarray  # str [K], one of REASONS per kept index
    cluster_ids: np.ndarray  # int64 [N, L], -1 where a pool image was not clustered
    # Why each pool image was dropped before clustering: "" (it was not), "duplicate", "eval_copy".
    # Users audit curation from this, so nothing disappears without a reason.
    dropped: np.ndarray  # str [N]
    duplicate_of: np.ndarray  # int64 [N]: the kept copy of a "duplicate", else -1
    summary: dict = field(default_factory=dict)  # sizes, removals, balance, index, recall, timings


def curate_arrays(
    pool: np.ndarray,
    cfg: CurationConfig,
    eval_sets: dict[str, np.ndarray] | None = None,
    seed_set: np.ndarray | None = None,
    seed: int = 0,
) -> CurationResult:
    """Run the enabled curation steps on L2-normalised pool embeddings; deterministic in `seed`."""
    pool = as_embeddings(pool, "pool")
    eval_sets = _check_eval_sets(eval_sets or {}, pool.shape[1])
    if seed_set is not None:
        seed_set = _check_dim(as_embeddings(seed_set, "seed_set"), pool.shape[1], "seed_set")
    seeds = [int(s) >> 1 for s in np.random.SeedSequence(seed).generate_state(4)]  # fit a C int
    summary: dict = {"pool_size": pool.shape[0], "timings_s": {}}
    modes = _retrieval_modes(cfg, seed_set)
    decontaminating = cfg.decontamination.enabled and bool(eval_sets)

    index = None
    if cfg.dedup.enabled or decontaminating or "sample" in modes:
        with _timed(summary, "index"):
            index = build_index(pool, cfg.index, seeds[0])
        with _timed(summary, "index_recall"):
            summary.update(_index_summary(pool, index, cfg, seeds[0]))
    clean, dropped, duplicate_of = _clean_pool(pool, index, eval_sets if decontaminating else {}, cfg, seeds[0],
                                               summary)
    clean_idx = np.flatnonzero(clean)
    summary["n_clean"] = int(clean_idx.size)
    tree, cluster_ids = _cluster(pool, clean_idx, cfg, seeds[1], summary)

    picked: list[tuple[str, np.ndarray]] = []
    if cfg.pool_selection == "balanced":
        with _timed(summary, "sampling"):
            picked.append(("balanced_sample", _balanced(tree, clean_idx, cfg, seeds[2], summary)))
    elif cfg.pool_selection == "all":
        picked.append(("all", clean_idx))
    if "sample" in modes:
        with _timed(summary, "retrieval_sample"):
            found = retrieve_nearest(index, seed_set, cfg.retrieval.n_per_seed, allowed=clean)
        picked.append(("retrieved_sample", found.indices))
        summary["retrieval_sample_collisions"] = found.n_collisions
    if "cluster" in modes:
        with _timed(summary, "retrieval_cluster"):
            found = _cluster_retrieval(pool, clean_idx, cluster_ids, tree, seed_set, cfg, seeds[3])
        picked.append(("retrieved_cluster", found.indices))
        summary["retrieval_clusters_hit"] = int(found.clusters_hit.size)

    keep, reason = _merge(pool.shape[0], picked)
    summary["n_selected_by_step"] = {name: int(idx.size) for name, idx in picked}
    summary["n_kept_by_reason"] = {name: int((reason == name).sum()) for name in REASONS}
    summary["n_kept"] = int(keep.size)
    return CurationResult(keep=keep, reason=reason, cluster_ids=cluster_ids, summary=summary, dropped=dropped,
                          duplicate_of=duplicate_of)


def _clean_pool(
    pool: np.ndarray,
    index: faiss.Index | None,
    eval_sets: dict[str, np.ndarray],
    cfg: CurationConfig,
    seed: int,
    summary: dict,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask of pool images that survive self-dedup and decontamination (one shared k-NN graph), with
    the drop reason of the others and, for duplicates, the copy that was kept."""
    n = pool.shape[0]
    clean = np.ones(n, dtype=bool)
    dropped = np.full(n, "", dtype=object)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    propagating = bool(eval_sets) and cfg.decontamination.propagate
    edges = None
    if cfg.dedup.enabled or propagating:
        with _timed(summary, "knn_graph"):
            graph = knn_graph(index, pool, cfg.dedup.k, cfg.index.search_batch_size)
        with _timed(summary, "graph_recall"):
            exact = summary["index_type"] == "flat"
            summary["graph_recall"] = 1.0 if exact else graph_recall(pool, graph, cfg.index.recall_queries, seed)
        edges = graph.edges(_graph_threshold(cfg, propagating))
        summary["n_graph_edges"] = int(edges.src.size)
    if cfg.dedup.enabled:
        with _timed(summary, "dedup"):
            dedup = self_dedup(edges, cfg.dedup.threshold)
        clean &= dedup.keep
        duplicate_of = dedup.duplicate_of()
        dropped[~dedup.keep] = "duplicate"
    summary["n_duplicates_removed"] = int(n - clean.sum())
    summary["n_decontaminated"] = 0
    if eval_sets:
        with _timed(summary, "decontamination"):
            removed = _decontaminate(index, eval_sets, edges, cfg, summary)
        summary["n_decontaminated"] = int((clean & removed).sum())
        dropped[clean & removed] = "eval_copy"
        clean &= ~removed
    return clean, dropped, duplicate_of


def _cluster(
    pool: np.ndarray,
    clean_idx: np.ndarray,
    cfg: CurationConfig,
    seed: int,
    summary: dict,
) -> tuple[HierarchicalKMeansResult | None, np.ndarray]:
    """Hierarchical k-means of the clean pool; cluster ids per pool image, -1 where not clustered."""
    n_levels = len(cfg.clustering.n_clusters) if cfg.clustering.enabled else 0
    cluster_ids = np.full((pool.shape[0], n_levels), -1, dtype=np.int64)
    if not cfg.clustering.enabled:
        return None, cluster_ids
    if clean_idx.size == 0:
        raise ValueError(f"dedup and decontamination removed all {pool.shape[0]} pool images: nothing to cluster")
    with _timed(summary, "clustering"):
        tree = hierarchical_kmeans(pool[clean_idx], cfg.clustering, seed)
    cluster_ids[clean_idx] = tree.assignments
    summary["kmeans_objective"] = float(tree.distance.astype(np.float64).sum())
    return tree, cluster_ids


def _retrieval_modes(cfg: CurationConfig, seed_set: np.ndarray | None) -> set[str]:
    """Which retrievals run: none without a seed set; DINOv2's size rule under mode "auto"."""
    r = cfg.retrieval
    if not r.enabled or seed_set is None:
        return set()
    if r.mode == "auto":
        return {"sample"} if seed_set.shape[0] >= r.auto_sample_min_seeds else {"cluster"}
    return {"sample", "cluster"} if r.mode == "both" else {r.mode}


def _graph_threshold(cfg: CurationConfig, propagating: bool) -> float:
    """Lowest similarity any graph consumer needs, so one k-NN search serves both."""
    thresholds = [cfg.dedup.threshold] if cfg.dedup.enabled else []
    if propagating:
        thresholds.append(cfg.decontamination.threshold)
    return min(thresholds)


def _index_summary(pool: np.ndarray, index: faiss.Index, cfg: CurationConfig, seed: int) -> dict:
    kind = index_kind(index)
    recall_k = cfg.dedup.k if cfg.dedup.enabled else cfg.decontamination.k
    info = {
        "index_type": kind,
        "index_recall": measure_recall(pool, index, recall_k, cfg.index.recall_queries, seed),
        "index_recall_k": int(min(recall_k, pool.shape[0])),
    }
    if kind == "ivf":
        info.update(index_nlist=ivf_nlist(pool.shape[0], cfg.index), index_nprobe=faiss.extract_index_ivf(index).nprobe)
    return info


def _decontaminate(
    index: faiss.Index,
    eval_sets: dict[str, np.ndarray],
    edges: KnnEdges | None,
    cfg: CurationConfig,
    summary: dict,
) -> np.ndarray:
    """Union over evaluation sets of the pool images to drop; per-set direct hits go to summary."""
    d = cfg.decontamination
    component = None
    if d.propagate:
        weak = edges.above(d.threshold)
        component = connected_components(edges.n_nodes, weak.src, weak.dst)
    removed = np.zeros(index.ntotal, dtype=bool)
    direct_hits = {}
    for name, eval_x in eval_sets.items():
        result = decontaminate(index, eval_x, d.k, d.threshold, component)
        removed |= result.removed
        direct_hits[name] = int(result.direct.sum())
    summary["decontamination_direct_hits"] = direct_hits
    return removed


def _balanced(
    tree: HierarchicalKMeansResult,
    clean_idx: np.ndarray,
    cfg: CurationConfig,
    seed: int,
    summary: dict,
) -> np.ndarray:
    """Balanced sample of the clean pool, as pool indices; top-level balance goes to summary."""
    s = cfg.sampling
    target = s.target_size if s.target_size is not None else round(s.target_fraction * clean_idx.size)
    target = min(target, clean_idx.size)
    priority = tree.distance if s.within_cluster == "closest" else None
    sample = balanced_sample(tree.assignments, target, s.strategy, seed, priority, row_ids=clean_idx)
    summary.update(
        sampling_target=int(target),
        cluster_counts_before=sample.counts_before[-1].tolist(),
        cluster_counts_after=sample.counts_after[-1].tolist(),
    )
    return clean_idx[sample.indices]


def _cluster_retrieval(
    pool: np.ndarray,
    clean_idx: np.ndarray,
    cluster_ids: np.ndarray,
    tree: HierarchicalKMeansResult | None,
    seed_set: np.ndarray,
    cfg: CurationConfig,
    seed: int,
) -> RetrievalResult:
    """Cluster-based retrieval on the finest pool clustering, or on its own flat k-means."""
    r, c = cfg.retrieval, cfg.clustering
    if r.n_clusters is None:
        if tree is None:
            raise ValueError(
                "cluster-based retrieval with RetrievalConfig.n_clusters=None reuses the pool clustering, "
                "but clustering.enabled is False: enable clustering or set retrieval.n_clusters"
            )
        assignment, centroids = cluster_ids[:, 0], tree.centroids[0]
    else:
        flat = kmeans_with_config(pool[clean_idx], r.n_clusters, c, seed)
        assignment = np.full(pool.shape[0], -1, dtype=np.int64)
        assignment[clean_idx] = flat.assignment
        centroids = flat.centroids
    return retrieve_by_cluster(assignment, centroids, seed_set, r.per_cluster, r.min_seed_in_cluster,
                               r.max_total, seed, c.spherical)


def _merge(n: int, picked: list[tuple[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Union of the picked index sets, each image labelled by the first step that picked it."""
    code = np.full(n, -1, dtype=np.int64)
    for name, idx in picked:
        fresh = idx[code[idx] < 0]
        code[fresh] = REASONS.index(name)
    keep = np.flatnonzero(code >= 0)
    return keep, np.asarray(REASONS)[code[keep]]


def _check_eval_sets(eval_sets: dict[str, np.ndarray], dim: int) -> dict[str, np.ndarray]:
    checked = {}
    for name, x in eval_sets.items():
        if not isinstance(name, str):
            raise ValueError(f"eval_sets keys must be dataset names (str), got {name!r}")
        checked[name] = _check_dim(as_embeddings(x, f"eval_sets[{name!r}]"), dim, f"eval_sets[{name!r}]")
    return checked


def _check_dim(x: np.ndarray, dim: int, name: str) -> np.ndarray:
    if x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]}, the pool has {dim}")
    return x


@contextmanager
def _timed(summary: dict, step: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    summary["timings_s"][step] = round(time.perf_counter() - start, 4)
