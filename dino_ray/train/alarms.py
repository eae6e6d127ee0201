"""Collapse alarms: turn the diagnostics of a running stage into plain words and a decision.

Three rules, each checked only once the run has had a fair chance (after the teacher-temperature and
learning-rate warm-ups and a minimum fraction of the run), each raised at most once per run:

- ``uniform_targets``: the DINO loss, averaged over the last log points, is not below ln(K) by at least
  ``loss_margin`` (ln(K) is what a student scores by predicting the uniform distribution; sitting at or
  above it means the teacher's targets teach nothing);
- ``low_rank``: the teacher's CLS features span fewer than ``min_effective_rank`` dimensions;
- ``knn_flat``: on the monitor set, kNN top-1 is not above its step-0 value by ``knn_min_gain`` once
  ``knn_after_fraction`` of the run is done (needs a monitor set).

What happens then is ``train.on_collapse``: ``warn`` logs and tags the MLflow run and goes on,
``stop`` also ends the stage with an error after saving a checkpoint of the current step. Torch-free
(the job config holds :class:`CollapseConfig`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from typing import Mapping, Optional

from dino_ray.config.fields import Checked, bounded


@dataclasses.dataclass
class CollapseConfig(Checked):
    """Thresholds of the collapse alarms (see the module doc)."""

    enabled: bool = True
    loss_margin: float = bounded(0.01, gt=0.0, lt=1.0)  # the loss must get 1 % below ln(K)
    window: int = bounded(3, ge=1)  # log points averaged for the loss rule
    min_effective_rank: float = bounded(2.0, ge=1.0)
    check_after_fraction: float = bounded(0.2, ge=0.0, le=1.0)  # no verdict before this much of the run
    knn_after_fraction: float = bounded(0.5, gt=0.0, le=1.0)
    knn_min_gain: float = bounded(0.0, ge=0.0)  # top-1 fraction kNN must gain over step 0


@dataclasses.dataclass(frozen=True)
class Alarm:
    code: str
    step: int
    message: str

    @property
    def tag(self) -> str:
        return f"dino_ray.alarm.{self.code}"


FIXES = {
    "uniform_targets": (
        "the teacher's targets carry no information yet, so the DINO head learns nothing. What usually fixes "
        "it: a sharper teacher (schedule.teacher_temp and warmup_teacher_temp 0.04, a shorter "
        "warmup_teacher_temp_iters), model.layerscale_init 1.0 for small models and short runs, fewer "
        "prototypes (loss.dino_out_dim), a higher schedule.base_lr. See docs/monitoring.md."),
    "low_rank": (
        "every image maps to nearly the same direction (features collapsed). What usually fixes it: keep "
        "centering on (loss.centering: sinkhorn_knopp), a higher loss.koleo_loss_weight, a lower "
        "schedule.base_lr or a longer warm-up, model.layerscale_init 1.0 for small models. See "
        "docs/monitoring.md."),
    "knn_flat": (
        "the features are not getting better at telling the monitor set's classes apart. Check the "
        "collapse/* curves first; if they look healthy, the run may simply be too short or the learning "
        "rate too low for this data. See docs/monitoring.md."),
}


class CollapseWatch:
    """Feed it each logged step's metrics; it returns the alarms that newly fire."""

    def __init__(self, cfg: CollapseConfig, total_steps: int, warmup_steps: int, prefix: str = ""):
        self.cfg, self.total, self.prefix = cfg, total_steps, prefix
        self.start = max(warmup_steps, math.ceil(cfg.check_after_fraction * total_steps))
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.knn0: Optional[float] = None
        self.fired: set[str] = set()

    def observe(self, step: int, metrics: Mapping[str, float]) -> list[Alarm]:
        if not self.cfg.enabled:
            return []
        get = lambda name: metrics.get(f"{self.prefix}{name}")  # noqa: E731
        loss, rank, knn = get("collapse/dino_loss_over_lnk"), get("collapse/cls_effective_rank"), \
            get("monitor/knn_top1")
        if loss is not None and step >= self.start:
            self.losses.append(float(loss))
        if knn is not None and self.knn0 is None:
            self.knn0 = float(knn)
        found = []
        if len(self.losses) == self.cfg.window and sum(self.losses) / len(self.losses) > 1.0 - self.cfg.loss_margin:
            found.append(("uniform_targets",
                          f"the DINO loss is {sum(self.losses) / len(self.losses):.4f} x ln(K) over the last "
                          f"{self.cfg.window} log points, not below ln(K) by {self.cfg.loss_margin:.0%} (ln(K) is "
                          f"what a uniform guess scores)"))
        if rank is not None and step >= self.start and rank < self.cfg.min_effective_rank:
            found.append(("low_rank", f"the teacher's CLS features have effective rank {rank:.2f} "
                                      f"(alarm below {self.cfg.min_effective_rank:g})"))
        if (knn is not None and self.knn0 is not None and step >= self.cfg.knn_after_fraction * self.total
                and knn <= self.knn0 + self.cfg.knn_min_gain):
            found.append(("knn_flat", f"monitor kNN top-1 is {knn:.1%}, not above its step-0 value "
                                      f"{self.knn0:.1%}"))
        alarms = []
        for code, what in found:
            if code in self.fired:
                continue
            self.fired.add(code)
            who = f" ({self.prefix.rstrip('/')})" if self.prefix else ""
            alarms.append(Alarm(code, step, f"step {step}{who}: {what}: {FIXES[code]}"))
        return alarms
