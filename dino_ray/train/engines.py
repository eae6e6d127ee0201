"""The DeepSpeed engines of a training worker: students, their EMA, the frozen teacher.

**Teacher and EMA under ZeRO-3.** Every EMA model is a DeepSpeed engine *without an optimizer*, built
from a module with the same parameter shapes as its student and the same ZeRO config, so DeepSpeed
partitions both identically: rank r owns the same slice of every parameter in both. The EMA update
then touches only local slices (``ds_tensor`` of the EMA, the fp32 master slice of the student):
no communication and no gather of the full model per step. Parameters are gathered only for
forwards (as for the student) and once per export. With ZeRO stage < 3 parameters are replicated and
the same update runs on full tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dino_ray.train.loop_spec import LoopSpec

SSL_WEIGHTS = "ssl_model.pth"  # backbone + heads of the teacher, for high-res and distillation


def worker_device() -> torch.device:
    if torch.cuda.is_available():
        from ray.train import get_context

        return torch.device("cuda", get_context().get_local_rank())
    return torch.device("cpu")


def ds_config(spec: LoopSpec, world: int, bf16: bool, with_optimizer: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": spec.train.zero_stage}
    if spec.train.zero_stage == 3:
        # the gradient reduce bucket, one of the working buffers `dino-ray plan` counts (DeepSpeed's default 5e8)
        zero["reduce_bucket_size"] = spec.train.zero3_reduce_bucket_size
        if not with_optimizer:
            # EMA engines are updated shard-locally, so none of their parameters may stay gathered between
            # forwards (ZeRO-3 keeps small ones resident by default): threshold 0 for them.
            zero["stage3_param_persistence_threshold"] = 0
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.train.batch_size_per_worker,
        "train_batch_size": spec.train.batch_size_per_worker * world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16 and with_optimizer},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # Off: DeepSpeed's clipping is one norm over the whole student (and 1.0 when the key is absent); the
        # recipe clips each part on its own (train/clipping.py), which Member.clip does before the step.
        "gradient_clipping": 0.0,
    }
    return cfg


def disable_jit_ops() -> None:
    """DeepSpeed's CPU comm op needs a C++ toolchain at run time; gloo collectives do not need it."""
    import importlib

    ops = importlib.import_module("deepspeed.ops")
    compat = getattr(ops, "__compatible_ops__", None)
    if isinstance(compat, dict):
        compat["deepspeed_shm_comm"] = False


def build_ssl_model(model_cfg: Any, loss_cfg: Any, drop_path: bool) -> torch.nn.Module:
    from dino_ray.models import build_backbone
    from dino_ray.train.ssl_arch import SSLModel

    kwargs = model_cfg.backbone_kwargs()
    if not drop_path:
        kwargs["drop_path_rate"] = 0.0
    return SSLModel.build(build_backbone(model_cfg.arch, **kwargs), loss_cfg)


def load_ssl_state(model: torch.nn.Module, ckpt_dir: str) -> None:
    """Load backbone + heads saved by a previous stage, resizing the position embedding if needed."""
    import io

    from dino_ray import storage
    from dino_ray.models import interpolate_pos_embed_state_dict

    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(ckpt_dir, SSL_WEIGHTS))), map_location="cpu",
                       weights_only=True)
    bb = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    cfg = model.backbone.config
    if bb["pos_embed"].shape != model.backbone.pos_embed.shape:
        bb = interpolate_pos_embed_state_dict(bb, cfg.img_size, cfg.patch_size)
    state.update({f"backbone.{k}": v for k, v in bb.items()})
    model.load_state_dict(state, strict=True)


def frozen_teacher(teacher_dir: str, loss_cfg: Any) -> torch.nn.Module:
    """The frozen SSL teacher (backbone + heads) exported by an earlier stage."""
    from dino_ray import backbone_io
    from dino_ray.models import DinoVisionTransformer, ViTConfig
    from dino_ray.train.ssl_arch import SSLModel

    vit = {**backbone_io.read_meta(teacher_dir)["vit"], "drop_path_rate": 0.0}
    model = SSLModel.build(DinoVisionTransformer(ViTConfig(**vit)), loss_cfg)
    load_ssl_state(model, teacher_dir)
    return model


def inference_engine(module: torch.nn.Module, spec: LoopSpec, world: int, device: torch.device):
    """A DeepSpeed engine without optimizer, partitioned like the students under ZeRO-3."""
    import deepspeed

    if spec.train.zero_stage == 3:
        engine, _, _, _ = deepspeed.initialize(model=module, config=ds_config(spec, world, False, False))
        return engine
    return Plain(module.to(device))


def build_member(name: str, student: torch.nn.Module, spec: LoopSpec, world: int, device: torch.device,
                 bf16: bool) -> Member:
    """A student's DeepSpeed engine (AdamW over the recipe's parameter groups) and its EMA engine.

    The EMA starts as an exact copy of the student (the DINO teacher's initialisation). One builder for the
    training loop and the step benchmark, so the benchmark times the engine the stage trains with.
    """
    import copy

    import deepspeed

    from dino_ray.train.param_groups import build_param_groups

    ema = copy.deepcopy(student).requires_grad_(False)
    sch = spec.schedule
    optimizer = torch.optim.AdamW(build_param_groups(student, sch.layerwise_decay, sch.patch_embed_lr_mult,
                                                     sch.weight_decay), betas=(0.9, 0.999))
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer,
                                           config=ds_config(spec, world, bf16, with_optimizer=True))
    ema_engine = inference_engine(ema, spec, world, device)
    ema_engine.module.eval()
    return Member(name, engine, ema_engine, spec.train.zero_stage == 3, bf16, sch.clip_grad)


class Plain:
    """Stage < 3: the EMA/teacher is an ordinary replicated module."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


class Member:
    """A student engine and its EMA engine (the EMA is the teacher in pretrain, the output in distill)."""

    def __init__(self, name: str, engine: Any, ema: Any, zero3: bool, bf16: bool, clip_grad: float):
        from dino_ray.train.clipping import PartClipper, parts_of

        self.name, self.engine, self.ema, self.zero3 = name, engine, ema, zero3
        self.pairs = list(zip(ema.module.parameters(), engine.module.parameters()))
        self.bf16 = bf16
        self.clip = PartClipper(parts_of(engine.module), clip_grad, zero3)  # call between backward and step

    @torch.no_grad()
    def ema_update(self, momentum: float) -> None:
        from dino_ray.train.ema import ema_update_

        if self.zero3:
            from deepspeed.utils import safe_get_local_fp32_param

            teacher, student = [], []
            for t, s in self.pairs:
                src = safe_get_local_fp32_param(s) if self.bf16 else None
                src = s.ds_tensor if src is None else src
                n = min(t.ds_tensor.numel(), src.numel())
                teacher.append(t.ds_tensor.view(-1)[:n])
                student.append(src.reshape(-1)[:n])
            ema_update_(teacher, student, momentum)
        else:
            ema_update_([t for t, _ in self.pairs], [s for _, s in self.pairs], momentum)

    def full_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The full state dict of an (EMA) module on rank 0; a collective under ZeRO-3."""
        from ray.train import get_context

        if self.zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} \
                    if get_context().get_world_rank() == 0 else None
            return state
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} \
            if get_context().get_world_rank() == 0 else None

    def ema_shards(self) -> dict[int, torch.Tensor]:
        params = [t for t, _ in self.pairs]
        if self.zero3:
            return {i: p.ds_tensor.detach().cpu().clone() for i, p in enumerate(params)}
        return {i: p.detach().cpu().clone() for i, p in enumerate(params)}

    def load_ema_shards(self, shards: dict[int, torch.Tensor]) -> None:
        params = [t for t, _ in self.pairs]
        with torch.no_grad():
            for i, p in enumerate(params):
                (p.ds_tensor if self.zero3 else p).copy_(shards[i])
