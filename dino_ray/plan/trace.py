"""What one training step of a model holds and computes, measured on PyTorch's meta device.

The student is built on ``torch.device("meta")`` (shapes, no storage) and its forward on one batch of
the stage's crops runs there under two observers: ``saved_tensors_hooks`` sees every tensor autograd
keeps for the backward (the activations a step holds at its peak) and ``FlopCounterMode`` counts the
matmul and attention FLOPs. This follows the real code path (packed crops, batch-subset stochastic
depth, SwiGLU or MLP, the heads), so a change to the model changes the plan with it, and it costs about
a second for ViT-g without touching a GPU. Parameters themselves are counted by name, not traced.

Tensors saved inside each block are attributed to it (forward hooks mark the block boundaries), which
is what activation checkpointing trades away: with it, a step keeps each block's input and, during the
backward, one block's saved tensors at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

PARTS = ("backbone", "dino_head", "ibot_head")


@dataclass(frozen=True)
class StepTrace:
    """One student's step at one batch size (bytes at the traced dtype; FLOPs of one forward)."""

    batch: int
    params: dict[str, int]  # parameter count per part of the SSL model
    saved_bytes: int  # everything autograd keeps for the backward (no checkpointing)
    block_saved_bytes: list[int]  # the part of saved_bytes kept inside each transformer block
    block_input_bytes: int  # one block's input, all crops (what checkpointing keeps per block)
    student_flops: int  # student forward: backbone on all crops, heads, loss
    teacher_flops: int  # teacher (or EMA) forward on the global crops, heads included
    target_bytes: int  # teacher targets held through the student's backward (fp32 probabilities)

    @property
    def checkpointed_saved_bytes(self) -> int:
        """Saved tensors with per-block activation checkpointing: block inputs + the largest block."""
        outside = self.saved_bytes - sum(self.block_saved_bytes)
        return outside + len(self.block_saved_bytes) * self.block_input_bytes + max(self.block_saved_bytes, default=0)


def masked_patches_per_batch(n_global_crops: int, patches: int, masking: Any) -> int:
    """Expected masked patches in a batch: a ``mask_probability`` share of the global crops is masked,
    at ratios spread evenly over ``mask_ratio_min_max`` (data/masking.py)."""
    if masking is None:
        return 0
    lo, hi = masking.mask_ratio_min_max
    return int(round(n_global_crops * masking.mask_probability * patches * (lo + hi) / 2))


def _dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def trace_step(model_cfg: Any, loss_cfg: Any, crops: Any, masking: Any, batch: int, dtype: str,
               drop_path: bool = True, device: str = "meta") -> StepTrace:
    """Trace one step of a student built from the stage's config at ``batch`` images per worker.

    ``dtype`` is the precision the activations are kept in ("bf16" or "fp32"); ``masking`` is the stage's
    MaskingConfig, or None for students trained without iBOT masks (distillation). ``device="cpu"`` runs
    the same trace on real tensors (tests compare the two)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dino_ray.train.engines import build_ssl_model

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    dt = _dtype(dtype)
    with torch.device(device):
        model = build_ssl_model(model_cfg, loss_cfg, drop_path=drop_path).to(dt)
    model.train()
    params = {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in PARTS}
    backbone = model.backbone
    n_g, n_l = crops.global_crops_number, crops.local_crops_number
    g = torch.randn(n_g * batch, 3, crops.global_crops_size, crops.global_crops_size, device=device, dtype=dt)
    local = (torch.randn(n_l * batch, 3, crops.local_crops_size, crops.local_crops_size, device=device, dtype=dt)
             if n_l else None)
    rows, cols = backbone.patch_embed.grid(crops.global_crops_size, crops.global_crops_size)
    n_masked = masked_patches_per_batch(n_g * batch, rows * cols, masking)

    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}
    per_block = [0] * len(backbone.blocks)
    current: list[int | None] = [None]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in param_storages and key not in saved:
            saved[key] = storage.nbytes()
            if current[0] is not None:
                per_block[current[0]] += storage.nbytes()
        return t

    def enter(i: int):
        return lambda module, args: current.__setitem__(0, i)

    def leave(module, args, out) -> None:
        current[0] = None

    inputs: list[int] = []
    hooks = []
    for i, block in enumerate(backbone.blocks):
        hooks.append(block.register_forward_pre_hook(enter(i)))
        hooks.append(block.register_forward_hook(leave))
    hooks.append(backbone.blocks[0].register_forward_pre_hook(
        lambda module, args: inputs.append(args[0].numel() * args[0].element_size()) if not inputs else None))

    def student_step() -> None:
        outs = backbone([g] + ([local] if local is not None else []), is_training=True)
        cls = [o["x_norm_clstoken"] for o in outs]
        cls_logits, masked_logits = model.heads(cls, _first_rows(outs[0]["x_norm_patchtokens"], n_masked))
        _cross_entropy_like(cls_logits + [masked_logits], loss_cfg.student_temp, device)

    def teacher_forward() -> None:
        with torch.no_grad():
            out = backbone([g], is_training=True)[0]
            model.heads([out["x_norm_clstoken"]], _first_rows(out["x_norm_patchtokens"], n_masked))

    try:
        # memory: attention as the fused kernels run it on GPUs and CPUs (out + logsumexp kept, never the
        # [T, T] probabilities), which the meta device would otherwise decompose into the math path
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FusedAttention():
            torch.manual_seed(0)
            student_step()
    finally:
        for h in hooks:
            h.remove()
    # FLOPs: the math path, whose two attention products the counter sees (it does not count fused kernels)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as flops:
            torch.manual_seed(0)
            student_step()
        model.eval()
        with FlopCounterMode(display=False) as tflops:
            teacher_forward()
    student_flops = int(flops.get_total_flops())
    ibot_out = loss_cfg.dino_out_dim if loss_cfg.share_heads else loss_cfg.ibot_out_dim
    target_bytes = 4 * (n_g * batch * loss_cfg.dino_out_dim + n_masked * ibot_out)
    return StepTrace(batch=batch, params=params, saved_bytes=sum(saved.values()), block_saved_bytes=per_block,
                     block_input_bytes=inputs[0] if inputs else 0, student_flops=student_flops,
                     teacher_flops=int(tflops.get_total_flops()), target_bytes=target_bytes)


class FusedAttention(TorchFunctionMode):
    """Route ``scaled_dot_product_attention`` to the fused (flash) CPU kernel, which has a meta
    implementation and keeps what the GPU's fused kernels keep for the backward."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*args, **(kwargs or {}))[0]
        return func(*args, **(kwargs or {}))


def _first_rows(patches: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` patch tokens standing for the masked ones (their count, not their positions, sets the cost)."""
    return patches.reshape(-1, patches.shape[-1])[:n]


def _cross_entropy_like(logits: list[torch.Tensor], temp: float, device: str) -> torch.Tensor:
    """The student side of the DINO/iBOT losses: fp32 log-softmax of the scaled logits, summed (what the
    losses keep for the backward; the teacher targets are counted separately)."""
    total = torch.zeros((), device=device)
    for x in logits:
        total = total + F.log_softmax(x.float() / temp, dim=-1).sum()
    return total
