"""The curation plan over embedding shards with Ray tasks: `curate_arrays` for pools too big for one process.

Same steps, seeds and decisions as `plan.curate_arrays`, but the driver never holds the embeddings:
dedup and decontamination edges come from bucket joins (`distributed_knn`), k-means from per-shard
Lloyd rounds (`distributed_kmeans`), sampling and retrieval pick per shard from quotas the driver
computes from cluster counts. The driver keeps centroids, edges, quotas and a few O(N) integer or bool
arrays (the clean mask, who duplicates whom: 24 MB at 3M images); per-image outputs (cluster ids,
drop reasons) are written next to the shards. The only module of the package that starts Ray tasks
for curation; Ray is imported inside `RayRunner`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import CurationConfig
from .dedup import connected_components, self_dedup, spread_to_components
from .distributed_kmeans import Runner, ShardPoints
from .distributed_knn import join_bucket, merge_top_k, route_shard, search_bucket, top_k_hits
from .kmeans import cluster_tree, fit_centroids, kmeans
from .knn_graph import KnnEdges
from .plan import REASONS, _check_dim, _check_eval_sets, _graph_threshold, _merge, _retrieval_modes, _timed
from .index import as_embeddings
from .retrieval import cluster_quota
from .sampling import path_quotas, take_per_group
from .shard_ops import DROPPED, pick_shard, write_decisions
from .shards import ShardStore, count_valid


@dataclass
class ShardedCurationResult:
    keep: np.ndarray  # int64 [K], sorted pool indices to keep
    reason: np.ndarray  # str [K]
    decisions: list[str]  # per shard: parquet of pool_index, dropped, duplicate_of, reason, cluster_l*
    representatives: np.ndarray  # int64, sorted: the kept copy of every duplicate group
    summary: dict = field(default_factory=dict)


class RayRunner:
    """`Runner` on Ray tasks, at most `workers` in flight, each with one CPU and one faiss thread."""

    def __init__(self, workers: int):
        self.workers = workers

    def put(self, value: Any) -> Any:
        import ray

        return ray.put(value)

    def map(self, fn: Callable, args: Sequence[tuple], kept: int = 0) -> list:
        import ray

        task = ray.remote(num_cpus=1)(_run_task).options(num_returns=1 + kept)
        results: list[Any] = [None] * len(args)
        waiting: dict[Any, int] = {}
        for i, a in enumerate(list(args) + [None] * self.workers):
            while waiting and (len(waiting) >= self.workers or a is None):
                done, _ = ray.wait(list(waiting), num_returns=1)
                j = waiting.pop(done[0])
                results[j] = (ray.get(results[j][0]), *results[j][1:]) if kept else ray.get(results[j])
            if a is None:
                continue
            refs = task.remote(fn, *a)
            results[i] = refs
            waiting[refs[0] if kept else refs] = i
        return results


def _run_task(fn: Callable, *args: Any) -> Any:
    import faiss

    faiss.omp_set_num_threads(1)
    return fn(*args)


def count_rows(store: ShardStore, runner: Runner) -> tuple[ShardStore, np.ndarray]:
    """The store with valid-row counts filled in, and the mean raw embedding (for centering)."""
    found = runner.map(count_valid, [(s,) for s in store.shards])
    total = sum(n for n, _ in found)
    if total == 0:
        raise ValueError("no valid embeddings in the shards")
    return store.with_valid_counts([n for n, _ in found]), (sum(s for _, s in found) / total).astype(np.float32)


def curate_shards(store: ShardStore, cfg: CurationConfig, out_uri: str, eval_sets: dict[str, np.ndarray] | None = None,
                  seed_set: np.ndarray | None = None, seed: int = 0, runner: Runner | None = None
                  ) -> ShardedCurationResult:
    """`plan.curate_arrays` over a counted `ShardStore`; per-shard decisions are written under out_uri."""
    runner = runner or RayRunner(cfg.execution.workers)
    n, dim = store.n, store.dim
    eval_sets = _check_eval_sets(eval_sets or {}, dim)
    if seed_set is not None:
        seed_set = _check_dim(as_embeddings(seed_set, "seed_set"), dim, "seed_set")
    seeds = [int(s) >> 1 for s in np.random.SeedSequence(seed).generate_state(4)]
    summary: dict = {"pool_size": n, "timings_s": {}, "shards": len(store.shards)}
    modes = _retrieval_modes(cfg, seed_set)
    decontaminating = cfg.decontamination.enabled and bool(eval_sets)
    clean = np.ones(n, dtype=bool)
    dropped = np.zeros(n, dtype=np.int8)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    buckets: list[list[Any]] = []
    exact = n < cfg.index.exact_threshold
    if cfg.dedup.enabled or decontaminating or "sample" in modes:
        with _timed(summary, "knn_graph"):
            buckets = _route(store, runner, cfg, seeds[0], summary)
            joins = _join(buckets, runner, cfg, exact, eval_sets if decontaminating else {}, seeds[0], summary)
        _clean(joins, n, cfg, eval_sets if decontaminating else {}, clean, dropped, duplicate_of, summary)
        if "sample" not in modes:
            buckets = []  # release the routed rows (2 x the pool) from the object store
    summary["n_clean"] = int(clean.sum())

    n_levels = len(cfg.clustering.n_clusters) if cfg.clustering.enabled else 0
    points, tree, paths = None, None, np.zeros((0, n_levels), dtype=np.int64)
    if cfg.clustering.enabled:
        if not clean.any():
            raise ValueError(f"dedup and decontamination removed all {n} pool images: nothing to cluster")
        with _timed(summary, "clustering"):
            points = ShardPoints(store, clean, runner)
            tree = cluster_tree(points, cfg.clustering, seeds[1])
            paths = tree.path_of_finest()
        summary["kmeans_objective"] = points.inertia
    picked: list[tuple[str, np.ndarray]] = []
    if cfg.pool_selection == "balanced":
        with _timed(summary, "sampling"):
            picked.append(("balanced_sample", _balanced(points, paths, store, runner, cfg, seeds[2], summary)))
    elif cfg.pool_selection == "all":
        picked.append(("all", np.flatnonzero(clean)))
    if "sample" in modes:
        with _timed(summary, "retrieval_sample"):
            found = _search(buckets, runner, cfg, exact, runner.put(clean), seed_set, seeds[0])
        picked.append(("retrieved_sample", np.unique(found)))
        summary["retrieval_sample_collisions"] = int(found.size - np.unique(found).size)
    if "cluster" in modes:
        with _timed(summary, "retrieval_cluster"):
            chosen, hit = _cluster_retrieval(points, tree, store, clean, runner, cfg, seed_set, seeds[3])
        picked.append(("retrieved_cluster", chosen))
        summary["retrieval_clusters_hit"] = int(hit.size)
    del buckets
    keep, reason = _merge(n, picked)
    summary["n_selected_by_step"] = {name: int(idx.size) for name, idx in picked}
    summary["n_kept_by_reason"] = {name: int((reason == name).sum()) for name in REASONS}
    summary["n_kept"] = int(keep.size)
    with _timed(summary, "write"):
        decisions = _write(store, runner, out_uri, points, paths, keep, reason, dropped, duplicate_of)
    return ShardedCurationResult(keep=keep, reason=reason, decisions=decisions, summary=summary,
                                 representatives=np.unique(duplicate_of[duplicate_of >= 0]))


def _route(store: ShardStore, runner: Runner, cfg: CurationConfig, seed: int, summary: dict) -> list[list[Any]]:
    """Bucket pieces [bucket][shard]: every row goes to its two nearest coarse cells (one cell: all rows)."""
    n_buckets = max(1, math.ceil(2 * store.n / cfg.execution.shard_rows)) if store.n > cfg.execution.shard_rows else 1
    if n_buckets == 1:
        cells = np.ones((1, store.dim), dtype=np.float32)
    else:
        every = ShardPoints(store, np.ones(store.n, dtype=bool), runner)
        rows = np.sort(np.random.default_rng(seed).choice(store.n, size=min(store.n, 256 * n_buckets), replace=False))
        cells = kmeans(every.take(rows), n_buckets, n_iter=10, seed=seed, spherical=True).centroids
    routed = runner.map(route_shard, [(s, store.center, cells) for s in store.shards], kept=n_buckets)
    sizes = sum(r[0] for r in routed)
    summary.update(buckets=n_buckets, bucket_rows_max=int(sizes.max()), bucket_rows_mean=round(float(sizes.mean()), 1))
    return [[r[1 + b] for r in routed] for b in range(n_buckets)]


def _join(buckets: list[list[Any]], runner: Runner, cfg: CurationConfig, exact: bool, eval_sets: dict,
          seed: int, summary: dict) -> list[dict]:
    propagating = bool(eval_sets) and cfg.decontamination.propagate
    graph_k = cfg.dedup.k if (cfg.dedup.enabled or propagating) else 0
    threshold = _graph_threshold(cfg, propagating) if graph_k else 1.0
    d = cfg.decontamination
    evals = {name: (x, d.k, d.threshold) for name, x in eval_sets.items()}
    args = [(cfg.index, exact, graph_k, threshold, seed, evals, *pieces) for pieces in buckets]
    joins = runner.map(join_bucket, args)
    sizes = np.array([j["n"] for j in joins], dtype=np.float64)
    summary["index_type"] = "flat" if exact else "ivf"
    for key in ("index_recall", "graph_recall"):
        summary[key] = 1.0 if exact else round(float(sum(j.get(key, 1.0) * w for j, w in zip(joins, sizes))
                                                     / max(sizes.sum(), 1.0)), 4)
    return joins


def _clean(joins: list[dict], n: int, cfg: CurationConfig, eval_sets: dict, clean: np.ndarray, dropped: np.ndarray,
           duplicate_of: np.ndarray, summary: dict) -> None:
    """`plan._clean_pool` on the bucket joins' edges and hits; fills the mask and drop records in place."""
    pairs = np.stack([np.concatenate([j["src"] for j in joins]), np.concatenate([j["dst"] for j in joins])], axis=1)
    sims = np.concatenate([j["sim"] for j in joins])
    pairs, first = np.unique(pairs, axis=0, return_index=True) if pairs.size else (pairs, np.zeros(0, dtype=np.int64))
    edges = KnnEdges(n, pairs[:, 0].copy(), pairs[:, 1].copy(), sims[first])
    summary["n_graph_edges"] = int(edges.src.size)
    if cfg.dedup.enabled:
        with _timed(summary, "dedup"):
            dedup = self_dedup(edges, cfg.dedup.threshold)
        duplicate_of[:] = dedup.duplicate_of()
        dropped[~dedup.keep] = DROPPED.index("duplicate")
        clean &= dedup.keep
    summary["n_duplicates_removed"] = int(n - clean.sum())
    summary["n_decontaminated"] = 0
    if not eval_sets:
        return
    d = cfg.decontamination
    component = None
    if d.propagate:
        weak = edges.above(d.threshold)
        component = connected_components(n, weak.src, weak.dst)
    removed = np.zeros(n, dtype=bool)
    direct_hits = {}
    for name in eval_sets:
        direct = np.zeros(n, dtype=bool)
        direct[top_k_hits([j["hits"][name] for j in joins], d.k)] = True
        direct_hits[name] = int(direct.sum())
        removed |= spread_to_components(direct, component)
    summary["decontamination_direct_hits"] = direct_hits
    summary["n_decontaminated"] = int((clean & removed).sum())
    dropped[clean & removed] = DROPPED.index("eval_copy")
    clean &= ~removed


def _balanced(points: ShardPoints, paths: np.ndarray, store: ShardStore, runner: Runner, cfg: CurationConfig,
              seed: int, summary: dict) -> np.ndarray:
    """`plan._balanced`: quotas per leaf from cluster counts (driver), then the pick per shard and a merge."""
    s = cfg.sampling
    target = min(s.target_size if s.target_size is not None else round(s.target_fraction * points.n), points.n)
    present = np.flatnonzero(points.counts > 0)
    levels = paths if s.strategy == "hierarchical" else paths[:, :1]
    order = np.lexsort(levels[present].T[::-1])  # np.unique(axis=0)'s order: by finest id, then upwards
    leaves = present[order]
    quota = np.zeros(paths.shape[0], dtype=np.int64)
    quota[leaves] = path_quotas(levels[leaves], points.counts[leaves], target, seed)
    key = "distance" if s.within_cluster == "closest" else "random"
    chosen, cluster = _pick(points, store, runner, quota, key, seed)
    before = np.bincount(paths[present, -1], weights=points.counts[present]).astype(np.int64)
    summary.update(sampling_target=int(target), cluster_counts_before=before.tolist(),
                   cluster_counts_after=np.bincount(paths[cluster, -1], minlength=before.size).tolist())
    return chosen


def _pick(points: ShardPoints, store: ShardStore, runner: Runner, quota: np.ndarray, key: str, seed: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """Global `take_per_group` by quota: each shard offers its own best quota[c] rows per cluster."""
    args = [(s, points.keep, h, quota, key, seed) for s, h in zip(store.shards, points.assigned)]
    offers = runner.map(pick_shard, args)
    rows = np.concatenate([o[0] for o in offers])
    cluster = np.concatenate([o[1] for o in offers])
    keys = np.concatenate([o[2] for o in offers])
    chosen = take_per_group(cluster, keys, quota)  # offers arrive in pool order: ties go to the smaller index
    return rows[chosen], cluster[chosen]


def _search(buckets: list[list[Any]], runner: Runner, cfg: CurationConfig, exact: bool, allowed: Any,
            queries: np.ndarray, seed: int) -> np.ndarray:
    """Sample-based retrieval: every seed's n_per_seed nearest allowed pool rows over all buckets."""
    k = cfg.retrieval.n_per_seed
    found = runner.map(search_bucket, [(cfg.index, exact, allowed, queries, k, seed, *p) for p in buckets])
    _, ids = merge_top_k([f[0] for f in found], [f[1] for f in found], k)
    return ids[ids >= 0]


def _cluster_retrieval(points: ShardPoints | None, tree: Any, store: ShardStore, clean: np.ndarray, runner: Runner,
                       cfg: CurationConfig, seed_set: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    r, c = cfg.retrieval, cfg.clustering
    if r.n_clusters is None:
        if tree is None:
            raise ValueError(
                "cluster-based retrieval with RetrievalConfig.n_clusters=None reuses the pool clustering, "
                "but clustering.enabled is False: enable clustering or set retrieval.n_clusters")
        centroids = tree.centroids[0]
    else:
        points = ShardPoints(store, clean, runner)
        centroids, _ = fit_centroids(points, r.n_clusters, c.n_iter, seed, c.spherical, c.max_points_per_centroid,
                                     c.init, c.init_sample_size)
        points.assign_all(centroids, c.spherical, 0)
    take, hit = cluster_quota(points.counts, centroids, seed_set, r.per_cluster, r.min_seed_in_cluster, r.max_total,
                              seed, c.spherical)
    chosen, _ = _pick(points, store, runner, take, "random", seed)
    return chosen, hit


def _write(store: ShardStore, runner: Runner, out_uri: str, points: ShardPoints | None, paths: np.ndarray,
           keep: np.ndarray, reason: np.ndarray, dropped: np.ndarray, duplicate_of: np.ndarray) -> list[str]:
    code = np.full(store.n, -1, dtype=np.int8)
    code[keep] = [REASONS.index(r) for r in reason]
    args = []
    for i, s in enumerate(store.shards):
        part = slice(s.first, s.first + s.n_valid)
        assigned = points.assigned[i] if points is not None else None
        mask = points.keep if points is not None else None
        args.append((s, f"{out_uri.rstrip('/')}/decisions-{i:05d}.parquet", mask, assigned, paths, code[part],
                     dropped[part], duplicate_of[part]))
    return runner.map(write_decisions, args)
