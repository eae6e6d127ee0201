"""Memory and time planning of a job's training stages before anything runs (``dino-ray plan``).

``trace.py`` measures one step of a model on PyTorch's meta device, ``memory.py`` turns that and the
engine layout into per-worker memory and step time, ``report.py`` renders the table. No Ray here.
"""

from __future__ import annotations

from typing import Any

from dino_ray.config.schema import TRAINING_STAGES
from dino_ray.config.units import parse_bytes
from dino_ray.plan.memory import Hardware, StagePlan, plan_job

__all__ = ["Hardware", "StagePlan", "check_job_fits", "parse_bytes", "plan_job"]


def check_job_fits(job: Any, source: str) -> list[StagePlan]:
    """The validation a job gets when a training stage declares ``train.scaling.gpu_memory``: plan every
    such stage on its own workers and raise ConfigError with the table if one does not fit."""
    from dino_ray.config.typed import ConfigError
    from dino_ray.plan.report import render

    failed, rendered, everything = [], [], []
    for stage in TRAINING_STAGES:
        if stage not in job.stages:
            continue
        scaling = getattr(job, stage).train.scaling
        if not scaling.gpu_memory:
            continue
        hw = Hardware(workers=scaling.num_workers, memory_bytes=parse_bytes(scaling.gpu_memory))
        plans = plan_job(job, hw, only=stage)
        everything += plans
        rendered.append(render(plans, hw, source))
        failed += [p for p in plans if not p.fits]
    if failed:
        raise ConfigError(f"{', '.join(p.stage for p in failed)} does not fit in "
                          f"train.scaling.gpu_memory:\n" + "\n\n".join(rendered))
    return everything
