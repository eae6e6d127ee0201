"""Curation core on synthetic embeddings with planted structure (numpy + faiss only)."""

from __future__ import annotations

from collections import deque

import faiss
import numpy as np
import pytest

from dino_ray.curation.config import (
    ClusteringConfig,
    CurationConfig,
    DecontaminationConfig,
    DedupConfig,
    IndexConfig,
    RetrievalConfig,
    SamplingConfig,
)
from dino_ray.curation.dedup import connected_components, decontaminate, self_dedup
from dino_ray.curation.index import build_index, index_kind, measure_recall
from dino_ray.curation.kmeans import hierarchical_kmeans, resampled_kmeans
from dino_ray.curation.knn_graph import graph_recall, knn_edges, knn_graph
from dino_ray.curation.plan import curate_arrays
from dino_ray.curation.retrieval import retrieve_by_cluster, retrieve_nearest
from dino_ray.curation.sampling import balanced_sample, water_fill

DIM = 128


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    return unit(rng.standard_normal((n, dim)))


def near_copies(rng: np.random.Generator, base: np.ndarray, sigma: float = 0.02) -> np.ndarray:
    """Perturbed copies with cosine ~ 1 / sqrt(1 + DIM sigma^2) to base (0.99 for 0.02)."""
    return unit(base + sigma * rng.standard_normal(base.shape))


def blobs(rng: np.random.Generator, sizes: list[int], spread: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    centres = random_unit(rng, len(sizes))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return near_copies(rng, centres[labels], spread), labels


def brute_force_components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Reference: breadth-first search, components numbered by smallest member."""
    adjacency = [[] for _ in range(n)]
    for u, v in zip(src.tolist(), dst.tolist()):
        adjacency[u].append(v)
        adjacency[v].append(u)
    label = np.full(n, -1, dtype=np.int64)
    next_label = 0
    for start in range(n):
        if label[start] >= 0:
            continue
        label[start] = next_label
        queue = deque([start])
        while queue:
            for v in adjacency[queue.popleft()]:
                if label[v] < 0:
                    label[v] = next_label
                    queue.append(v)
        next_label += 1
    return label


@pytest.mark.parametrize("n,n_edges", [(1, 0), (50, 0), (200, 60), (500, 400), (2000, 1900), (300, 3000)])
def test_components_match_brute_force(n: int, n_edges: int) -> None:
    rng = np.random.default_rng(n + n_edges)
    src, dst = rng.integers(0, n, n_edges), rng.integers(0, n, n_edges)
    expected = brute_force_components(n, src, dst)
    np.testing.assert_array_equal(connected_components(n, src, dst), expected)


def test_components_long_chain() -> None:
    n = 5000
    perm = np.random.default_rng(0).permutation(n)
    assert (connected_components(n, perm[:-1], perm[1:]) == 0).all()


def test_components_reject_out_of_range_edges() -> None:
    with pytest.raises(ValueError, match="edge endpoints"):
        connected_components(3, np.array([0]), np.array([3]))


def planted_duplicates(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """400 distinct points first, then 1-3 near-copies of each of the first 100."""
    originals = random_unit(rng, 400)
    owners = np.repeat(np.arange(100), rng.integers(1, 4, 100))
    pool = np.concatenate([originals, near_copies(rng, originals[owners])])
    return pool, np.r_[np.arange(400), owners]


def test_self_dedup_removes_planted_copies_keeps_distinct() -> None:
    pool, owner = planted_duplicates(np.random.default_rng(0))
    index = build_index(pool, IndexConfig())
    edges = knn_edges(index, pool, k=8, min_similarity=0.6)
    result = self_dedup(edges, threshold=0.6)
    expected_keep = np.arange(pool.shape[0]) < 400
    np.testing.assert_array_equal(result.keep, expected_keep)
    assert result.n_removed == pool.shape[0] - 400
    np.testing.assert_array_equal(result.component, owner)


def test_self_dedup_keeps_highest_quality() -> None:
    pool, owner = planted_duplicates(np.random.default_rng(1))
    quality = np.zeros(pool.shape[0])
    copies = np.flatnonzero(np.arange(pool.shape[0]) >= 400)
    quality[copies] = 1.0  # prefer a copy over its original
    edges = knn_edges(build_index(pool, IndexConfig()), pool, k=8, min_similarity=0.6)
    keep = self_dedup(edges, threshold=0.6, quality=quality).keep
    for group in range(100):
        members = np.flatnonzero(owner == group)
        assert keep[members].sum() == 1
        assert keep[members[members >= 400].min()]  # the smallest-index best-quality copy
    assert keep[100:400].all()


def test_decontamination_removes_only_planted_eval_copies() -> None:
    rng = np.random.default_rng(2)
    eval_x = random_unit(rng, 30)
    clean_pool = random_unit(rng, 500)
    # Eval image 0 gets six copies, more than the k=4 neighbours searched.
    owners = np.r_[np.zeros(6, dtype=int), np.arange(1, 10)]
    pool = np.concatenate([clean_pool, near_copies(rng, eval_x[owners], sigma=0.05)])
    planted = np.arange(pool.shape[0]) >= 500
    index = build_index(pool, IndexConfig())

    direct_only = decontaminate(index, eval_x, k=4, threshold=0.45)
    assert not direct_only.removed[:500].any()
    assert direct_only.removed.sum() == 4 + 9  # four of the six copies of eval image 0 are found

    edges = knn_edges(index, pool, k=16, min_similarity=0.45)
    component = connected_components(pool.shape[0], edges.src, edges.dst)
    propagated = decontaminate(index, eval_x, k=4, threshold=0.45, pool_component=component)
    np.testing.assert_array_equal(propagated.removed, planted)


def test_water_fill_exact_and_invariants() -> None:
    rng = np.random.default_rng(3)
    np.testing.assert_array_equal(water_fill(np.array([1000, 100, 10]), np.zeros(3, int), np.array([300]), rng),
                                  [190, 100, 10])
    for trial in range(50):
        sizes = rng.integers(1, 200, rng.integers(1, 40))
        groups = rng.integers(0, 5, sizes.size)
        totals = np.bincount(groups, weights=sizes, minlength=5).astype(int)
        budgets = rng.integers(0, totals + 20)
        alloc = water_fill(sizes, groups, budgets, rng)
        assert (alloc >= 0).all() and (alloc <= sizes).all()
        np.testing.assert_array_equal(np.bincount(groups, weights=alloc, minlength=5), np.minimum(budgets, totals))
        for g in range(5):
            capped = (groups == g) & (alloc < sizes)
            if capped.any():
                # Every capped cluster gets within one of the group's largest share.
                assert alloc[capped].min() >= alloc[groups == g].max() - 1


def test_flat_balanced_sample_flattens_skew() -> None:
    ids = np.repeat(np.arange(3), [1000, 100, 10])
    sample = balanced_sample(ids, 200, strategy="flat", seed=0)
    np.testing.assert_array_equal(sample.counts_before[0], [1000, 100, 10])
    np.testing.assert_array_equal(sample.counts_after[0], [95, 95, 10])
    assert np.unique(sample.indices).size == 200


def test_hierarchical_sample_balances_top_level_first() -> None:
    # Top cluster 0 holds leaves of 1000 and 10 points, top cluster 1 one leaf of 400.
    leaf = np.repeat([0, 1, 2], [1000, 10, 400])
    top = np.repeat([0, 0, 1], [1000, 10, 400])
    ids = np.stack([leaf, top], axis=1)
    hier = balanced_sample(ids, 300, strategy="hierarchical", seed=0)
    np.testing.assert_array_equal(hier.counts_after[1], [150, 150])
    np.testing.assert_array_equal(hier.counts_after[0], [140, 10, 150])
    flat = balanced_sample(ids, 300, strategy="flat", seed=0)
    np.testing.assert_array_equal(flat.counts_after[0], [145, 10, 145])


def test_balanced_sample_priority_and_determinism() -> None:
    ids = np.repeat(np.arange(2), [50, 50])
    priority = np.random.default_rng(4).random(100)
    chosen = balanced_sample(ids, 10, strategy="flat", priority=priority).indices
    expected = np.sort(np.r_[np.argsort(priority[:50])[:5], 50 + np.argsort(priority[50:])[:5]])
    np.testing.assert_array_equal(chosen, expected)
    a = balanced_sample(ids, 10, seed=7).indices
    np.testing.assert_array_equal(a, balanced_sample(ids, 10, seed=7).indices)
    with pytest.raises(ValueError, match="target_size"):
        balanced_sample(ids, 101)


def test_hierarchical_kmeans_tree_and_determinism() -> None:
    rng = np.random.default_rng(5)
    x, labels = blobs(rng, [300, 200, 100, 60, 40, 30, 20, 10], spread=0.01)
    cfg = ClusteringConfig(n_clusters=(8, 3), n_resampling_steps=(0, 3), sample_size=(1, 2), n_iter=20)
    tree = hierarchical_kmeans(x, cfg, seed=0)
    assert tree.assignments.shape == (x.shape[0], 2)
    assert [c.shape for c in tree.centroids] == [(8, DIM), (3, DIM)]
    # Well-separated blobs: each blob lands in a single finest cluster.
    for blob in range(8):
        assert np.unique(tree.assignments[labels == blob, 0]).size == 1
    # The levels form a tree: a finest cluster has one parent.
    for leaf in np.unique(tree.assignments[:, 0]):
        assert np.unique(tree.assignments[tree.assignments[:, 0] == leaf, 1]).size == 1
    again = hierarchical_kmeans(x, cfg, seed=0)
    np.testing.assert_array_equal(tree.assignments, again.assignments)
    np.testing.assert_array_equal(tree.centroids[1], again.centroids[1])
    with pytest.raises(ValueError, match="level 0 asks for 800 clusters but has only 760"):
        hierarchical_kmeans(x, ClusteringConfig(n_clusters=(800, 3), n_resampling_steps=(0, 0),
                                                sample_size=(1, 1)), seed=0)
    with pytest.raises(ValueError, match="must not grow"):
        ClusteringConfig(n_clusters=(8, 9), n_resampling_steps=(0, 0), sample_size=(1, 1))


def test_resampling_moves_centroids_out_of_dense_region() -> None:
    """Vo et al.'s claim on a 2-D toy: plain k-means spends many centroids on a dense blob."""
    rng = np.random.default_rng(12)
    x = np.concatenate([rng.normal(0.0, 0.05, (4000, 2)), rng.uniform(-1.0, 1.0, (400, 2))]).astype(np.float32)
    cfg = ClusteringConfig(n_clusters=(20,), n_resampling_steps=(0,), sample_size=(1,), n_iter=20, spherical=False)
    in_blob = []
    for steps in (0, 10):
        result = resampled_kmeans(x, 20, steps, 5, cfg, np.random.default_rng(0))
        in_blob.append(int((np.abs(result.centroids).max(axis=1) < 0.15).sum()))
    assert in_blob[0] >= 4 and in_blob[1] <= 2


def test_retrieve_nearest_returns_planted_neighbours() -> None:
    rng = np.random.default_rng(6)
    seeds = random_unit(rng, 20)
    planted = near_copies(rng, np.repeat(seeds, 4, axis=0), sigma=0.05)
    pool = np.concatenate([random_unit(rng, 1000), planted])
    index = build_index(pool, IndexConfig())
    found = retrieve_nearest(index, seeds, n_per_seed=4)
    np.testing.assert_array_equal(found.indices, np.arange(1000, 1080))
    assert found.n_collisions == 0
    allowed = np.ones(pool.shape[0], dtype=bool)
    allowed[1000:1004] = False  # seed 0's neighbours were removed earlier
    restricted = retrieve_nearest(index, seeds[:1], n_per_seed=4, allowed=allowed)
    assert restricted.indices.size == 4 and not np.isin(restricted.indices, np.arange(1000, 1004)).any()


def test_retrieve_by_cluster_takes_clusters_with_enough_seeds() -> None:
    rng = np.random.default_rng(7)
    pool, labels = blobs(rng, [200, 200, 200, 200])
    centroids = unit(np.stack([pool[labels == b].mean(0) for b in range(4)]))
    assignment = labels.copy()
    assignment[:10] = -1  # removed by dedup: never retrieved
    seeds = np.concatenate([near_copies(rng, centroids[[0] * 5]), near_copies(rng, centroids[[2] * 2])])
    found = retrieve_by_cluster(assignment, centroids, seeds, per_cluster=50, min_seed_in_cluster=4,
                                max_total=1000, seed=0)
    np.testing.assert_array_equal(found.clusters_hit, [0])
    assert found.indices.size == 50 and (labels[found.indices] == 0).all() and found.indices.min() >= 10
    capped = retrieve_by_cluster(assignment, centroids, seeds, per_cluster=50, min_seed_in_cluster=2,
                                 max_total=60, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[capped.indices], minlength=4), [30, 0, 30, 0])


def test_ivf_recall_measured_and_plausible() -> None:
    rng = np.random.default_rng(8)
    x, _ = blobs(rng, [100] * 60, spread=0.08)
    cfg = IndexConfig(exact_threshold=1000, nlist=60, nprobe=1)
    ivf = build_index(x, cfg)
    assert index_kind(ivf) == "ivf"
    low = measure_recall(x, ivf, k=10, n_queries=300, seed=0)
    faiss.extract_index_ivf(ivf).nprobe = 60  # exhaustive: must equal exact search
    full = measure_recall(x, ivf, k=10, n_queries=300, seed=0)
    assert 0.3 < low < full
    assert full == pytest.approx(1.0)
    flat = build_index(x, IndexConfig(exact_threshold=10_000))
    assert index_kind(flat) == "flat" and measure_recall(x, flat, 10, 100, 0) == 1.0


def test_ivf_self_join_matches_exact_graph_when_probing_all_lists() -> None:
    rng = np.random.default_rng(13)
    x, _ = blobs(rng, [150] * 20, spread=0.08)
    exact = knn_graph(build_index(x, IndexConfig(exact_threshold=10_000)), x, k=8)
    ivf = build_index(x, IndexConfig(exact_threshold=1000, nlist=20, nprobe=20))
    joined = knn_graph(ivf, x, k=8)
    np.testing.assert_allclose(joined.sims, exact.sims, atol=1e-5)
    assert (joined.ids != np.arange(x.shape[0])[:, None]).all()  # no self loops
    assert graph_recall(x, joined, 200, seed=0) == pytest.approx(1.0)
    # Structureless data: neighbours spread over many lists, so probing 2 of 20 misses most.
    noise = random_unit(rng, 3000)
    sparse = build_index(noise, IndexConfig(exact_threshold=1000, nlist=20, nprobe=2))
    partial = graph_recall(noise, knn_graph(sparse, noise, k=8), 200, seed=0)
    assert 0.02 < partial < 0.6


def plan_inputs(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Skewed blobs + copies of pool images + copies of eval images; returns pool, eval, seeds."""
    base, _ = blobs(rng, [600, 300, 100, 50, 30, 20], spread=0.2)
    eval_x = random_unit(rng, 10)
    pool = np.concatenate([base, near_copies(rng, base[:40]), near_copies(rng, eval_x[:3], sigma=0.05)])
    seeds = near_copies(rng, base[rng.choice(600, 8)], sigma=0.05)
    return pool, eval_x, seeds, base.shape[0]


def small_config(**overrides) -> CurationConfig:
    parts = dict(
        index=IndexConfig(exact_threshold=500, nlist=16, nprobe=16),
        clustering=ClusteringConfig(n_clusters=(12, 4), n_resampling_steps=(0, 2), sample_size=(1, 2), n_iter=10),
        sampling=SamplingConfig(target_size=200),
        retrieval=RetrievalConfig(mode="both", n_per_seed=4, per_cluster=30, min_seed_in_cluster=3),
    )
    parts.update(overrides)
    return CurationConfig(**parts)


def test_curate_arrays_end_to_end_and_deterministic() -> None:
    pool, eval_x, seeds, n_base = plan_inputs(np.random.default_rng(9))
    cfg = small_config()
    result = curate_arrays(pool, cfg, eval_sets={"toy_eval": eval_x}, seed_set=seeds, seed=3)
    s = result.summary
    assert s["pool_size"] == pool.shape[0]
    assert s["n_duplicates_removed"] == 40
    assert s["n_decontaminated"] == 3 and s["decontamination_direct_hits"] == {"toy_eval": 3}
    assert s["n_clean"] == n_base
    assert s["index_type"] == "ivf" and s["index_recall"] == pytest.approx(1.0)  # nprobe == nlist
    assert s["graph_recall"] == pytest.approx(1.0)
    removed = np.arange(pool.shape[0]) >= n_base
    assert (result.cluster_ids[removed] == -1).all() and (result.cluster_ids[~removed] >= 0).all()
    assert not np.isin(result.keep, np.flatnonzero(removed)).any()
    assert set(result.reason) <= {"balanced_sample", "retrieved_sample", "retrieved_cluster"}
    assert (result.reason == "balanced_sample").sum() == 200
    assert max(s["cluster_counts_after"]) - min(s["cluster_counts_after"]) <= max(
        1, max(s["cluster_counts_before"]) - min(s["cluster_counts_before"]))
    assert set(s["timings_s"]) >= {"index", "knn_graph", "dedup", "decontamination", "clustering", "sampling"}
    again = curate_arrays(pool, cfg, eval_sets={"toy_eval": eval_x}, seed_set=seeds, seed=3)
    np.testing.assert_array_equal(result.keep, again.keep)
    np.testing.assert_array_equal(result.reason, again.reason)
    np.testing.assert_array_equal(result.cluster_ids, again.cluster_ids)


def test_curate_arrays_with_steps_switched_off() -> None:
    pool, eval_x, seeds, _ = plan_inputs(np.random.default_rng(10))
    cfg = small_config(
        clustering=ClusteringConfig(enabled=False),
        sampling=SamplingConfig(enabled=False),
        decontamination=DecontaminationConfig(enabled=False),
        retrieval=RetrievalConfig(enabled=False),
        pool_selection="all",
    )
    result = curate_arrays(pool, cfg, eval_sets={"toy_eval": eval_x}, seed_set=seeds)
    assert result.cluster_ids.shape == (pool.shape[0], 0)
    assert result.summary["n_decontaminated"] == 0
    assert result.keep.size == pool.shape[0] - 40 and set(result.reason) == {"all"}
    retrieval_only = small_config(
        clustering=ClusteringConfig(enabled=False), sampling=SamplingConfig(enabled=False),
        retrieval=RetrievalConfig(mode="sample", n_per_seed=4), pool_selection="none",
    )
    retrieved = curate_arrays(pool, retrieval_only, seed_set=seeds)
    assert set(retrieved.reason) == {"retrieved_sample"} and 0 < retrieved.keep.size <= 32
    decontam_only = small_config(
        dedup=DedupConfig(enabled=False), clustering=ClusteringConfig(enabled=False),
        sampling=SamplingConfig(enabled=False), pool_selection="all",
    )
    decontaminated = curate_arrays(pool, decontam_only, eval_sets={"toy_eval": eval_x})
    assert decontaminated.summary["n_duplicates_removed"] == 0
    assert decontaminated.keep.size == pool.shape[0] - 3


def test_bad_inputs_raise_clear_errors() -> None:
    rng = np.random.default_rng(11)
    pool = random_unit(rng, 50)
    with pytest.raises(ValueError, match="L2-normalised"):
        build_index(pool * 2, IndexConfig())
    with pytest.raises(ValueError, match="dimension"):
        curate_arrays(pool, small_config(), eval_sets={"bad": random_unit(rng, 3, DIM + 1)})
    with pytest.raises(ValueError, match="n_resampling_steps"):
        ClusteringConfig(n_clusters=(10, 2), n_resampling_steps=(0,), sample_size=(1, 2))
    with pytest.raises(ValueError, match="pool_selection"):
        CurationConfig(sampling=SamplingConfig(enabled=False))
    with pytest.raises(ValueError, match="mode"):
        RetrievalConfig(mode="nearest")
