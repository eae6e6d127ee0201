"""Multi-head self-attention over packed token groups, through PyTorch SDPA."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dino_ray.models.layers.packing import TokenGroups


class Attention(nn.Module):
    """Fused-qkv attention whose linears see all groups at once and whose softmax stays per image.

    The qkv and output projections run on the flat [rows, D] matrix (one GEMM for every crop); the
    attention itself runs once per resolution group with ``scaled_dot_product_attention``, so tokens
    never attend across images and no block-diagonal mask has to be built."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, groups: TokenGroups) -> Tensor:
        qkv = self.qkv(x)
        attended = [self._attend(g) for g in groups.split(qkv)]
        return self.proj(TokenGroups.pack(attended))

    def _attend(self, qkv: Tensor) -> Tensor:
        """[B, T, 3D] -> [B*T, D] for one resolution group."""
        b, t, _ = qkv.shape
        q, k, v = qkv.view(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b * t, -1)
