"""Memory and time planning of a job's training stages before anything runs (``dino-ray plan``).

``trace.py`` measures one step of a model on PyTorch's meta device, ``memory.py`` turns that and the
engine layout into per-worker memory and step time, ``report.py`` renders the table. No Ray here.
"""

from __future__ import annotations

import re
from typing import Any

from dino_ray.plan.memory import GiB, Hardware, StagePlan, plan_job

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str | float | int) -> int:
    """``80GB`` / ``80GiB`` / ``80`` (GiB) -> bytes. GPU vendors' "80GB" means 80 GiB of HBM (an A100-80GB
    has 81,920 MiB), so GB is read as GiB here, as nvidia-smi shows it."""
    if isinstance(text, (int, float)):
        return int(float(text) * GiB)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 80GB, 40GiB or 16000MiB")
    if unit in ("", "gb"):
        unit = "gib"
    if unit in ("mb", "tb", "kb"):
        unit = unit[0] + "ib"
    return int(float(m.group(1)) * _UNITS[unit])


def check_job_fits(job: Any, source: str) -> list[StagePlan]:
    """The validation a job gets when a training stage declares ``train.scaling.gpu_memory``: plan every
    such stage on its own workers and raise ConfigError with the table if one does not fit."""
    from dino_ray.config.typed import ConfigError
    from dino_ray.plan.report import render

    failed, rendered, everything = [], [], []
    for stage in ("pretrain", "highres", "distill"):
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
