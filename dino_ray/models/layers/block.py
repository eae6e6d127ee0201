"""A pre-norm transformer block working on packed token groups."""

from __future__ import annotations

from torch import Tensor, nn

from dino_ray.models.layers.attention import Attention
from dino_ray.models.layers.drop_path import subset_residual
from dino_ray.models.layers.layer_scale import LayerScale
from dino_ray.models.layers.mlp import Mlp
from dino_ray.models.layers.packing import TokenGroups
from dino_ray.models.layers.swiglu import SwiGLUFFN, swiglu_hidden_dim

FFN_LAYERS = ("mlp", "swiglu", "swiglufused")


def build_ffn(ffn_layer: str, dim: int, mlp_ratio: float, bias: bool) -> nn.Module:
    """The block's feed-forward network. ``swiglufused`` is accepted as the name DINOv2 configs use for
    the same SwiGLU layer (fused there through xFormers; here ``w12`` is already one GEMM)."""
    if ffn_layer == "mlp":
        return Mlp(dim, int(dim * mlp_ratio), bias=bias)
    if ffn_layer in ("swiglu", "swiglufused"):
        return SwiGLUFFN(dim, swiglu_hidden_dim(dim, mlp_ratio), bias=bias)
    raise ValueError(f"unknown ffn_layer {ffn_layer!r}; expected one of {FFN_LAYERS}")


class Block(nn.Module):
    """``x + ls1(attn(norm1(x)))`` then ``x + ls2(ffn(norm2(x)))``, on a flat [rows, D] token matrix.

    Submodule names (norm1, attn, ls1, norm2, mlp, ls2) follow the released checkpoints. In training
    with ``drop_path > 0`` each of the two branches runs on its own random sample subset (see
    ``drop_path.subset_residual``); in eval both branches run on every sample."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, drop_path: float = 0.0,
                 layerscale_init: float | None = 1e-5, ffn_layer: str = "mlp") -> None:
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = build_ffn(ffn_layer, dim, mlp_ratio, ffn_bias)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()

    def attn_branch(self, x: Tensor, groups: TokenGroups) -> Tensor:
        return self.ls1(self.attn(self.norm1(x), groups))

    def ffn_branch(self, x: Tensor, groups: TokenGroups) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, groups: TokenGroups) -> Tensor:
        if self.training and self.drop_path > 0.0:
            x = subset_residual(x, groups, self.attn_branch, self.drop_path)
            return subset_residual(x, groups, self.ffn_branch, self.drop_path)
        x = self._add(x, self.attn(self.norm1(x), groups), self.ls1)
        return self._add(x, self.mlp(self.norm2(x)), self.ls2)

    @staticmethod
    def _add(x: Tensor, update: Tensor, scale: nn.Module) -> Tensor:
        """Residual add, fused with the LayerScale multiply (one elementwise pass instead of two)."""
        if isinstance(scale, LayerScale):
            return scale(update, residual=x)
        return x + update
