"""Stochastic depth that skips the dropped samples' compute (DINOv2's batch-subset residual).

Classic DropPath computes a residual branch for every sample and then multiplies the dropped ones by
zero. Here each residual branch runs only on a random subset of the samples of each resolution group,
and its output is added back to those samples scaled by ``batch / subset``. Every sample is kept with
probability ``subset / batch``, so the scaled update is unbiased, while the branch's FLOPs and
activation memory shrink by roughly the drop rate (about 40% at DINOv2-g's rate of 0.4).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dino_ray.models.layers.packing import TokenGroups

Branch = Callable[[Tensor, TokenGroups], Tensor]


def kept_samples(batch: int, drop_rate: float) -> int:
    """How many samples of a group run the branch: ``max(1, floor((1 - rate) * batch))``.

    Rounding down (as DINOv2 does) keeps some dropping even for small batches and small rates, where
    rounding to nearest would keep everyone and silently turn stochastic depth off."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop rate must be in [0, 1), got {drop_rate}")
    return max(1, int(batch * (1.0 - drop_rate) + 1e-9)) if batch > 0 else 0


def sample_subset(groups: TokenGroups, drop_rate: float,
                  device: torch.device) -> tuple[Tensor, TokenGroups, Tensor]:
    """Draw a random sample subset per group.

    Returns the flat row indices of the kept tokens, the layout of the gathered subset, and the
    per-row scale ``batch / kept`` of each kept token (a [rows, 1] column)."""
    rows, shapes, scales = [], [], []
    offset = 0
    for batch, tokens in groups.shapes:
        kept = kept_samples(batch, drop_rate)
        samples = torch.randperm(batch, device=device)[:kept].sort().values
        token_ids = torch.arange(tokens, device=device)
        rows.append((offset + samples[:, None] * tokens + token_ids[None, :]).reshape(-1))
        shapes.append((kept, tokens))
        scales.append(torch.full((kept * tokens,), batch / max(kept, 1), device=device))
        offset += batch * tokens
    return torch.cat(rows), TokenGroups(tuple(shapes)), torch.cat(scales)[:, None]


def subset_residual(x: Tensor, groups: TokenGroups, branch: Branch, drop_rate: float) -> Tensor:
    """``x + branch(x)`` under batch-subset stochastic depth (training only; see module docstring)."""
    rows, sub_groups, scale = sample_subset(groups, drop_rate, x.device)
    update = branch(x.index_select(0, rows), sub_groups)
    return torch.index_add(x, 0, rows, update.to(x.dtype) * scale.to(x.dtype))
