"""Resume a checkpoint on another number of workers (spot instances, autoscaling, a smaller debug cluster).

Under ZeRO-3 every rank saved its slice of each parameter: rank ``r`` of ``W`` holds elements
``[r * ceil(n / W), (r + 1) * ceil(n / W))`` of a parameter's ``n`` (the last slice zero-padded), for the
fp32 master weights and Adam's two moments (DeepSpeed's ``*_optim_states.pt``, one flat tensor per
parameter group in the order of the model states' ``param_shapes``) and for the EMA teacher (our
``ema_rank*.pt``). Rebuilding a parameter is concatenating its slices over the old ranks; a new rank then
takes its own slice for the new world size. DeepSpeed's universal-checkpoint tool does the same
conversion, but it unpickles the files (a bucket's checkpoint must not run code: ``checkpoint_io``) and
its ZeRO-3 loader did not continue the optimizer's trajectory in our measurements, so the slices are
read here with weights-only loads and written through DeepSpeed's ``safe_set_local_*`` API.

With ZeRO stage 0 nothing is sliced: DeepSpeed's checkpoint holds the whole model and optimizer, and
rank 0's EMA file the whole EMA.
"""

from __future__ import annotations

import glob
import math
import os
import re
from typing import Any

import torch

from dino_ray.train.checkpoint_io import load_weights_only

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state besides its step count


def ema_world_size(member_dir: str) -> int:
    """How many ranks wrote this member's checkpoint (each writes one ``ema_rank*.pt``)."""
    return len(glob.glob(os.path.join(member_dir, "ema_rank*.pt")))


def slice_for(full: torch.Tensor, rank: int, part: int) -> torch.Tensor:
    """Rank ``rank``'s ZeRO-3 slice of a flattened parameter: ``part`` elements, zero-padded at the end."""
    out = torch.zeros(part, dtype=full.dtype)
    piece = full[rank * part:(rank + 1) * part]
    out[:piece.numel()] = piece
    return out


def join_slices(slices: list[torch.Tensor], numel: int) -> torch.Tensor:
    """The flattened parameter from the slices of all old ranks, padding dropped."""
    return torch.cat([s.reshape(-1) for s in slices])[:numel]


def resharded_ema(member_dir: str, params: list[torch.nn.Parameter], rank: int, zero3: bool) -> dict[int, Any]:
    """This rank's EMA shards, rebuilt from the shards of a run with another world size."""
    old = ema_world_size(member_dir)
    if not zero3:  # replicated: rank 0's copy is the whole EMA
        return load_weights_only(os.path.join(member_dir, "ema_rank00000.pt"), map_location="cpu")
    shards = [load_weights_only(os.path.join(member_dir, f"ema_rank{r:05d}.pt"), map_location="cpu")
              for r in range(old)]
    return {i: slice_for(join_slices([s[i] for s in shards], p.ds_numel), rank, p.ds_tensor.numel())
            for i, p in enumerate(params)}


def _rank_files(state_dir: str) -> list[str]:
    files = glob.glob(os.path.join(state_dir, "zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    return sorted(files, key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(f)).group(1)))


def read_zero3(state_dir: str) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor, dict[str, Any]]:
    """Full fp32 weights and Adam moments by parameter name, the optimizer step and the client state of a
    ZeRO-3 checkpoint folder (DeepSpeed's ``<dir>/<tag>``), whatever world size wrote it."""
    files = _rank_files(state_dir)
    if not files:
        raise RuntimeError(f"{state_dir}: no ZeRO-3 optimizer states (zero_pp_rank_*_optim_states.pt) to reshard")
    model = load_weights_only(os.path.join(state_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt"), "cpu")
    shapes = [(name, shape) for group in model["param_shapes"] for name, shape in group.items()]
    flats: dict[str, list[torch.Tensor]] = {"fp32": [], **{k: [] for k in MOMENTS}}
    step = None
    for path in files:
        osd = load_weights_only(path, "cpu")["optimizer_state_dict"]
        states = osd["optimizer_state_dict"]["state"]
        flats["fp32"].append(torch.cat([t.detach().reshape(-1) for t in osd["fp32_flat_groups"]]))
        for key in MOMENTS:
            flats[key].append(torch.cat([states[g][key].reshape(-1) for g in sorted(states)]))
        step = states[min(states)]["step"]
    world = len(files)
    full: dict[str, dict[str, torch.Tensor]] = {}
    offset = 0
    for name, shape in shapes:
        numel = math.prod(shape)
        part = math.ceil(numel / world)
        full[name] = {key: join_slices([f[offset:offset + part] for f in per_rank], numel)
                      for key, per_rank in flats.items()}
        offset += part
    if offset != flats["fp32"][0].numel():
        raise RuntimeError(f"{state_dir}: the parameter shapes cover {offset} elements of each rank's "
                           f"{flats['fp32'][0].numel()}; not a ZeRO-3 checkpoint this code wrote")
    client = {k: v for k, v in model.items() if k in ("step", "objective", "skips")}
    return full, step, client


def load_zero3_resharded(engine: Any, state_dir: str, rank: int) -> dict[str, Any]:
    """Load a ZeRO-3 checkpoint written by any number of ranks into this rank's engine; returns the
    checkpoint's client state (what ``engine.load_checkpoint`` would have returned)."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    full, step, client = read_zero3(state_dir)
    optimizer = engine.optimizer
    for flat in optimizer.fp32_partitioned_groups_flat:  # AdamW creates its state at the first step
        state = optimizer.optimizer.state.setdefault(flat, {k: torch.zeros_like(flat) for k in MOMENTS})
        state["step"] = step.clone()
    params = dict(engine.module.named_parameters())
    missing = sorted(set(params) - set(full))
    if missing:
        raise RuntimeError(f"{state_dir}: the checkpoint has no state for {missing[:5]}")
    for name, p in params.items():
        part = p.ds_tensor.numel()
        weights = slice_for(full[name]["fp32"], rank, part).to(p.ds_tensor.device)
        safe_set_local_fp32_param(p, weights)
        p.ds_tensor.data.copy_(weights.to(p.ds_tensor.dtype))  # the working copy the forward gathers
        for key in MOMENTS:
            safe_set_local_optimizer_state(p, slice_for(full[name][key], rank, part).to(p.ds_tensor.device), key)
    return client
