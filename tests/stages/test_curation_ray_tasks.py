"""Distributed curation's tasks as real Ray tasks (on the session's Ray instance) give the in-memory result."""

from __future__ import annotations

import numpy as np

from curation_pools import both_paths, config, pool_with_copies
from dino_ray.curation.config import RetrievalConfig


def test_ray_tasks_give_the_same_result(ray_session, tmp_path) -> None:
    from dino_ray.curation.distributed_plan import RayRunner

    pool, eval_x, _, _ = pool_with_copies(2, n=900)
    cfg = config(retrieval=RetrievalConfig(enabled=False))
    local, dist, decided = both_paths(pool, cfg, tmp_path, RayRunner(workers=2), eval_sets={"toy": eval_x})
    np.testing.assert_array_equal(dist.keep, local.keep)
    np.testing.assert_array_equal(decided["duplicate_of"], local.duplicate_of)
