"""What all ranks of a training run agree on: logged means, a finite loss, skip counts."""

from __future__ import annotations

import torch


def mean_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Logged losses are the average over ranks, i.e. the loss of the global batch (as DINOv2 logs)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    values /= torch.distributed.get_world_size()
    return dict(zip(keys, values.tolist()))


def all_finite(loss: torch.Tensor) -> bool:
    """Agreed on by every rank, so all of them stop at the same step."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss).all()) else 1.0], device=loss.device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad)
    return bad.item() == 0


def summed_over_ranks(counts: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``counts`` summed over every rank, on the CPU (a collective: all ranks call it)."""
    total = counts.to(device, copy=True)  # NCCL reduces device tensors only
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return total.cpu()


def gathered_over_ranks(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's ``values``, in rank order (a collective: all ranks call it)."""
    row = torch.tensor(values, dtype=torch.float64, device=device)
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [row.cpu().tolist()]
    rows = [torch.empty_like(row) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(rows, row)
    return [r.cpu().tolist() for r in rows]
