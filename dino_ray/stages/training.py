"""Driver side of the training stages: build the index, run the TorchTrainer, check the result.

The Ray Train run has a fixed name and lives under the stage's output folder, so a restarted worker
group (``FailureConfig``) and a re-run of the stage (a retried ``ray job``, a second ``dino-ray run``)
both continue from the last reported checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

from dino_ray import storage
from dino_ray.pipeline import StageContext
from dino_ray.stages.ssl_stream import INDEX_FILE, write_index
from dino_ray.stages.train_loop import LoopSpec, train_loop

log = logging.getLogger("dino_ray.stages")


def build_index(source: Any, index_uri: str) -> int:
    """List the training images once (on the driver) in a fixed order every worker agrees on."""
    from dino_ray.data.sources import list_images

    refs = list_images(source)
    if not refs:
        raise ValueError(f"no images found at {source.uri}")
    return write_index([r.uri for r in refs], index_uri, ids=[r.id for r in refs])


def training_source(stage: str, data_cfg: Any, ctx: StageContext, upstream: str | None) -> Any:
    """The configured source, or the upstream stage's curated manifest when none is configured."""
    import dataclasses

    if data_cfg.source.uri:
        return data_cfg.source
    if upstream is None:
        raise ValueError(f"{stage}.data.source.uri is empty and there is no upstream stage to read")
    return dataclasses.replace(data_cfg.source, uri=ctx.input(upstream, "manifest"), format="manifest")


def use_gpu(setting: str) -> bool:
    if setting in ("true", "false"):
        return setting == "true"
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def run_training(spec: LoopSpec, ctx: StageContext) -> dict[str, Any]:
    """Run ``train_loop`` on a Ray Train worker group; returns rank 0's return value."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ctx.ensure_ray()
    sc = spec.train.scaling
    gpu = use_gpu(sc.use_gpu)
    resources = {"CPU": sc.cpus_per_worker}
    if gpu:
        resources["GPU"] = sc.gpus_per_worker
    fs, path = storage.filesystem(ctx.path("ray_train"))
    if not storage.is_remote(ctx.stage_dir):
        fs = None
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=gpu, resources_per_worker=resources,
                                     placement_strategy=sc.placement_strategy,
                                     accelerator_type=sc.accelerator_type if gpu else None),
        run_config=RunConfig(
            name=spec.stage,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=spec.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints,
                                               checkpoint_score_attribute="step", checkpoint_score_order="max"),
        ),
    )
    result = trainer.fit()
    value = result.return_value or {}
    if value.get("error"):
        raise FloatingPointError(value["error"])
    if value.get("final_step") != spec.schedule.total_iters:
        raise RuntimeError(f"{spec.stage}: training ended at step {value.get('final_step')} of "
                           f"{spec.schedule.total_iters}")
    return value


MAX_ARTIFACT_BYTES = 256 * 2**20


def log_backbone(ctx: StageContext, out_dir: str, name: str) -> None:
    """Attach an exported backbone to the stage's MLflow run (a pointer file when it is too big to copy)."""
    from dino_ray import backbone_io, tracking

    info = backbone_io.weights_info(out_dir)
    if info is None or info.size > MAX_ARTIFACT_BYTES:
        tracking.log_text(ctx.tracking_uri, ctx.run_id, f"{out_dir}\n", f"backbones/{name}/LOCATION.txt")
        return
    for file in (backbone_io.WEIGHTS, backbone_io.META):
        tracking.log_bytes(ctx.tracking_uri, ctx.run_id, storage.read_bytes(storage.join(out_dir, file)), file,
                           f"backbones/{name}")


def index_for(stage: str, data_cfg: Any, ctx: StageContext, upstream: str | None) -> tuple[str, int]:
    index_uri = ctx.path(INDEX_FILE)
    n = build_index(training_source(stage, data_cfg, ctx, upstream), index_uri)
    return index_uri, n
