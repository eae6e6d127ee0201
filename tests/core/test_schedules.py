"""Schedules (endpoints, warmup, freeze, lr scaling) and optimizer parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from dino_ray.models import build_backbone
from dino_ray.models.heads import DINOHead
from dino_ray.train.param_groups import apply_schedules, build_param_groups, layer_id, wd_multiplier
from dino_ray.train.schedules import (
    CosineSchedule,
    ScheduleConfig,
    TrainSchedules,
    ZeroedStart,
    scaled_lr,
    teacher_temp_schedule,
)
from dino_ray.train.ssl_arch import SSLModel

# ------------------------------------------------------------------------------- schedules


def test_cosine_endpoints_and_midpoint():
    s = CosineSchedule(1.0, 0.1, total_iters=101)
    assert len(s) == 101
    assert s[0] == pytest.approx(1.0)
    assert s[50] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 101)))
    assert s[100] == pytest.approx(0.1, abs=1e-3)  # last cosine step is just above the final value
    assert s[101] == 0.1 and s[10**9] == 0.1  # clamped past the end
    values = [s[i] for i in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_warmup_is_linear_and_includes_both_endpoints():
    s = CosineSchedule(2.0, 0.0, total_iters=20, warmup_iters=5, start_warmup_value=0.5)
    assert [s[i] for i in range(5)] == pytest.approx([0.5, 0.875, 1.25, 1.625, 2.0])
    assert s[5] == pytest.approx(2.0)  # cosine part starts at the peak
    assert s[6] < 2.0


@pytest.mark.parametrize("warmup", [0, 1, 2, 7])
def test_schedule_matches_the_official_numpy_construction(warmup):
    """DINOv2's CosineScheduler: np.linspace for the warmup (one step of it is the start value, not the
    peak), then the half cosine over the remaining iterations."""
    import numpy as np

    total, base, final, start = 20, 2.0, 0.1, 0.3
    warm = np.linspace(start, base, warmup)
    iters = np.arange(total - warmup)
    official = np.concatenate((warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))
    s = CosineSchedule(base, final, total_iters=total, warmup_iters=warmup, start_warmup_value=start)
    assert [s[i] for i in range(total)] == pytest.approx(official.tolist())


def test_freeze_prepends_zeros_and_delays_the_rest():
    s = CosineSchedule(1.0, 0.0, total_iters=10, warmup_iters=2, freeze_iters=3)
    assert [s[i] for i in range(4)] == [0.0, 0.0, 0.0, 0.0]  # frozen, then warmup starts from 0
    assert s[4] == pytest.approx(1.0)


def test_zeroed_start_keeps_the_underlying_timeline():
    lr = CosineSchedule(1.0, 0.0, total_iters=10, warmup_iters=4)
    frozen = ZeroedStart(lr, zero_iters=2)
    assert [frozen[i] for i in range(4)] == [0.0, 0.0, lr[2], lr[3]]
    assert len(frozen) == 10 and frozen[99] == lr[99]


def test_teacher_temperature_warms_up_then_stays_constant():
    s = teacher_temp_schedule(0.04, 0.07, warmup_iters=31)
    assert s[0] == pytest.approx(0.04)
    assert s[15] == pytest.approx(0.055)
    assert s[30] == pytest.approx(0.07)
    assert s[31] == s[10**6] == 0.07
    assert teacher_temp_schedule(0.04, 0.07, warmup_iters=0)[0] == 0.07


def test_lr_scaling_rules():
    assert scaled_lr(2e-4, 3072) == pytest.approx(2e-4 * math.sqrt(3), rel=1e-9)  # the paper's 3.5e-4
    assert scaled_lr(1e-3, 1024) == pytest.approx(1e-3)
    assert scaled_lr(1e-3, 512, rule="linear_wrt_256") == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 512, rule="none") == 1e-3
    with pytest.raises(ValueError, match="cubic"):
        scaled_lr(1e-3, 512, rule="cubic")
    with pytest.raises(ValueError, match="global_batch"):
        scaled_lr(1e-3, 0)


def test_bad_schedule_arguments_are_rejected():
    with pytest.raises(ValueError, match="exceeds total_iters"):
        CosineSchedule(1.0, 0.0, total_iters=5, warmup_iters=4, freeze_iters=2)
    with pytest.raises(ValueError, match="iteration"):
        CosineSchedule(1.0, 0.0, total_iters=5)[-1]
    with pytest.raises(ValueError, match="lr_scaling_rule"):
        ScheduleConfig(lr_scaling_rule="cubic")
    for key in ("warmup_iters", "freeze_last_layer_iters"):
        with pytest.raises(ValueError, match=f"{key}=301 exceeds total_iters=300"):
            ScheduleConfig(total_iters=300, **{"warmup_iters": 10, "freeze_last_layer_iters": 0, key: 301})
    # a teacher-temperature warm-up longer than a short smoke run is allowed (the temperature stays warm)
    ScheduleConfig(total_iters=300, warmup_iters=300, freeze_last_layer_iters=20, warmup_teacher_temp_iters=400)


@pytest.mark.parametrize("key, value", [
    ("base_lr", -1.0), ("base_lr", float("nan")), ("min_lr", float("-inf")), ("teacher_temp", 0.0),
    ("warmup_teacher_temp", -0.04), ("momentum_teacher", 2.0), ("clip_grad", -1.0), ("total_iters", 0),
    ("weight_decay", float("nan")), ("layerwise_decay", 0.0), ("warmup_iters", -5)])
def test_out_of_range_schedule_values_name_the_key(key, value):
    kwargs = {"total_iters": 300, "warmup_iters": 10, "freeze_last_layer_iters": 0, key: value}
    with pytest.raises(ValueError, match=f"schedule.{key}="):
        ScheduleConfig(**kwargs)


def test_train_schedules_from_vitg_defaults():
    cfg = ScheduleConfig()
    sched = TrainSchedules.from_config(cfg, global_batch=3072)
    peak = 2e-4 * math.sqrt(3)
    start, warm_end, end = sched.values(0), sched.values(cfg.warmup_iters - 1), sched.values(cfg.total_iters)
    assert start == {"lr": 0.0, "wd": pytest.approx(0.04), "mom": pytest.approx(0.994),
                     "teacher_temp": pytest.approx(0.04), "last_layer_lr": 0.0}
    assert warm_end["lr"] == pytest.approx(peak) and warm_end["last_layer_lr"] == pytest.approx(peak)
    assert sched.values(cfg.warmup_teacher_temp_iters)["teacher_temp"] == pytest.approx(0.07)
    assert end == {"lr": 1e-6, "wd": 0.2, "mom": 1.0, "teacher_temp": 0.07, "last_layer_lr": 1e-6}
    # the last layer is frozen for exactly freeze_last_layer_iters, then follows the lr curve
    assert sched.last_layer_lr[cfg.freeze_last_layer_iters - 1] == 0.0
    it = cfg.freeze_last_layer_iters
    assert sched.last_layer_lr[it] == sched.lr[it] > 0


# ---------------------------------------------------------------------------- param groups


def _tiny_ssl_model() -> SSLModel:
    backbone = build_backbone("vit_tiny", embed_dim=32, depth=4, num_heads=2, img_size=32, patch_size=8,
                              num_register_tokens=2)
    dino = DINOHead(32, 16, hidden_dim=24, bottleneck_dim=8)
    ibot = DINOHead(32, 16, hidden_dim=24, bottleneck_dim=8)
    return SSLModel(backbone, dino, ibot)


def _group_of(groups):
    return {id(p): g for g in groups for p in g["params"]}


def test_param_groups_cover_every_parameter_exactly_once():
    model = _tiny_ssl_model()
    groups = build_param_groups(model, layerwise_decay=0.5, patch_embed_lr_mult=0.2, weight_decay=0.04)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))  # one group per combination


def test_layer_decay_and_weight_decay_multipliers_for_a_four_block_model():
    model = _tiny_ssl_model()
    groups = build_param_groups(model, layerwise_decay=0.5, patch_embed_lr_mult=0.2, weight_decay=0.04)
    by_id = _group_of(groups)
    named = dict(model.named_parameters())

    def group(name):
        return by_id[id(named[name])]

    # rate ** (n_blocks + 1 - layer_id) with n_blocks = 4
    assert group("backbone.blocks.0.attn.qkv.weight")["lr_multiplier"] == pytest.approx(0.5 ** 4)
    assert group("backbone.blocks.3.mlp.fc1.weight")["lr_multiplier"] == pytest.approx(0.5)
    assert group("backbone.patch_embed.proj.weight")["lr_multiplier"] == pytest.approx(0.5 ** 5 * 0.2)
    assert group("backbone.pos_embed")["lr_multiplier"] == pytest.approx(0.5 ** 5)
    assert group("backbone.norm.weight")["lr_multiplier"] == 1.0
    assert group("dino_head.mlp.0.weight")["lr_multiplier"] == 1.0

    no_decay = ["backbone.blocks.1.attn.qkv.bias", "backbone.blocks.1.norm1.weight", "backbone.blocks.2.ls1.gamma",
                "backbone.norm.weight", "backbone.cls_token", "backbone.mask_token", "backbone.register_tokens",
                "backbone.pos_embed", "dino_head.mlp.0.bias"]
    decay = ["backbone.blocks.1.attn.qkv.weight", "backbone.patch_embed.proj.weight", "dino_head.mlp.2.weight",
             "ibot_head.last_layer.weight_v", "ibot_head.last_layer.weight_g"]
    for name in no_decay:
        assert group(name)["wd_multiplier"] == 0.0 and group(name)["weight_decay"] == 0.0, name
    for name in decay:
        assert group(name)["wd_multiplier"] == 1.0 and group(name)["weight_decay"] == pytest.approx(0.04), name

    last = {n for n in named if by_id[id(named[n])]["is_last_layer"]}
    assert last == {"dino_head.last_layer.weight_g", "dino_head.last_layer.weight_v",
                    "ibot_head.last_layer.weight_g", "ibot_head.last_layer.weight_v"}


def test_layer_id_handles_chunked_block_names():
    assert layer_id("backbone.blocks.1.7.attn.qkv.weight", n_blocks=12) == 8
    assert layer_id("blocks.7.norm1.weight", n_blocks=12) == 8
    assert layer_id("cls_token", n_blocks=12) == 0
    assert layer_id("dino_head.mlp.0.weight", n_blocks=12) == 13
    assert wd_multiplier("blocks.0.ls2.gamma") == 0.0


def test_apply_schedules_sets_lr_and_wd_and_freezes_the_last_layer():
    model = _tiny_ssl_model()
    optimizer = torch.optim.AdamW(build_param_groups(model, 0.5, 0.2, 0.04), lr=1.0)
    apply_schedules(optimizer, lr=1e-3, wd=0.1, last_layer_lr=0.0)
    for g in optimizer.param_groups:
        expected_lr = 0.0 if g["is_last_layer"] else 1e-3 * g["lr_multiplier"]
        assert g["lr"] == pytest.approx(expected_lr)
        assert g["weight_decay"] == pytest.approx(0.1 * g["wd_multiplier"])
    with pytest.raises(KeyError, match="lr_multiplier"):
        apply_schedules(torch.optim.SGD(model.parameters(), lr=0.1), lr=1e-3, wd=0.1, last_layer_lr=0.0)


def test_param_groups_skip_frozen_parameters():
    model = _tiny_ssl_model()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    groups = build_param_groups(model)
    assert {id(p) for g in groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_param_groups(model.backbone)
