"""Distributed curation (shards + tasks) against the in-memory path on the same small synthetic pools.

The orchestrator's tasks run in a plain loop (`LoopRunner`), which is what a Ray task does with the same
arguments; tests/stages/test_curation_ray_tasks.py runs them as Ray tasks.
"""

from __future__ import annotations

import numpy as np
import pytest

from curation_pools import LoopRunner, both_paths, config, pool_with_copies
from dino_ray.curation.config import CurationConfig, ExecutionConfig, RetrievalConfig, SamplingConfig
from dino_ray.curation.distributed_knn import merge_top_k


def test_distributed_path_matches_in_memory_path(tmp_path) -> None:
    pool, eval_x, seeds, copy_rows = pool_with_copies(0)
    runner = LoopRunner()
    local, dist, decided = both_paths(pool, config(), tmp_path, runner, eval_sets={"toy": eval_x}, seed_set=seeds)
    assert dist.summary["shards"] == 4 and dist.summary["buckets"] == 8  # several shards and buckets exercised
    # Same duplicates (every planted copy, or its original, goes), same decontamination, same keep set.
    assert local.summary["n_duplicates_removed"] >= 60
    for key in ("n_duplicates_removed", "n_decontaminated", "decontamination_direct_hits", "n_clean",
                "cluster_counts_before", "cluster_counts_after", "n_kept_by_reason"):
        assert dist.summary[key] == local.summary[key], key
    np.testing.assert_array_equal(decided["pool_index"], np.arange(pool.shape[0]))
    np.testing.assert_array_equal(decided["dropped"].astype(str), local.dropped.astype(str))
    np.testing.assert_array_equal(decided["duplicate_of"], local.duplicate_of)
    np.testing.assert_array_equal(dist.keep, local.keep)
    np.testing.assert_array_equal(dist.reason, local.reason)
    ids = np.stack([decided[f"cluster_l{i}"] for i in range(3)], axis=1)
    np.testing.assert_array_equal(ids, local.cluster_ids)
    assert {"balanced_sample", "retrieved_sample", "retrieved_cluster"} <= set(local.reason)
    assert (local.dropped[copy_rows] == "duplicate").mean() > 0.5


def test_kmeans_objective_and_closest_sampling_match(tmp_path) -> None:
    pool, _, _, _ = pool_with_copies(1, n=2000)
    cfg = config(sampling=SamplingConfig(target_size=300, within_cluster="closest"), retrieval=RetrievalConfig(
        enabled=False))
    local, dist, _ = both_paths(pool, cfg, tmp_path, LoopRunner())
    from dino_ray.curation.kmeans import hierarchical_kmeans

    clean = np.flatnonzero(local.dropped == "")
    cluster_seed = int(np.random.SeedSequence(5).generate_state(4)[1]) >> 1  # curate_arrays' clustering seed
    tree = hierarchical_kmeans(pool[clean], cfg.clustering, seed=cluster_seed)
    local_objective = float(tree.distance.astype(np.float64).sum())
    assert dist.summary["kmeans_objective"] == pytest.approx(local_objective, rel=0.01)
    np.testing.assert_array_equal(dist.keep, local.keep)


def test_merge_top_k_drops_repeats_and_keeps_the_best() -> None:
    sims = [np.array([[0.9, 0.5]], np.float32), np.array([[0.9, 0.7]], np.float32)]
    ids = [np.array([[3, 1]]), np.array([[3, 2]])]
    s, i = merge_top_k(sims, ids, 3)
    np.testing.assert_array_equal(i, [[3, 2, 1]])
    np.testing.assert_allclose(s, [[0.9, 0.7, 0.5]])


def test_execution_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="ExecutionConfig.mode"):
        ExecutionConfig(mode="cluster")
    with pytest.raises(ValueError, match="ExecutionConfig.shard_rows"):
        ExecutionConfig(shard_rows=0)
    with pytest.raises(ValueError, match="ExecutionConfig.workers"):
        ExecutionConfig(workers=0)
    cfg = CurationConfig(execution=ExecutionConfig(distributed_above=1000))
    assert not cfg.distributed(999) and cfg.distributed(1000)
    assert not CurationConfig(execution=ExecutionConfig(mode="local")).distributed(10**9)
