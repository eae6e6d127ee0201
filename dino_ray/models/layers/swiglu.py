"""SwiGLU feed-forward network, the FFN of DINOv2's ViT-g/14."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def swiglu_hidden_dim(dim: int, mlp_ratio: float) -> int:
    """Hidden width that keeps a SwiGLU FFN at the parameter count of a ``mlp_ratio`` MLP.

    SwiGLU has three matrices instead of two, so DINOv2 uses 2/3 of the MLP width, rounded up to a
    multiple of 8 for kernel efficiency: 1536 x 4 -> 4096 for ViT-g/14."""
    mlp_hidden = int(dim * mlp_ratio)
    return (int(mlp_hidden * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """``w3(silu(a) * b)`` where ``[a, b] = w12(x)``.

    Gate and value projections are fused into one ``w12`` matrix [2*hidden, dim] (one GEMM), with the
    gate in the first half; the names and layout match the released ViT-g checkpoints."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)
