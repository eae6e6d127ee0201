"""The linear-probe sweep on Ray Tune: one trial per input layout, resumable after an interruption."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest

from dino_ray import feature_store
from dino_ray.config.schema import JobConfig
from dino_ray.evals.config import LinearGridConfig
from dino_ray.stages.eval import linear_sweep

pytestmark = pytest.mark.slow


def write_split(uri: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    centres = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    feats = {}
    for i in range(1, 5):
        feats[f"cls_{i}"] = centres[labels] + 0.3 * rng.normal(size=(n, 16)).astype(np.float32)
        feats[f"avgpool_{i}"] = rng.normal(size=(n, 16)).astype(np.float32)
    meta = {"id": [str(i) for i in range(n)], "uri": [f"img{i}" for i in range(n)], "label": labels.tolist(),
            "skip_reason": [""] * n}
    feature_store.write_features(uri, meta, feats)


def test_interrupted_sweep_resumes_and_selects_on_validation(ray_session, tmp_path):
    job = JobConfig()
    job.eval.linear = LinearGridConfig(learning_rates=(0.01, 0.1), epochs=2, batch_size=64)
    job.eval.linear_trial_cpus = 0.5
    ctx = types.SimpleNamespace(path=lambda *parts: os.path.join(str(tmp_path / "eval"), *parts))
    train, test = str(tmp_path / "train.parquet"), str(tmp_path / "test.parquet")
    layouts = [(1, False), (4, True)]

    # The features are not there yet: every trial fails, as when a sweep is cut short.
    with pytest.raises(RuntimeError, match="linear-probe trial failed"):
        linear_sweep("sweep", [train], [test], layouts, job, ctx)
    assert os.path.isdir(ctx.path("tune", "sweep"))

    write_split(train, 400, seed=1)
    write_split(test, 200, seed=2)
    result = linear_sweep("sweep", [train], [test], layouts, job, ctx)  # restores the same experiment
    assert result["linear_trials"] == len(layouts)
    assert result["linear_val_top1"] > 0.9 and result["linear_test_top1"] > 0.9  # 4 separable classes
    assert result["linear_best_head"].startswith(("blocks1", "blocks4"))
