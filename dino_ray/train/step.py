"""One SSL training step of a student engine, in the order of DINOv2's ``train/train.py``.

The worker loop (``train/loop.py``) and ``benchmarks/train_step.py`` both run these, so the benchmark
times the product's step: DeepSpeed engine, parameter groups and schedules, per-part clipping, EMA.
The finite-loss check sits between :func:`student_loss` and :func:`update` in the loop, because all
ranks must agree on it before any of them runs a backward.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from dino_ray.train.param_groups import apply_schedules


def teacher_output(teacher: Any, crops: dict[str, torch.Tensor], masks: torch.Tensor,
                   autocast: contextlib.AbstractContextManager) -> dict[str, Any]:
    """The teacher (EMA or frozen) on the global crops, without masks and without gradients."""
    with torch.no_grad(), autocast:
        return teacher(crops["global_crops"], None, masks, apply_masks=False)


def student_loss(member: Any, objective: Any, t_out: dict[str, Any], crops: dict[str, torch.Tensor],
                 masks: torch.Tensor, values: dict[str, float], apply_masks: bool, n_global: int, n_local: int,
                 autocast: contextlib.AbstractContextManager) -> tuple[Any, dict[str, Any], torch.Tensor, dict]:
    """Teacher targets at this step's temperature, the schedules' values set on the optimizer, the
    student's forward on all crops; returns (targets, student outputs, loss, per-term floats)."""
    targets = objective.teacher_targets(t_out, values["teacher_temp"], n_global)
    apply_schedules(member.engine.optimizer, values["lr"], values["wd"], values["last_layer_lr"])
    with autocast:
        s_out = member.engine(crops["global_crops"], crops["local_crops"] if n_local else None, masks,
                              apply_masks=apply_masks)
    loss, terms = objective(s_out, targets, masks, n_global, n_local)
    return targets, s_out, loss, terms


def update(member: Any, loss: torch.Tensor, momentum: float) -> dict[str, torch.Tensor]:
    """Backward, each part of the student clipped on its own (as the recipe clips), optimizer step, EMA
    update; returns each part's gradient norm before clipping."""
    member.engine.backward(loss)
    grad_norms = member.clip()
    member.engine.step()
    member.ema_update(momentum)
    return grad_norms
