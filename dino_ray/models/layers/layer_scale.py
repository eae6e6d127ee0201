"""LayerScale: a learned per-channel gain on each residual branch (CaiT)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerScale(nn.Module):
    """Multiplies a residual branch by ``gamma``, initialised small (DINOv2: 1e-5).

    Starting every branch near zero makes each block close to the identity at init, which keeps
    deep ViTs (40 blocks for ViT-g) trainable without warm-up tricks."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.gamma.fill_(self.init_value)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``x * gamma``, or ``residual + x * gamma`` in one fused pass when ``residual`` is given."""
        if residual is None:
            return x * self.gamma
        return torch.addcmul(residual, x, self.gamma)
