"""Per-iteration hyperparameter schedules of the DINOv2 recipe (lr, wd, teacher momentum and temperature).

Everything is expressed in optimizer iterations, not epochs: curated data has no natural epoch, and the
official "epoch" is a fixed 1250 iterations anyway. Values are computed on demand rather than stored in
per-iteration arrays, so a 625k-iteration run costs nothing to describe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Literal, Protocol, get_args

from dino_ray.config.fields import Checked, bounded

LrScalingRule = Literal["sqrt_wrt_1024", "linear_wrt_256", "none"]
LR_SCALING_RULES: tuple[str, ...] = get_args(LrScalingRule)


class Schedule(Protocol):
    def __getitem__(self, it: int) -> float: ...

    def __len__(self) -> int: ...


def _check_iteration(it: int) -> int:
    if it < 0:
        raise ValueError(f"iteration must be >= 0, got {it}")
    return it


class CosineSchedule:
    """Zeros for ``freeze_iters``, linear warmup, then half-cosine from ``base_value`` to ``final_value``.

    Same shape as the official scheduler: the warmup includes both of its endpoints, the cosine part
    covers the remaining iterations, and any iteration at or past ``total_iters`` returns ``final_value``.
    """

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        freeze_iters: int = 0,
    ) -> None:
        if min(total_iters, warmup_iters, freeze_iters) < 0:
            raise ValueError(
                f"iteration counts must be >= 0, got total_iters={total_iters}, "
                f"warmup_iters={warmup_iters}, freeze_iters={freeze_iters}"
            )
        if warmup_iters + freeze_iters > total_iters:
            raise ValueError(
                f"warmup_iters + freeze_iters ({warmup_iters} + {freeze_iters}) exceeds total_iters={total_iters}"
            )
        self.base_value = base_value
        self.final_value = final_value
        self.total_iters = total_iters
        self.warmup_iters = warmup_iters
        self.start_warmup_value = start_warmup_value
        self.freeze_iters = freeze_iters

    def __len__(self) -> int:
        return self.total_iters

    def __getitem__(self, it: int) -> float:
        it = _check_iteration(it)
        if it >= self.total_iters:
            return self.final_value
        if it < self.freeze_iters:
            return 0.0
        it -= self.freeze_iters
        if it < self.warmup_iters:
            if self.warmup_iters == 1:  # the official np.linspace(start, base, 1) is [start]
                return self.start_warmup_value
            frac = it / (self.warmup_iters - 1)
            return self.start_warmup_value + frac * (self.base_value - self.start_warmup_value)
        it -= self.warmup_iters
        n_cosine = self.total_iters - self.warmup_iters - self.freeze_iters
        cosine = 0.5 * (1.0 + math.cos(math.pi * it / n_cosine))
        return self.final_value + (self.base_value - self.final_value) * cosine


class ZeroedStart:
    """``schedule`` with its first ``zero_iters`` values forced to 0 (the official last-layer freeze).

    Unlike ``CosineSchedule(freeze_iters=...)`` this does not delay the rest of the schedule: the head's
    last layer simply skips the first iterations of the shared lr curve.
    """

    def __init__(self, schedule: Schedule, zero_iters: int) -> None:
        if zero_iters < 0:
            raise ValueError(f"zero_iters must be >= 0, got {zero_iters}")
        self.schedule = schedule
        self.zero_iters = zero_iters

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, it: int) -> float:
        return 0.0 if _check_iteration(it) < self.zero_iters else self.schedule[it]


def teacher_temp_schedule(warmup_temp: float, final_temp: float, warmup_iters: int) -> CosineSchedule:
    """Linear warmup of the teacher temperature, then constant: sharp targets would collapse early on."""
    if warmup_temp <= 0 or final_temp <= 0:
        raise ValueError(f"temperatures must be > 0, got warmup_temp={warmup_temp}, final_temp={final_temp}")
    return CosineSchedule(
        base_value=final_temp,
        final_value=final_temp,
        total_iters=warmup_iters,
        warmup_iters=warmup_iters,
        start_warmup_value=warmup_temp,
    )


def scaled_lr(base_lr: float, global_batch: int, rule: str = "sqrt_wrt_1024") -> float:
    """Peak lr for a global batch: DINOv2 scales a per-1024 base lr by sqrt(batch / 1024)."""
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch / 1024)
    if rule == "linear_wrt_256":
        return base_lr * global_batch / 256
    if rule == "none":
        return base_lr
    raise ValueError(f"lr scaling rule must be one of {LR_SCALING_RULES}, got {rule!r}")


@dataclass
class ScheduleConfig(Checked):
    """Optimisation schedule knobs; defaults are the DINOv2 ViT-g/14 run (625k iterations, batch 3072)."""

    config_label = "schedule"  # errors read "schedule.<key>=<value> ..."

    total_iters: int = bounded(625_000, ge=1)  # length of the run; every cosine below spans it (500 "epochs" x 1250)
    base_lr: float = bounded(2e-4, gt=0.0)  # peak lr for a global batch of 1024, before scaling by the rule below
    lr_scaling_rule: LrScalingRule = "sqrt_wrt_1024"  # 2e-4 * sqrt(3072/1024) = 3.46e-4, the paper's 3.5e-4
    min_lr: float = bounded(1e-6, ge=0.0)  # lr at the end of the cosine decay
    warmup_iters: int = bounded(100_000, ge=0)  # linear lr warmup from 0; long warmups matter for stability at scale
    weight_decay: float = bounded(0.04, ge=0.0)  # AdamW decay at iteration 0 ...
    weight_decay_end: float = bounded(0.2, ge=0.0)  # ... rising along a cosine to this value (the ViT-g/L override)
    momentum_teacher: float = bounded(0.994, ge=0.0, le=1.0)  # EMA momentum of the teacher at iteration 0 ...
    final_momentum_teacher: float = bounded(1.0, ge=0.0, le=1.0)  # ... cosine to 1.0: the teacher freezes at the end
    warmup_teacher_temp: float = bounded(0.04, gt=0.0)  # teacher softmax temperature at iteration 0 ...
    teacher_temp: float = bounded(0.07, gt=0.0)  # ... reached linearly after the warmup below, then constant
    warmup_teacher_temp_iters: int = bounded(37_500, ge=0)  # 30 official epochs
    freeze_last_layer_iters: int = bounded(1250, ge=0)  # head's last (prototype) layer gets lr 0 this long (1 epoch)
    layerwise_decay: float = bounded(1.0, gt=0.0, le=1.0)  # lr multiplier decay per block from the top; 1.0 = off
    # (0.9 in ViT-L/16 IN-1k)
    patch_embed_lr_mult: float = bounded(0.2, ge=0.0)  # extra lr multiplier of the patch embedding
    # max gradient norm of each part of the student (backbone, DINO head, iBOT head), each clipped on its own
    # as the official trainer does (train/clipping.py); 0 turns clipping off
    clip_grad: float = bounded(3.0, ge=0.0)

    def validate(self) -> None:
        for name in ("warmup_iters", "freeze_last_layer_iters"):
            if getattr(self, name) > self.total_iters:  # the lr would never reach its peak: a typo, not a recipe
                raise ValueError(f"{name}={getattr(self, name)} exceeds total_iters={self.total_iters}")


@dataclass
class TrainSchedules:
    """The five per-iteration schedules a DINOv2 step reads, with the official metric names."""

    lr: Schedule
    wd: Schedule
    momentum: Schedule
    teacher_temp: Schedule
    last_layer_lr: Schedule

    @classmethod
    def from_config(cls, cfg: ScheduleConfig, global_batch: int) -> "TrainSchedules":
        peak_lr = scaled_lr(cfg.base_lr, global_batch, cfg.lr_scaling_rule)
        lr = CosineSchedule(peak_lr, cfg.min_lr, cfg.total_iters, warmup_iters=cfg.warmup_iters)
        return cls(
            lr=lr,
            wd=CosineSchedule(cfg.weight_decay, cfg.weight_decay_end, cfg.total_iters),
            momentum=CosineSchedule(cfg.momentum_teacher, cfg.final_momentum_teacher, cfg.total_iters),
            teacher_temp=teacher_temp_schedule(
                cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_iters
            ),
            last_layer_lr=ZeroedStart(lr, cfg.freeze_last_layer_iters),
        )

    def values(self, it: int) -> Dict[str, float]:
        """All values at iteration ``it``, keyed by the official log names (lr, wd, mom, ...)."""
        return {
            "lr": self.lr[it],
            "wd": self.wd[it],
            "mom": self.momentum[it],
            "teacher_temp": self.teacher_temp[it],
            "last_layer_lr": self.last_layer_lr[it],
        }
