"""Gradient clipping as DINOv2 clips: one norm per part of the student, each clipped on its own.

The official trainer clips the backbone, the DINO head and the iBOT head separately (each to
``clip_grad`` = 3.0). One norm over the whole student, which is what DeepSpeed's ``gradient_clipping``
computes, lets the large heads decide how much the backbone's gradient is scaled. So the engines run
with DeepSpeed's clipping off and :func:`clip_per_part_` runs between ``engine.backward`` and
``engine.step``, after DeepSpeed has reduced the gradients over the ranks:

- ZeRO-3: every rank holds a disjoint fp32 slice of each gradient; the squared norms of the local slices
  are summed over the ranks (one all-reduce for all parts) and each slice is scaled in place.
- ZeRO 0-2: the full averaged gradient is read and written through DeepSpeed's ``safe_*_full_grad``
  (plain ``.grad`` at stage 0 in fp32; the optimizer's fp32 buffers otherwise).

The scale is a tensor, never read on the host, so a step on a GPU does not wait for it; the norms are
returned as tensors for logging at log steps.
"""

from __future__ import annotations

import torch

EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_: max_norm / (norm + eps)


def parts_of(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """The student's clipped parts: its direct children that train (backbone, dino_head, ibot_head)."""
    parts = {name: [p for p in child.parameters() if p.requires_grad] for name, child in model.named_children()}
    parts = {name: ps for name, ps in parts.items() if ps}
    rest = {id(p) for p in model.parameters() if p.requires_grad} - {id(p) for ps in parts.values() for p in ps}
    if rest:
        raise ValueError(f"{type(model).__name__} has {len(rest)} trainable parameters outside its children; "
                         "per-part clipping needs every parameter in a child module")
    return parts


class PartClipper:
    """Clips each part's gradient norm to ``max_norm`` (0 turns clipping off, as in the official config)."""

    def __init__(self, parts: dict[str, list[torch.nn.Parameter]], max_norm: float, zero3: bool):
        self.parts, self.max_norm, self.zero3 = parts, float(max_norm), zero3

    def _grad(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        return safe_get_local_grad(p) if self.zero3 else safe_get_full_grad(p)

    def _set(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_grad, safe_set_local_grad

        if self.zero3:
            safe_set_local_grad(p, value)
        elif getattr(p, "_hp_grad", None) is not None:  # DeepSpeed's BF16_Optimizer: its fp32 buffer is read
            p._hp_grad.copy_(value.view_as(p._hp_grad))
        else:
            safe_set_full_grad(p, value)

    @torch.no_grad()
    def __call__(self) -> dict[str, torch.Tensor]:
        """Clip in place; returns each part's norm before clipping (0-dim tensors)."""
        grads = {name: [(p, self._grad(p)) for p in ps] for name, ps in self.parts.items()}
        grads = {name: [(p, g) for p, g in pg if g is not None] for name, pg in grads.items()}
        device = next(g.device for pg in grads.values() for _, g in pg)
        sq = torch.stack([sum((g.float().pow(2).sum() for _, g in pg), torch.zeros((), device=device))
                          for pg in grads.values()])
        if self.zero3 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sq)  # the slices of all ranks make the whole gradient
        norms = sq.sqrt()
        if self.max_norm > 0:
            scales = (self.max_norm / (norms + EPS)).clamp(max=1.0)
            for scale, pg in zip(scales, grads.values()):
                for p, g in pg:
                    self._set(p, g * scale.to(g.dtype))
        return dict(zip(grads, norms))
