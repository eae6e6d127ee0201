"""Driver side of the training stages: build the index, run the TorchTrainer, check the result.

The Ray Train run has a fixed name and lives under the stage's output folder, so a restarted worker
group (``FailureConfig``) and a re-run of the stage (a retried ``ray job``, a second ``dino-ray run``)
both continue from the last reported checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from dino_ray import storage
from dino_ray.stages.contract import NonRetryableError, StageContext
from dino_ray.stages import TRAIN_STATE
from dino_ray.data.ssl_stream import INDEX_FILE, write_index
from dino_ray.train.loop import train_loop
from dino_ray.train.loop_spec import LoopSpec

log = logging.getLogger("dino_ray.stages")


@dataclasses.dataclass(frozen=True)
class TrainingIndex:
    """The training images as listed once on the driver, and what the listing could not list."""

    uri: str
    n_images: int
    unlisted: tuple[tuple[str, str], ...] = ()


def build_index(source: Any, index_uri: str) -> TrainingIndex:
    """List the training images once (on the driver) in a fixed order every worker agrees on."""
    from dino_ray.data.sources import list_images

    unlisted: list[tuple[str, str]] = []
    refs = list_images(source, unlisted=unlisted)
    if not refs:
        raise ValueError(f"no images found at {source.uri}")
    n = write_index([r.uri for r in refs], index_uri, ids=[r.id for r in refs])
    return TrainingIndex(index_uri, n, tuple(unlisted))


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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_resumable(ctx, spec.stage, spec.schedule.total_iters)
    ctx.ensure_ray()
    sc = spec.train.scaling
    gpu = use_gpu(sc.use_gpu)
    resources = {"CPU": sc.cpus_per_worker}
    if gpu:
        resources["GPU"] = sc.gpus_per_worker
    fs, path = storage.filesystem(ctx.path(TRAIN_STATE))
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
    from dino_ray import tracking

    if value.get("precision"):
        tracking.set_tags(ctx.tracking_uri, ctx.run_id, {"dino_ray.precision": value["precision"],
                                                         "dino_ray.precision_reason": value["precision_reason"]})
        log.info("%s: %s", spec.stage, value["precision_reason"])
    for alarm in value.get("alarms") or []:  # the console showed them live; this is for the log
        log.info("%s collapse alarm: %s", spec.stage, alarm["message"])
    if value.get("collapse_stop"):
        raise CollapseError(f"{spec.stage}: {value['collapse_stop']}")
    if value.get("error"):
        raise NonFiniteLossError(value["error"])
    value["timing"] = _timing(value, ctx)
    tracking.log_metrics(ctx.tracking_uri, ctx.run_id, value["timing"])
    if value.get("final_step") != spec.schedule.total_iters:
        raise RuntimeError(f"{spec.stage}: training ended at step {value.get('final_step')} of "
                           f"{spec.schedule.total_iters}")
    return value


class CollapseError(NonRetryableError):
    """A training stage stopped by a collapse alarm (``train.on_collapse: stop``)."""


class NonFiniteLossError(NonRetryableError, FloatingPointError):
    """The loss became NaN or infinite; the same config would diverge the same way."""


def check_resumable(ctx: StageContext, stage: str, total_iters: int) -> None:
    """A kept checkpoint (a retry, or ``--resume-from-checkpoint``) must not lie past the schedule's end."""
    from dino_ray.train.train_state import checkpoint_step

    names = [u.rstrip("/").rsplit("/", 1)[-1] for u in storage.list_children(storage.join(ctx.path(TRAIN_STATE),
                                                                                          stage))]
    steps = [checkpoint_step(n) for n in names if n.startswith("step_") and n[5:].isdigit()]
    if steps and max(steps) > total_iters:
        raise NonRetryableError(
            f"{stage}: the checkpoint to resume from is at step {max(steps)}, past schedule.total_iters="
            f"{total_iters}; raise total_iters, or run without --resume-from-checkpoint to start over")


def stage_summary(value: dict[str, Any], index: TrainingIndex) -> dict[str, Any]:
    """The summary every training stage reports: timing, collapse alarms, and the data it could not use
    (files the listing could not list, images the stream skipped, by reason)."""
    from dino_ray.data.sources import unlisted_summary

    alarms = value.get("alarms") or []
    skipped = value.get("skipped_by_reason") or {}
    # resumed_at_step: the checkpoint step the finishing attempt started from (a worker restart or
    # --resume-from-checkpoint), 0 when it ran from the start
    out = {**value["timing"], "images": index.n_images, "steps": value["final_step"],
           "resumed_at_step": value.get("resumed_at_step", 0),
           "collapse_alarms": len(alarms), **unlisted_summary(index.unlisted),
           "skipped_images": sum(skipped.values()), **({"skipped_by_reason": skipped} if skipped else {})}
    if alarms:
        out["alarm_codes"] = ",".join(a["code"] for a in alarms)
    if skipped:
        log.warning("training stream skipped %d images: %s (the first are named in the data actors' log)",
                    sum(skipped.values()), skipped)
    return out


def _timing(value: dict[str, Any], ctx: StageContext) -> dict[str, float]:
    """Stage start -> first optimizer step (Ray, data pipeline and DeepSpeed start-up), the steady
    training speed after it, and the monitor's share of that steady time: where a short run's wall-clock
    went."""
    timing = {}
    if value.get("first_step_at"):
        timing["stage_start_to_first_step_s"] = round(value["first_step_at"] - ctx.started_at, 2)
        # where that went, phase by phase (rank 0's clock; one machine's or NTP-synced on a cluster)
        marks = {**(value.get("startup_marks") or {}), "first_step_at": value["first_step_at"]}
        phases = [("driver_and_worker_group", "worker_started_at"), ("models_and_deepspeed", "engines_ready_at"),
                  ("restore_and_step0_monitor", "loop_ready_at"), ("first_batch_wait", "first_batch_at"),
                  ("first_step", "first_step_at")]
        last = ctx.started_at
        for name, key in phases:
            if marks.get(key):
                timing[f"startup/{name}_s"] = round(marks[key] - last, 2)
                last = marks[key]
    if value.get("images_per_s"):
        timing["train_images_per_s"] = round(value["images_per_s"], 2)
    for rank, (before, peak) in enumerate(value.get("memory_by_rank") or []):
        # per worker: the high-water mark, and what the process held before the models were built
        timing[f"memory/rank{rank}_peak_gb"] = round(peak / 2 ** 30, 3)
        timing[f"memory/rank{rank}_before_models_gb"] = round(before / 2 ** 30, 3)
    if value.get("monitor_s") and value.get("steady_s"):
        # The monitor's cost: its share of the steady-state time, which train_images_per_s already pays.
        timing["monitor_s"] = round(value["monitor_s"], 2)
        timing["monitor_share"] = round(value["monitor_s"] / value["steady_s"], 4)
    return timing


def log_backbone(ctx: StageContext, out_dir: str, student: str | None = None) -> None:
    """Log an exported backbone as an MLflow model of the stage's run and register it as a new version of
    ``<experiment>-<stage>`` (``<experiment>-distill-<student>`` for a distilled student)."""
    from dino_ray import model_registry

    name = model_registry.registered_name(ctx.job.tracking.experiment, ctx.stage, student)
    tags = {"dino_ray.stage": ctx.stage, **({"dino_ray.student": student} if student else {})}
    model_registry.log_and_register(ctx.tracking_uri, ctx.run_id, out_dir, name, tags,
                                    max_bytes=int(ctx.job.tracking.max_model_gb * 2**30))


def index_for(stage: str, data_cfg: Any, ctx: StageContext, upstream: str | None) -> TrainingIndex:
    return build_index(training_source(stage, data_cfg, ctx, upstream), ctx.path(INDEX_FILE))
