"""Student/teacher SSL model, objective and EMA on a tiny ViT (CPU, 32 px global / 16 px local crops)."""

from __future__ import annotations

import copy

import pytest
import torch

from dino_ray.models import build_backbone
from dino_ray.train.ema import copy_student_to_teacher_, ema_update_, matching_parameters
from dino_ray.train.param_groups import build_param_groups
from dino_ray.train.ssl_arch import LossConfig, SSLModel, SSLObjective

B, N_GLOBAL, N_LOCAL, K = 8, 2, 2, 64
N_PATCHES = (32 // 8) ** 2


def _cfg(**overrides) -> LossConfig:
    base = dict(dino_out_dim=K, ibot_out_dim=K, head_hidden_dim=64, dino_bottleneck_dim=32,
                ibot_bottleneck_dim=16)
    return LossConfig(**{**base, **overrides})


def _model(cfg: LossConfig, embed_dim: int = 64, seed: int = 0) -> SSLModel:
    torch.manual_seed(seed)
    backbone = build_backbone("vit_tiny", embed_dim=embed_dim, depth=2, num_heads=2, img_size=32, patch_size=8)
    return SSLModel.build(backbone, cfg)


def _teacher_of(student: SSLModel) -> SSLModel:
    teacher = copy.deepcopy(student)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    global_crops = torch.randn(N_GLOBAL * B, 3, 32, 32, generator=g)
    local_crops = torch.randn(N_LOCAL * B, 3, 16, 16, generator=g)
    masks = torch.zeros(N_GLOBAL * B, N_PATCHES, dtype=torch.bool)
    for row in range(0, N_GLOBAL * B, 2):  # half the images masked, with different counts
        masks[row, : 1 + row % 5] = True
    return global_crops, local_crops, masks


def _step(student, teacher, objective, batch, teacher_temp=0.04):
    global_crops, local_crops, masks = batch
    with torch.no_grad():
        teacher_out = teacher(global_crops, None, masks, apply_masks=False)
    targets = objective.teacher_targets(teacher_out, teacher_temp, N_GLOBAL)
    student_out = student(global_crops, local_crops, masks, apply_masks=True)
    return objective(student_out, targets, masks, N_GLOBAL, N_LOCAL)


def test_outputs_have_crop_major_shapes():
    cfg = _cfg()
    model = _model(cfg)
    global_crops, local_crops, masks = _batch()
    out = model(global_crops, local_crops, masks)
    assert out["global_cls_logits"].shape == (N_GLOBAL * B, K)
    assert out["local_cls_logits"].shape == (N_LOCAL * B, K)
    assert out["global_cls_tokens"].shape == (N_GLOBAL * B, 64)
    assert out["masked_patch_logits"].shape == (int(masks.sum()), K)
    # row c*B + b is crop c of image b: running crop 1 alone gives the second block of rows
    model.eval()
    with torch.no_grad():
        full = model(global_crops, None, None, apply_masks=False)
        crop1 = model(global_crops[B:], None, None, apply_masks=False)
    torch.testing.assert_close(full["global_cls_logits"][B:], crop1["global_cls_logits"], atol=1e-5, rtol=1e-4)
    assert full["local_cls_logits"] is None


def test_masks_change_the_student_input_but_not_the_teacher_input():
    model = _model(_cfg()).eval()
    global_crops, _, masks = _batch()
    # a non-zero mask token makes the difference visible (it is zero-initialised)
    torch.nn.init.normal_(model.backbone.mask_token)
    with torch.no_grad():
        masked = model(global_crops, None, masks, apply_masks=True)
        unmasked = model(global_crops, None, masks, apply_masks=False)
        no_masks = model(global_crops, None, None, apply_masks=False)
    assert not torch.allclose(masked["masked_patch_logits"], unmasked["masked_patch_logits"])
    torch.testing.assert_close(unmasked["global_cls_logits"], no_masks["global_cls_logits"])
    assert no_masks["masked_patch_logits"].shape == (0, K)


def test_tiny_ssl_step_learns_and_teacher_gets_no_grads():
    torch.manual_seed(0)
    cfg = _cfg()
    student = _model(cfg)
    teacher = _teacher_of(student)
    objective = SSLObjective(cfg)
    optimizer = torch.optim.AdamW(build_param_groups(student, weight_decay=0.0), lr=3e-3)
    batch = _batch()
    losses = []
    for _ in range(10):
        optimizer.zero_grad(set_to_none=True)
        total, metrics = _step(student, teacher, objective, batch)
        total.backward()
        optimizer.step()
        losses.append(metrics["total_loss"])
    assert set(metrics) == {"dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss",
                            "total_loss"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["ibot_loss"] > 0
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())  # every student parameter is used


def test_ema_moves_teacher_towards_student():
    cfg = _cfg()
    student = _model(cfg)
    teacher = _teacher_of(_model(cfg, seed=1))
    t_params, s_params = matching_parameters(teacher, student)

    def distance():
        return sum(float((t - s).detach().pow(2).sum()) for t, s in zip(t_params, s_params))

    before = distance()
    ema_update_(t_params, s_params, momentum=0.5)
    assert distance() == pytest.approx(0.25 * before, rel=1e-4)  # the gap halves, squared distance quarters
    snapshot = [t.clone() for t in t_params]
    ema_update_(t_params, s_params, momentum=1.0)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, t_params))
    copy_student_to_teacher_(t_params, s_params)
    assert distance() == 0.0
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(t_params, s_params, momentum=1.5)
    with pytest.raises(ValueError, match="2 tensors"):
        ema_update_(t_params[:2], s_params[:3], momentum=0.9)


def test_ibot_loss_is_zero_without_masks():
    cfg = _cfg()
    student = _model(cfg)
    teacher = _teacher_of(student)
    objective = SSLObjective(cfg)
    global_crops, local_crops, _ = _batch()
    for masks in (None, torch.zeros(N_GLOBAL * B, N_PATCHES, dtype=torch.bool)):
        _, metrics = _step(student, teacher, objective, (global_crops, local_crops, masks))
        assert metrics["ibot_loss"] == 0.0
        assert metrics["dino_global_crops_loss"] > 0


def test_global_term_is_the_official_swapped_pairing_over_18_terms():
    cfg = _cfg(koleo_loss_weight=0.0, ibot_loss_weight=0.0)
    student = _model(cfg)
    teacher = _teacher_of(student)
    objective = SSLObjective(cfg)
    global_crops, local_crops, masks = _batch()
    with torch.no_grad():
        targets = objective.teacher_targets(teacher(global_crops, None, masks, apply_masks=False), 0.05, N_GLOBAL)
        out = student(global_crops, local_crops, masks)
    t0, t1 = targets.dino_global_probs
    s0, s1 = out["global_cls_logits"].chunk(2)

    def ce(s, t):
        return float(-(t * torch.log_softmax(s / cfg.student_temp, dim=-1)).sum(-1).mean())

    pairs = N_GLOBAL * (N_GLOBAL - 1) + N_GLOBAL * N_LOCAL
    total, metrics = objective(out, targets, masks, N_GLOBAL, N_LOCAL)
    assert metrics["dino_global_crops_loss"] == pytest.approx((ce(s0, t1) + ce(s1, t0)) / pairs, rel=1e-5)
    local = out["local_cls_logits"].chunk(N_LOCAL)
    expected_local = sum(ce(s, t) for s in local for t in (t0, t1)) / pairs
    assert metrics["dino_local_crops_loss"] == pytest.approx(expected_local, rel=1e-5)
    assert float(total) == pytest.approx(expected_local + metrics["dino_global_crops_loss"], rel=1e-5)


def test_distillation_from_a_bigger_frozen_teacher_and_head_mismatch():
    cfg = _cfg()
    student = _model(cfg, embed_dim=64)
    big_teacher = _teacher_of(_model(cfg, embed_dim=96, seed=3))
    objective = SSLObjective(cfg)
    batch = _batch()
    total, _ = _step(student, big_teacher, objective, batch)
    total.backward()
    assert student.backbone.patch_embed.proj.weight.grad is not None

    wrong_teacher = _teacher_of(_model(_cfg(dino_out_dim=32, ibot_out_dim=32), seed=4))
    with pytest.raises(ValueError, match=r"\[M, 64\], got shape \(16, 32\)"):
        _step(student, wrong_teacher, objective, batch)


def test_shared_heads_and_softmax_centering():
    cfg = _cfg(share_heads=True, centering="softmax", ibot_out_dim=999)
    student = _model(cfg)
    assert student.ibot_head is None and cfg.patch_out_dim == K
    objective = SSLObjective(cfg)
    teacher = _teacher_of(student)
    batch = _batch()
    _step(student, teacher, objective, batch)
    total, metrics = _step(student, teacher, objective, batch)
    assert torch.isfinite(total) and metrics["ibot_loss"] > 0
    state = objective.state_dict()
    assert set(state) == {"dino.softmax_centering.center", "ibot.softmax_centering.center"}
    assert torch.count_nonzero(state["dino.softmax_centering.center"]) > 0


def test_bad_inputs_raise_clear_errors():
    cfg = _cfg()
    model = _model(cfg)
    global_crops, local_crops, masks = _batch()
    with pytest.raises(ValueError, match="masks must be a bool"):
        model(global_crops, local_crops, masks.float())
    with pytest.raises(ValueError, match="ibot_head"):
        SSLModel(model.backbone, model.dino_head, model.ibot_head, share_heads=True)
    with pytest.raises(ValueError, match="centering"):
        _cfg(centering="mean")
    objective = SSLObjective(cfg)
    with torch.no_grad():
        out = model(global_crops, None, masks, apply_masks=False)
    with pytest.raises(ValueError, match="n_global=3"):
        objective.teacher_targets(out, 0.04, n_global=3)
