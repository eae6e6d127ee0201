"""The standard transformer feed-forward network (Linear-GELU-Linear)."""

from __future__ import annotations

from torch import Tensor, nn


class Mlp(nn.Module):
    """Two-layer GELU MLP, named ``fc1``/``fc2`` to match the released DINOv2 checkpoints."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
