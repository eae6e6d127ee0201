"""Teacher centering: turns teacher logits into target distributions that cannot collapse.

Two options, as in DINOv2:
- Sinkhorn-Knopp (the ViT-L/g recipe): an equipartition constraint over the *global* batch, so every
  prototype receives roughly the same mass from step one. The sums must run over all ranks, otherwise
  each GPU would balance its own sub-batch and the targets would depend on the world size.
- EMA softmax centering (DINO v1 and the default DINOv2 config): subtract a running mean of the teacher
  logits before the sharpened softmax. The mean of batch t is applied from batch t+1 on, which lets the
  distributed reduction overlap with the rest of the step.

Both work on any device; the arithmetic is fp32 with autocast off, because exp(logit / 0.04) and sums
over 10^5 prototypes are outside the bf16/fp16 comfort zone.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _distributed(group: Optional[dist.ProcessGroup]) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _all_reduce_(tensor: Tensor, group: Optional[dist.ProcessGroup], op=None) -> Tensor:
    if _distributed(group):
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group)
    return tensor


def sinkhorn_knopp(
    teacher_logits: Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    group: Optional[dist.ProcessGroup] = None,
) -> Tensor:
    """Balanced soft assignments [B, K] of teacher logits to prototypes (rows sum to 1).

    Alternately normalises prototype mass (all-reduced, so it is balanced over the global batch) and
    sample mass (local: each sample is a row of its own rank). Ranks may hold different numbers of rows,
    including zero (iBOT's masked tokens), as long as every rank calls this function.
    The logits are shifted by their global maximum before exp(); the first global normalisation removes
    any constant factor, so the result is unchanged while overflow at low temperatures is impossible.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"teacher_logits must be [B, K], got shape {tuple(teacher_logits.shape)}")
    if teacher_temp <= 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    with torch.no_grad(), torch.autocast(teacher_logits.device.type, enabled=False):
        logits = teacher_logits.detach().float()
        n_local, n_prototypes = logits.shape
        n_global = torch.tensor([float(n_local)], device=logits.device)
        _all_reduce_(n_global, group)
        if n_global.item() == 0:
            return torch.zeros_like(logits)
        local_max = logits.max() if n_local > 0 else torch.tensor(float("-inf"), device=logits.device)
        global_max = _all_reduce_(local_max.reshape(1).clone(), group, op=dist.ReduceOp.MAX)
        q = torch.exp((logits - global_max) / teacher_temp).t()  # [K, B_local]
        q /= _all_reduce_(q.sum().reshape(1), group)
        tiny = torch.finfo(torch.float32).tiny  # a fully underflowed row/column stays 0 instead of NaN
        for _ in range(n_iterations):
            q /= _all_reduce_(q.sum(dim=1, keepdim=True), group).clamp_min_(tiny)
            q /= n_prototypes
            q /= q.sum(dim=0, keepdim=True).clamp_min_(tiny)
            q /= n_global
        q *= n_global
        return q.t()


class SoftmaxCentering(nn.Module):
    """DINO-style centering: softmax((logits - center) / T) with an EMA center of the teacher logits.

    Call order per step: ``probs = centering(logits, temp)``. That call first folds in the batch mean
    registered by the previous call (waiting on its all-reduce if one is in flight), then computes the
    probabilities, then registers this batch's mean for the next call. The center is a persistent
    buffer, so it is checkpointed with the module's state dict.
    """

    def __init__(self, out_dim: int, momentum: float = 0.9, group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.group = group
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending: Optional[Tensor] = None  # [K + 1]: summed logits, then the row count
        self._pending_work: Optional[dist.Work] = None

    def forward(self, teacher_logits: Tensor, teacher_temp: float, update: bool = True) -> Tensor:
        if teacher_logits.ndim != 2 or teacher_logits.shape[1] != self.center.shape[1]:
            raise ValueError(
                f"teacher_logits must be [B, {self.center.shape[1]}], got shape {tuple(teacher_logits.shape)}"
            )
        if teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
        self.apply_pending_update()
        with torch.no_grad(), torch.autocast(teacher_logits.device.type, enabled=False):
            logits = teacher_logits.detach().float()
            probs = torch.softmax((logits - self.center) / teacher_temp, dim=-1)
            if update:
                self._register_update(logits)
        return probs

    def _register_update(self, logits: Tensor) -> None:
        count = torch.tensor([float(logits.shape[0])], device=logits.device)
        self._pending = torch.cat([logits.sum(dim=0), count])
        self._pending_work = None
        if _distributed(self.group):
            self._pending_work = dist.all_reduce(self._pending, group=self.group, async_op=True)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001 - torch's signature
        # The batch mean registered by the last step belongs to the center a checkpoint must hold: without
        # it a resumed run would apply one update fewer than an uninterrupted one.
        self.apply_pending_update()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    @torch.no_grad()
    def apply_pending_update(self) -> None:
        """Fold the batch mean registered by the last call into the center (no-op if none)."""
        if self._pending is None:
            return
        if self._pending_work is not None:
            self._pending_work.wait()
        summed, count = self._pending[:-1], self._pending[-1]
        self._pending, self._pending_work = None, None
        if count.item() == 0:
            return  # e.g. an iBOT step without masked tokens: nothing to average
        batch_center = (summed / count).to(self.center.dtype).unsqueeze(0)
        self.center.mul_(self.momentum).add_(batch_center, alpha=1.0 - self.momentum)


class CenteredTargets(nn.Module):
    """What the DINO and iBOT losses share: a student temperature and the teacher's centering.

    Holds the centering state (the EMA center for "softmax"), so the same instance must be used every
    step and checkpointed with the training state.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, centering: str = "sinkhorn_knopp",
                 center_momentum: float = 0.9, sinkhorn_iterations: int = 3) -> None:
        super().__init__()
        from dino_ray.losses.config import check_centering

        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.centering = check_centering(centering)
        self.sinkhorn_iterations = sinkhorn_iterations
        self.softmax_centering = SoftmaxCentering(out_dim, center_momentum) if centering == "softmax" else None

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Centred, sharpened teacher targets [M, K] (no grad); M may be 0 on some or all ranks."""
        if teacher_logits.ndim != 2 or teacher_logits.shape[1] != self.out_dim:
            raise ValueError(f"teacher logits must be [M, {self.out_dim}], got shape {tuple(teacher_logits.shape)}")
        if self.softmax_centering is not None:
            return self.softmax_centering(teacher_logits, teacher_temp)
        return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)
