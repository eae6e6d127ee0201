"""A training run's state on disk: checkpoints reported to Ray Train, their restore, the final export.

A checkpoint is one folder ``step_<9 digits>`` per report: each student's DeepSpeed state (with the step,
the loss's centering state and the stream's skip counts as client state), each rank's EMA shards, and
rank 0's metric rows not yet in MLflow. The export is consolidated and world-size independent.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from typing import TYPE_CHECKING

import torch

from dino_ray.train.engines import SSL_WEIGHTS, Member
from dino_ray.train.metric_buffer import PENDING_METRICS, MetricBuffer
from dino_ray.train.ranks import summed_over_ranks

log = logging.getLogger("dino_ray.train")

if TYPE_CHECKING:
    from dino_ray.train.loop_spec import LoopSpec


def save_and_report(step: int, members: list[Member], objectives: list, rank: int, metrics: dict,
                    pending: list[tuple[int, dict[str, float]]], skips: torch.Tensor, run_id: str,
                    device: torch.device) -> None:
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    total_skips = summed_over_ranks(skips, device).tolist()  # every rank saves at the same steps

    with tempfile.TemporaryDirectory(prefix="dino_ray_ckpt_") as tmp:
        for m, objective in zip(members, objectives):
            m.engine.save_checkpoint(os.path.join(tmp, m.name, "ds"), tag="state",
                                     client_state={"step": step, "objective": objective.state_dict(),
                                                   "skips": total_skips})
            torch.save(m.ema_shards(), os.path.join(tmp, m.name, f"ema_rank{rank:05d}.pt"))
        if rank == 0 and pending:
            with open(os.path.join(tmp, PENDING_METRICS), "w") as f:
                json.dump(MetricBuffer.payload(run_id, pending), f)
        if dist.is_initialized():
            dist.barrier()
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                         checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step_{step:09d}")


def checkpoint_step(path: str) -> int:
    """The step of a checkpoint this loop reported (its folder is ``step_<9 digits>``)."""
    name = os.path.basename(path.rstrip("/"))
    if not name.startswith("step_") or not name[5:].isdigit():
        raise RuntimeError(f"{path}: not a dino-ray training checkpoint (expected a step_<number> folder)")
    return int(name[5:])


def restore(ckpt_dir: str, members: list[Member], objectives: list, rank: int, world: int, zero_stage: int,
            skips: torch.Tensor) -> int:
    """Load a checkpoint into the engines; one written by another number of workers is resharded
    (:mod:`~dino_ray.train.reshard`: ZeRO-3 slices are rebuilt and re-cut, stage 0 state is whole)."""
    from dino_ray.train import reshard
    from dino_ray.train.checkpoint_io import load_weights_only, use_weights_only_loads

    step = 0
    for m, objective in zip(members, objectives):
        member_dir = os.path.join(ckpt_dir, m.name)
        saved_world = reshard.ema_world_size(member_dir)
        if saved_world == 0:
            raise RuntimeError(f"{member_dir}: no EMA shards (ema_rank*.pt); not a checkpoint of this loop")
        moved = saved_world != world
        if moved and zero_stage in (1, 2):
            raise RuntimeError(f"{ckpt_dir} was written by {saved_world} workers and this run has {world}: with "
                               f"ZeRO stage {zero_stage} resuming needs the same number of workers (stages 0 and "
                               "3 reshard; set train.zero_stage to 3, or train.scaling.num_workers back)")
        if moved and m.zero3:
            client = reshard.load_zero3_resharded(m.engine, os.path.join(member_dir, "ds", "state"), rank)
        else:
            use_weights_only_loads(m.engine)  # a bucket's checkpoint must not run code on the workers
            _, client = m.engine.load_checkpoint(os.path.join(member_dir, "ds"), tag="state")
        step = int(client["step"])
        objective.load_state_dict(client["objective"])
        # The checkpoint holds the sum over ranks (with ZeRO < 3 only rank 0's client state is written, and
        # every rank reads it), so rank 0 alone takes it over and the others count from zero again.
        saved = (client.get("skips") or [])[:len(skips)] if rank == 0 else []  # older checkpoints have none
        skips[:len(saved)] = torch.tensor(saved, dtype=torch.int64)
        if moved:
            if rank == 0:
                log.info("%s: resharded from %d workers to %d", member_dir, saved_world, world)
            m.load_ema_shards(reshard.resharded_ema(member_dir, [t for t, _ in m.pairs], rank, m.zero3))
        else:
            m.load_ema_shards(load_weights_only(os.path.join(member_dir, f"ema_rank{rank:05d}.pt"), "cpu"))
    return step


def export(spec: LoopSpec, members: list[Member], rank: int) -> None:
    """Consolidated, world-size-independent outputs: the EMA backbone (+ heads) of every student."""
    import io

    from dino_ray import backbone_io, storage

    for m in members:
        state = m.full_state(m.ema.module)
        if rank != 0:
            continue
        out = spec.output_dir if len(members) == 1 else storage.join(spec.output_dir, m.name)
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        vit = dataclasses.asdict(m.ema.module.backbone.config)
        backbone_io.save_state_dict(backbone, vit, out, extra={"stage": spec.stage, "student": m.name,
                                                               "steps": spec.schedule.total_iters})
        buf = io.BytesIO()
        torch.save(state, buf)
        storage.write_bytes(storage.join(out, SSL_WEIGHTS), buf.getvalue())
