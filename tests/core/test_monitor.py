"""Collapse diagnostics, alarm rules and the monitor's probes on tensors with known answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dino_ray.evals.monitor import _shard, monitor_steps, ridge_probe_top1, ridge_weights, sharded_features
from dino_ray.train.alarms import CollapseConfig, CollapseWatch
from dino_ray.train.diagnostics import (collapse_metrics, effective_rank, feature_std, mean_pairwise_cosine,
                                        prototypes_used, row_entropy)

JOB = Path(__file__).resolve().parents[2] / "jobs" / "pipeline.yaml"
CPU_PRESET = JOB.parent / "presets" / "cpu.yaml"


def test_diagnostics_tell_collapsed_from_spread_features():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(256, 32, generator=g)
    same = torch.ones(256, 32) + 1e-6 * torch.randn(256, 32, generator=g)
    assert effective_rank(same) == pytest.approx(1.0, abs=1e-2)
    assert effective_rank(spread) > 25  # near 32 for isotropic rows
    assert mean_pairwise_cosine(same) == pytest.approx(1.0, abs=1e-5)
    assert abs(mean_pairwise_cosine(spread)) < 0.02
    assert feature_std(same) < 1e-5 < feature_std(spread)
    brute = torch.nn.functional.normalize(spread, dim=-1)
    cos = brute @ brute.T
    assert mean_pairwise_cosine(spread) == pytest.approx(float((cos.sum() - cos.trace()) / (256 * 255)), abs=1e-5)


def test_target_diagnostics_against_ln_k():
    k = 64
    uniform = torch.full((10, k), 1.0 / k)
    onehot = torch.nn.functional.one_hot(torch.arange(10) % 3, k).float()
    assert row_entropy(uniform) == pytest.approx(math.log(k), rel=1e-5)
    assert row_entropy(onehot) == pytest.approx(0.0, abs=1e-6)
    assert prototypes_used(onehot) == 3
    m = collapse_metrics([uniform, uniform], torch.empty(0, k), torch.randn(20, 8), dino_loss=math.log(k))
    assert m["collapse/dino_loss_over_lnk"] == pytest.approx(1.0)
    assert m["collapse/teacher_entropy_over_lnk"] == pytest.approx(1.0, rel=1e-5)
    assert "collapse/ibot_entropy_over_lnk" not in m  # no masked patches this step


def test_alarms_wait_for_warmup_fire_once_and_say_what_fixes_them():
    watch = CollapseWatch(CollapseConfig(window=2, check_after_fraction=0.2), total_steps=100, warmup_steps=30)
    at_lnk = {"collapse/dino_loss_over_lnk": 0.999, "collapse/cls_effective_rank": 1.2}
    assert watch.observe(10, at_lnk) == [] and watch.observe(20, at_lnk) == []  # still warming up
    assert watch.observe(30, at_lnk) and len(watch.fired) == 1  # rank fires at once; the loss needs 2 points
    assert watch.fired == {"low_rank"}
    alarms = watch.observe(40, at_lnk)
    assert [a.code for a in alarms] == ["uniform_targets"]
    assert "teacher_temp" in alarms[0].message and "step 40" in alarms[0].message
    assert watch.observe(50, at_lnk) == []  # once per run

    healthy = CollapseWatch(CollapseConfig(window=2), total_steps=100, warmup_steps=0)
    for step in range(0, 101, 10):
        assert healthy.observe(step, {"collapse/dino_loss_over_lnk": 0.95, "collapse/cls_effective_rank": 9.0,
                                      "monitor/knn_top1": 0.2 + step / 1000}) == []


def test_knn_alarm_compares_with_step_zero_and_respects_prefixes():
    watch = CollapseWatch(CollapseConfig(knn_after_fraction=0.5), total_steps=100, warmup_steps=0, prefix="mini/")
    assert watch.observe(0, {"mini/monitor/knn_top1": 0.30}) == []
    assert watch.observe(40, {"mini/monitor/knn_top1": 0.29}) == []  # too early to judge
    alarms = watch.observe(60, {"mini/monitor/knn_top1": 0.30, "monitor/knn_top1": 0.9})
    assert [a.code for a in alarms] == ["knn_flat"] and "(mini)" in alarms[0].message


def test_config_mistakes_fail_before_any_cluster_work(tmp_path):
    from dino_ray.config.loader import load_job
    from dino_ray.config.typed import ConfigError

    with pytest.raises(ConfigError, match="pretrain.train.collapse.loss_margin"):
        load_job(JOB, ["pretrain.train.collapse.loss_margin=2.0"])
    with pytest.raises(ConfigError, match="pretrain.train.on_collapse"):
        load_job(JOB, ["pretrain.train.on_collapse=halt"])
    with pytest.raises(ConfigError, match="monitor.train.uri"):
        load_job(JOB, ["pretrain.monitor.every=10", "pretrain.monitor.train.uri=",
                                        "pretrain.monitor.test.uri="])


def test_ridge_probe_separates_separable_classes_and_fails_on_noise():
    g = np.random.default_rng(0)
    centres = g.normal(size=(4, 16)) * 3
    y = np.repeat(np.arange(4), 50)
    x = centres[y] + g.normal(size=(200, 16)) * 0.3
    assert ridge_probe_top1(x[::2], y[::2], x[1::2], y[1::2]) == 1.0
    noise = g.normal(size=(200, 16))
    assert ridge_probe_top1(noise[::2], y[::2], noise[1::2], y[1::2]) < 0.5


def test_ridge_weights_are_the_same_from_the_row_and_the_column_system():
    """Wide features (raw pixels) solve the n x n system instead of the d x d one: the same weights."""
    g = torch.Generator().manual_seed(0)
    for n, d in ((40, 300), (300, 40)):
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = torch.nn.functional.one_hot(torch.randint(0, 5, (n,), generator=g), 5).double()
        primal, dual = ridge_weights(x, y, 1e-2, dual=False), ridge_weights(x, y, 1e-2, dual=True)
        assert torch.allclose(primal, dual, rtol=1e-8, atol=1e-10)
        assert torch.equal(ridge_weights(x, y, 1e-2), dual if n < d else primal)


def test_shards_cover_every_row_with_equal_calls_per_rank():
    for n, world in [(10, 3), (2, 4), (7, 1), (8, 2)]:
        shards = [_shard(n, r, world) for r in range(world)]
        assert len({s.size for s in shards}) == 1
        assert set(np.concatenate(shards)) == set(range(n))
    x = torch.arange(10, dtype=torch.float32).view(10, 1).repeat(1, 3)
    out = sharded_features(lambda b: b * 2, x, batch_size=3)
    assert np.array_equal(out, (x * 2).numpy())


def test_monitor_steps_include_start_and_end():
    assert monitor_steps(0, 0, 100) == []
    assert monitor_steps(40, 0, 100) == [0, 40, 80, 100]
    assert monitor_steps(40, 50, 100) == [80, 100]  # resumed at step 50: no second step-0 point


def test_monitor_set_is_prepared_on_a_thread_with_the_pixel_reference_on_rank_0(tmp_path):
    """The stage overlaps decoding the monitor set with building the engines (train/watch.py)."""
    import threading

    from PIL import Image

    from dino_ray.config.loader import load_job
    from dino_ray.train.watch import prepare_monitor

    g = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, cls in enumerate(("red", "blue")):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(6):
                pixels = np.clip(g.normal(30, 10, (16, 16, 3)), 0, 255)
                pixels[..., 2 * c] += 180  # red images and blue images
                pixels = np.clip(pixels, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    job = load_job(CPU_PRESET, ["pretrain.monitor.every=10", "pretrain.monitor.knn_k=3",
                         f"pretrain.monitor.train={{uri: {tmp_path / 'train'}, labels_from_folders: true}}",
                         f"pretrain.monitor.test={{uri: {tmp_path / 'test'}, labels_from_folders: true}}"])
    caller = threading.current_thread().name
    seen = []
    import dino_ray.evals.monitor as monitor_mod

    original = monitor_mod.load_monitor_data

    def spy(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monitor_mod.load_monitor_data = spy
    try:
        ready = prepare_monitor(job.pretrain, rank=0).result(timeout=60)
        other_rank = prepare_monitor(job.pretrain, rank=1).result(timeout=60)
    finally:
        monitor_mod.load_monitor_data = original
    assert seen and all(name != caller and name.startswith("monitor-prepare") for name in seen)
    assert ready.data.train_x.shape[0] == 12 and ready.data.skipped == 0
    assert ready.reference["monitor/pixels_knn_top1"] == 1.0  # red vs blue: raw pixels separate them
    assert other_rank.reference == {}
    assert prepare_monitor(load_job(CPU_PRESET, ["pretrain.monitor.every=0"]).pretrain, rank=0) is None
