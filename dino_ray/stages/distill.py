"""Distill stage: several students taught by one frozen teacher (paper, sec. 5).

One teacher forward per batch feeds every student; students train without masking and without
stochastic depth, and the EMA of each student is its output.
"""

from __future__ import annotations

from dino_ray import storage
from dino_ray.stages.contract import StageContext, StageResult
from dino_ray.stages import TRAIN_STATE
from dino_ray.train.loop_spec import LoopSpec, StudentSpec
from dino_ray.stages.training import index_for, log_backbone, run_training, stage_summary

TEACHER_STAGES = ("highres", "pretrain")


def run(job, ctx: StageContext) -> StageResult:
    cfg = job.distill
    teacher = ctx.input(cfg.teacher, "backbone") if cfg.teacher in TEACHER_STAGES else cfg.teacher
    index = index_for("distill", cfg.data, ctx, None if cfg.data.source.uri else "curate")
    out = ctx.path("students")
    spec = LoopSpec(stage="distill", students=[StudentSpec(s.name, s.model) for s in cfg.students], loss=cfg.loss,
                    schedule=cfg.schedule, train=cfg.train, data=cfg.data, index_uri=index.uri, n_images=index.n_images,
                    seed=job.seed, output_dir=out, tracking_uri=ctx.tracking_uri, run_id=ctx.run_id,
                    teacher_from=teacher, masking=False, monitor=cfg.monitor)
    if len(spec.students) == 1:
        spec.output_dir = storage.join(out, cfg.students[0].name)
    value = run_training(spec, ctx)
    outputs = {f"student/{s.name}": storage.join(out, s.name) for s in cfg.students}
    for s in cfg.students:
        log_backbone(ctx, outputs[f"student/{s.name}"], s.name)
    return StageResult(outputs={**outputs, "train_state": ctx.path(TRAIN_STATE)},
                       summary={**stage_summary(value, index), "students": len(cfg.students),
                                "teacher": teacher})
