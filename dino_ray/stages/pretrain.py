"""Pretrain stage: DINOv2 self-supervised training of a ViT from scratch on the curated images."""

from __future__ import annotations

from dino_ray.stages.contract import StageContext, StageResult
from dino_ray.stages import TRAIN_STATE
from dino_ray.train.loop_spec import LoopSpec, StudentSpec
from dino_ray.stages.training import index_for, log_backbone, run_training, stage_summary


def run(job, ctx: StageContext) -> StageResult:
    cfg = job.pretrain
    index = index_for("pretrain", cfg.data, ctx, None if cfg.data.source.uri else "curate")
    out = ctx.path("teacher")
    spec = LoopSpec(stage="pretrain", students=[StudentSpec("teacher", cfg.model)], loss=cfg.loss,
                    schedule=cfg.schedule, train=cfg.train, data=cfg.data, index_uri=index.uri, n_images=index.n_images,
                    seed=job.seed, output_dir=out, tracking_uri=ctx.tracking_uri, run_id=ctx.run_id,
                    monitor=cfg.monitor)
    value = run_training(spec, ctx)
    log_backbone(ctx, out)
    return StageResult(outputs={"backbone": out, "train_state": ctx.path(TRAIN_STATE)},
                       summary=stage_summary(value, index))
