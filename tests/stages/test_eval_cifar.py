"""The eval stage judging a backbone that has trained a few hundred steps on CIFAR-10 photos.

Ten classes, so chance is 10 %. The trained backbone must be well above chance in kNN and in the
linear grid, and above a randomly initialised ViT of the same shape (the "random" baseline) in kNN;
raw pixels (the other baseline) must be well above chance and above random features too. Feature
cache reuse on a re-run is checked by tests/e2e/test_pipeline_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dino_ray import storage
from dino_ray.config.loader import load_job
from dino_ray.pipeline import Pipeline

pytestmark = pytest.mark.slow
PRESET = Path(__file__).resolve().parents[1] / "presets" / "tiny.yaml"
STEPS = 300


def test_few_hundred_steps_beat_random_features_on_cifar10(ray_session, cifar10_dir, tmp_path):
    cifar = f"{{uri: {cifar10_dir / 'train'}, labels_from_folders: true}}"
    overrides = [
        f"output_root={tmp_path / 'out'}", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "stages=[pretrain, eval]", f"pretrain.data.source={cifar}",
        f"pretrain.schedule={{total_iters: {STEPS}, warmup_iters: 30, warmup_teacher_temp_iters: 100, "
        "freeze_last_layer_iters: 20, base_lr: 1.0e-3, lr_scaling_rule: none}",
        f"pretrain.train.checkpoint_every={STEPS}", "pretrain.train.log_every=50",
        "pretrain.train.batch_size_per_worker=32",
        "eval.backbones=[pretrain]",
        f"eval.datasets=[{{name: cifar10, image_size: 32, train: {cifar}, "
        f"test: {{uri: {cifar10_dir / 'test'}, labels_from_folders: true}}}}]",
        "eval.knn.ks=[20]",
    ]
    manifests = Pipeline(load_job(PRESET, overrides), ensure_ray=lambda: None).run()
    rows = {r["backbone"]: r for r in json.loads(storage.read_bytes(manifests["eval"]["outputs"]["results"]))}
    top1 = {b: {k: v for k, v in r.items() if "top1" in k} for b, r in rows.items()}
    ours, random, pixels = rows["pretrain"], rows["random"], rows["pixels"]
    # Measured (LayerScale 1.0, teacher 0.04 -> 0.07 over 100 steps): kNN 0.294 / linear 0.284 (pretrain); random init
    # 0.245 on CLS, 0.257 on pooled patches / 0.279; pixels 0.374 / 0.329. A LayerScale-1.0 random ViT is a
    # fair baseline (not the constant CLS of LayerScale 1e-5), so the margin is the better of its two kNNs.
    fair_random = max(random["knn_k20_top1"], random["knn_avgpool_k20_top1"])
    assert ours["knn_k20_top1"] > 0.2 and ours["linear_test_top1"] > 0.2, top1
    assert ours["knn_k20_top1"] > fair_random + 0.02, top1
    assert pixels["knn_k20_top1"] > 0.25 and pixels["knn_k20_top1"] > fair_random + 0.05, top1
    assert ours["linear_val_top1"] > 0.2  # the head was chosen on validation, which sees the same features
