"""What a training stage hands each Ray Train worker: plain dataclasses, pickled by value."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class StudentSpec:
    name: str
    model: Any  # dino_ray.config.schema.ModelConfig


@dataclasses.dataclass
class LoopSpec:
    """Everything a worker needs; plain dataclasses so Ray pickles it by value."""

    stage: str
    students: list[StudentSpec]
    loss: Any  # LossConfig
    schedule: Any  # ScheduleConfig
    train: Any  # TrainConfig
    data: Any  # SSLDataConfig
    index_uri: str
    n_images: int
    seed: int
    output_dir: str  # exported models go here (rank 0)
    tracking_uri: str
    run_id: str
    init_from: str | None = None  # an SSL checkpoint dir (ssl_model.pth) to start the student from
    teacher_from: str | None = None  # distill: frozen teacher SSL checkpoint dir
    masking: bool = True  # distill students train without masking (paper, section 5)
    monitor: Any = None  # MonitorConfig: the labeled set measured while training (None/every 0: off)
