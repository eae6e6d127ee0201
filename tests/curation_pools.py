"""Small synthetic embedding pools with planted copies, and both curation paths run on them: shared by the
distributed-curation tests in tests/core (tasks in a loop) and tests/stages (the same tasks on Ray)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from dino_ray.curation.config import (ClusteringConfig, CurationConfig, ExecutionConfig, RetrievalConfig,
                                      SamplingConfig)
from dino_ray.curation.distributed_plan import count_rows, curate_shards
from dino_ray.curation.plan import curate_arrays
from dino_ray.curation.shard_ops import read_decisions
from dino_ray.curation.shards import open_shards, write_shards

DIM = 64


class LoopRunner:
    """The `Runner` protocol in one process: what the Ray runner does, minus the parallelism."""

    def __init__(self) -> None:
        self.calls = 0

    def put(self, value: Any) -> Any:
        return value

    def map(self, fn: Callable, args: Sequence[tuple], kept: int = 0) -> list:
        self.calls += len(args)
        return [fn(*a) for a in args]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def pool_with_copies(seed: int, n: int = 1500) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Skewed clusters, near-copies of 60 pool images, copies of 3 eval images; (pool, eval, seeds, copy rows)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((12, DIM)))
    sizes = np.maximum((n * np.r_[0.3, 0.2, 0.1, 0.1, [0.3 / 8] * 8]).astype(int), 5)
    labels = np.repeat(np.arange(12), sizes)
    base = unit(centres[labels] + 0.15 * rng.standard_normal((labels.size, DIM)))
    eval_x = unit(rng.standard_normal((10, DIM)))
    originals = rng.choice(base.shape[0], 60, replace=False)
    copies = unit(base[originals] + 0.01 * rng.standard_normal((60, DIM)))
    pool = np.concatenate([base, copies, unit(eval_x[:3] + 0.02 * rng.standard_normal((3, DIM)))])
    seeds = unit(base[rng.choice(base.shape[0], 8)] + 0.05 * rng.standard_normal((8, DIM)))
    return pool, eval_x, seeds, np.arange(base.shape[0], base.shape[0] + 60)


def config(**overrides) -> CurationConfig:
    parts = dict(
        clustering=ClusteringConfig(n_clusters=(24, 6, 2), n_resampling_steps=(2, 3, 1), sample_size=(4, 2, 2),
                                    n_iter=8, max_points_per_centroid=40, init_sample_size=300),
        sampling=SamplingConfig(target_fraction=0.3),
        retrieval=RetrievalConfig(mode="both", n_per_seed=3, per_cluster=20, min_seed_in_cluster=2),
        execution=ExecutionConfig(mode="distributed", shard_rows=400),
    )
    parts.update(overrides)
    return CurationConfig(**parts)


def both_paths(pool, cfg, tmp_path, runner, **kw):
    local = curate_arrays(pool, cfg, seed=5, **kw)
    store = write_shards(str(tmp_path / "shards"), pool, cfg.execution.shard_rows)
    store, _ = count_rows(open_shards([f for s in store.shards for f in s.files], cfg.execution.shard_rows), runner)
    dist = curate_shards(store, cfg, str(tmp_path / "out"), seed=5, runner=runner, **kw)
    return local, dist, read_decisions(dist.decisions)
