"""The Ray Train loop shared by pretrain, high-res and distill (``TorchTrainer(train_loop, ...)``).

One function, ``train_loop``, runs on every Ray Train worker. It trains one or more students:

* pretrain / high-res: one student; its EMA is the teacher that produces the targets (DINOv2).
* distill: several students taught by one frozen teacher from a single teacher forward per batch;
  the EMA of each student is what gets exported (paper, section 5).

Its parts: the engines and the ZeRO-3 EMA (:mod:`~dino_ray.train.engines`), checkpoints and export
(:mod:`~dino_ray.train.train_state`), rank 0's metric buffer (:mod:`~dino_ray.train.metric_buffer`),
what ranks agree on (:mod:`~dino_ray.train.ranks`), the monitor and alarms (:mod:`~dino_ray.train.watch`)
and the input stream (:mod:`dino_ray.data.ssl_stream`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import torch

from dino_ray.train.loop_spec import LoopSpec
from dino_ray.train.engines import (Member, build_member, build_ssl_model, disable_jit_ops, frozen_teacher,
                                    inference_engine, load_ssl_state, worker_device)
from dino_ray.train.metric_buffer import PENDING_METRICS, MetricBuffer
from dino_ray.train.memory_probe import StepMemory
from dino_ray.train.ranks import all_finite, gathered_over_ranks, mean_over_ranks, summed_over_ranks
from dino_ray.train.train_state import checkpoint_step, export, restore, save_and_report

log = logging.getLogger("dino_ray.train")


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker entry point (``TorchTrainer(train_loop, train_loop_config={"spec": spec})``)."""
    import ray.train
    from ray.train import get_context

    from dino_ray.data.multicrop import normalize_batch
    from dino_ray.progress import Reporter
    from dino_ray.data.ssl_stream import StreamSpec, ssl_batches, started_early
    from dino_ray.train.watch import TrainingWatch, prepare_monitor
    from dino_ray.train.step import student_loss, teacher_output, update
    from dino_ray.train.schedules import TrainSchedules
    from dino_ray.train.ssl_arch import SSLObjective

    spec: LoopSpec = config["spec"]
    marks = {"worker_started_at": time.time()}  # start-up phases, for the stage's overhead breakdown
    ctx = get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device()
    from dino_ray.train import precision as mixed

    precision = mixed.resolve(spec.train.precision, device)
    if rank == 0:
        log.info("%s: %s", spec.stage, precision.reason)
    zero3 = spec.train.zero_stage == 3
    # DeepSpeed's bf16 mode (bf16 weights, fp32 master copy) on GPU under ZeRO-3 only, where the EMA reads
    # each rank's fp32 master slice. Everywhere else the engine stays fp32 and bf16 autocast runs the
    # forward/backward: at stages 0-2 DeepSpeed's BF16 optimizer keeps the fp32 masters partitioned, so the
    # replicated EMA would average bf16 weights; DeepSpeed's CPU path has no bf16 optimizer.
    bf16 = device.type == "cuda" and precision.name == "bf16" and zero3
    if spec.train.threads_per_worker:
        torch.set_num_threads(spec.train.threads_per_worker)
    disable_jit_ops()
    distill = spec.teacher_from is not None

    # The input stream starts first, so Ray Data's actors start and crop the first batches while the
    # models and DeepSpeed engines are built (the resume step is in the checkpoint's folder name).
    checkpoint = ray.train.get_checkpoint()
    start_step = checkpoint_step(checkpoint.path) if checkpoint is not None else 0
    stream = StreamSpec(index_uri=spec.index_uri, n_images=spec.n_images, seed=spec.seed,
                        batch_size=spec.train.batch_size_per_worker, world_size=world, rank=rank,
                        start_step=start_step, total_steps=spec.schedule.total_iters)
    batches = started_early(ssl_batches(stream, spec.data, num_actors=spec.train.data_workers,
                                        cpus_per_actor=spec.train.data_cpus))
    monitor_ready = prepare_monitor(spec, rank)  # decoded on a thread while the engines are built

    # memory before any model exists: what the planner's per-worker figures sit on (dino-ray plan)
    memory = StepMemory(device)
    memory.before_models()
    members: list[Member] = []
    for st in spec.students:
        torch.manual_seed(spec.seed)  # identical init on every rank and for every world size
        student = build_ssl_model(st.model, spec.loss, drop_path=not distill)
        student.backbone.set_grad_checkpointing(spec.train.activation_checkpointing)
        if spec.init_from:
            load_ssl_state(student, spec.init_from)
        members.append(build_member(st.name, student, spec, world, device, bf16))

    if distill:
        teacher_module = frozen_teacher(spec.teacher_from, spec.loss)
        for p in teacher_module.parameters():
            p.requires_grad_(False)
        teacher = inference_engine(teacher_module, spec, world, device)
        teacher.module.eval()
    else:
        teacher = members[0].ema

    marks["engines_ready_at"] = time.time()
    memory.start()
    objectives = [SSLObjective(spec.loss).to(device) for _ in members]
    global_batch = spec.train.batch_size_per_worker * world
    schedules = TrainSchedules.from_config(spec.schedule, global_batch)
    total = spec.schedule.total_iters

    from dino_ray.data.decode import SKIP_REASONS

    skips = torch.zeros(len(SKIP_REASONS), dtype=torch.int64)  # images the stream replaced, by SKIP_REASONS
    buffer = MetricBuffer(spec.tracking_uri, spec.run_id, enabled=rank == 0)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            restored = restore(d, members, objectives, rank, world, spec.train.zero_stage, skips)
            if restored != start_step:
                raise RuntimeError(f"checkpoint {checkpoint.path} holds step {restored}, its name says {start_step}")
            pending = os.path.join(d, PENDING_METRICS)
            if os.path.exists(pending):
                with open(pending) as f:
                    saved = json.load(f)
                # rows of this stage's MLflow run only: a run continued under a new config
                # (--resume-from-checkpoint) is a new MLflow run, and the old run's rows belong to the old run
                if isinstance(saved, list) or saved.get("run_id") == spec.run_id:
                    rows = saved if isinstance(saved, list) else saved["rows"]
                    buffer.restore([(int(step), m) for step, m in rows])
        buffer.expect_logged()  # the stopped attempt may have logged steps after this checkpoint
        log.info("rank %d resumed at step %d", rank, start_step)

    n_global, n_local = spec.data.crops.global_crops_number, spec.data.crops.local_crops_number
    autocast = mixed.autocast(precision, device)
    step = start_step
    watch = TrainingWatch(spec, [m.name for m in members], rank, world, autocast, start_step, monitor_ready)

    def monitored() -> list[tuple[str, torch.nn.Module]]:
        return [(m.name, m.ema.module.backbone) for m in members]

    if watch.is_monitor_step(step):  # the untrained model: where the curves start
        row = watch.measure(step, monitored(), teacher.module.backbone if distill else None)
        buffer.add(step, row)
        watch.verdict(step, row, device)
    marks["loop_ready_at"] = time.time()
    t_last, imgs_since = time.time(), 0
    first_step_at, first_step = None, start_step  # stage overhead and steady-state speed, for the summary
    monitor_s = 0.0  # time spent on monitor points after the first step (part of the steady-state time)
    progress = Reporter(spec.stage.replace("_", " "), total, "steps") if rank == 0 else None
    step_peak = 0  # stays 0 when a resume starts at the last step
    for batch in batches:
        if step >= total:
            break
        marks.setdefault("first_batch_at", time.time())
        skips += batch.pop("skips").sum(0)
        crops = normalize_batch({k: v.to(device, non_blocking=True) for k, v in batch.items()}, spec.data.crops)
        masks = crops["masks"] if spec.masking else torch.ones_like(crops["masks"])
        apply_masks = spec.masking
        values = schedules.values(step)
        t_out = teacher_output(teacher, crops, masks, autocast)
        metrics: dict[str, float] = dict(values)
        is_log = (step + 1) % spec.train.log_every == 0 or step + 1 == total
        for m, objective in zip(members, objectives):
            targets, s_out, loss, terms = student_loss(m, objective, t_out, crops, masks, values, apply_masks,
                                                       n_global, n_local, autocast)
            if not all_finite(loss):
                buffer.close()  # steps before this one are real; the bad one is not logged
                return {"final_step": step, "error": (
                    f"non-finite loss at step {step} (student {m.name}); training stopped and the last good "
                    f"checkpoint is kept. Lower schedule.base_lr or raise schedule.warmup_iters.")}
            grad_norms = update(m, loss, values["mom"])
            prefix = "" if len(members) == 1 else f"{m.name}/"
            metrics.update({prefix + k: v for k, v in terms.items()})
            if is_log:  # the exported model's features: the EMA teacher's in pretrain, the student's in distill
                cls_tokens = s_out["global_cls_tokens"] if distill else t_out["global_cls_tokens"]
                metrics.update(watch.diagnostics(m.name, targets, cls_tokens, terms))
                metrics.update({f"{prefix}grad_norm/{part}": float(n) for part, n in grad_norms.items()})
        step += 1
        if step == total:
            step_peak = memory.peak()  # the steps' high-water mark, before the last checkpoint and the export
        imgs_since += global_batch
        if first_step_at is None:
            first_step_at, first_step = time.time(), step
        if progress is not None:  # throttled and fire-and-forget: costs the step nothing
            progress.update(step, **{k.replace("total_loss", "loss"): v for k, v in metrics.items()
                                     if k.endswith("total_loss")})
        row: dict[str, float] = {}
        if is_log:
            metrics = mean_over_ranks(metrics, device)
            now = time.time()
            metrics["images_per_s"] = imgs_since / max(now - t_last, 1e-9)
            if device.type == "cuda":
                metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            t_last, imgs_since = now, 0
            row.update(metrics)
        at_monitor = watch.is_monitor_step(step)
        if at_monitor:
            t_monitor = time.time()
            row.update(watch.measure(step, monitored()))
            row["monitor/seconds"] = time.time() - t_monitor
            monitor_s += row["monitor/seconds"]
        if row:
            buffer.add(step, row)
        if (is_log or at_monitor) and watch.verdict(step, row, device):
            save_and_report(step, members, objectives, rank, {"step": step, **row}, buffer.rows, skips,
                            spec.run_id, device)
            watch.close()
            buffer.close()
            return {"final_step": step, "alarms": watch.summary(), "collapse_stop": (
                f"stopped at step {step} by a collapse alarm (train.on_collapse: stop); the checkpoint of this "
                f"step is kept under the stage's ray_train folder. "
                + " | ".join(a["message"] for a in watch.summary()))}
        if step % spec.train.checkpoint_every == 0 or step == total:
            save_and_report(step, members, objectives, rank, {"step": step, **metrics}, buffer.rows, skips,
                            spec.run_id, device)
            buffer.flush()
    if step < total:
        raise RuntimeError(f"the input stream ended at step {step} of {total}")

    memory_by_rank = gathered_over_ranks([memory.before, step_peak], device)
    steady = time.time() - (first_step_at or time.time())
    skipped = {r: n for r, n in zip(SKIP_REASONS, summed_over_ranks(skips, device).tolist()) if n}
    export(spec, members, rank)
    watch.close()  # the monitor pictures still queued for MLflow
    buffer.close()  # rank 0: a longer bounded wait for an unreachable MLflow, then the rows go to a file
    return {"final_step": step, "resumed_at_step": start_step, "precision": precision.name,
            "precision_reason": precision.reason,
            "first_step_at": first_step_at, "startup_marks": marks, "alarms": watch.summary(), "monitor_s": monitor_s, "steady_s": steady,
            "skipped_by_reason": skipped, "memory_by_rank": memory_by_rank,
            "images_per_s": (step - first_step) * global_batch / steady if steady > 0 else None}
