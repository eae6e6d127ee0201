"""High-res stage: a short continuation of the pretrained model at 518 px (paper, sec. 4 and app. B.2).

The student and its EMA start from the pretrain teacher (backbone and heads); the position embedding
is interpolated to ``highres.img_size`` and training continues with bigger crops on its own schedule.
"""

from __future__ import annotations

import dataclasses

from dino_ray.stages.contract import StageContext, StageResult
from dino_ray.stages import TRAIN_STATE
from dino_ray.train.loop_spec import LoopSpec, StudentSpec
from dino_ray.stages.training import index_for, log_backbone, run_training, stage_summary


def run(job, ctx: StageContext) -> StageResult:
    cfg = job.highres
    model = dataclasses.replace(job.pretrain.model, img_size=cfg.img_size)
    index = index_for("highres", cfg.data, ctx, None if cfg.data.source.uri else "curate")
    out = ctx.path("teacher")
    spec = LoopSpec(stage="highres", students=[StudentSpec("teacher", model)], loss=cfg.loss, schedule=cfg.schedule,
                    train=cfg.train, data=cfg.data, index_uri=index.uri, n_images=index.n_images, seed=job.seed,
                    output_dir=out, tracking_uri=ctx.tracking_uri, run_id=ctx.run_id,
                    init_from=ctx.input("pretrain", "backbone"), monitor=cfg.monitor)
    value = run_training(spec, ctx)
    log_backbone(ctx, out)
    return StageResult(outputs={"backbone": out, "train_state": ctx.path(TRAIN_STATE)},
                       summary={**stage_summary(value, index), "img_size": cfg.img_size})
