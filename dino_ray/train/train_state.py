"""A training run's state on disk: checkpoints reported to Ray Train, their restore, the final export.

A checkpoint is one folder ``step_<9 digits>`` per report: each student's DeepSpeed state (with the step,
the loss's centering state and the stream's skip counts as client state), each rank's EMA shards, and
rank 0's metric rows not yet in MLflow. The export is consolidated and world-size independent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import TYPE_CHECKING

import torch

from dino_ray.train.engines import SSL_WEIGHTS, Member
from dino_ray.train.metric_buffer import PENDING_METRICS, MetricBuffer
from dino_ray.train.ranks import summed_over_ranks

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


def restore(ckpt_dir: str, members: list[Member], objectives: list, rank: int, skips: torch.Tensor) -> int:
    step = 0
    from dino_ray.train.checkpoint_io import use_weights_only_loads

    for m, objective in zip(members, objectives):
        use_weights_only_loads(m.engine)  # a bucket's checkpoint must not run code on the workers
        _, client = m.engine.load_checkpoint(os.path.join(ckpt_dir, m.name, "ds"), tag="state")
        step = int(client["step"])
        objective.load_state_dict(client["objective"])
        # The checkpoint holds the sum over ranks (with ZeRO < 3 only rank 0's client state is written, and
        # every rank reads it), so rank 0 alone takes it over and the others count from zero again.
        saved = (client.get("skips") or [])[:len(skips)] if rank == 0 else []  # older checkpoints have none
        skips[:len(saved)] = torch.tensor(saved, dtype=torch.int64)
        shard_file = os.path.join(ckpt_dir, m.name, f"ema_rank{rank:05d}.pt")
        if not os.path.exists(shard_file):
            raise RuntimeError(f"{shard_file} missing: resuming needs the same number of workers as the run that "
                               f"wrote the checkpoint")
        m.load_ema_shards(torch.load(shard_file, map_location="cpu", weights_only=True))
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
