"""The DINO / iBOT projection head: MLP, L2 normalisation, weight-normalised prototype layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight ``g * v / ||v||`` (row-wise), computed in its own forward.

    ``torch.nn.utils.weight_norm`` recomputes the weight in a forward *pre-hook* of the wrapped layer;
    under DeepSpeed ZeRO-3 that hook reads partitioned (empty) parameters. Owning ``weight_g`` and
    ``weight_v`` here keeps the key names of the released heads (``last_layer.weight_g`` /
    ``.weight_v``) and reads them only inside this module's forward, where ZeRO-3 has gathered them."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """g = 1 (DINOv2 leaves it trainable: ``norm_last_layer=False``); v's scale is irrelevant because
        only its direction is used, so it gets the same trunc-normal(0.02) as the other linears."""
        nn.init.ones_(self.weight_g)
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))
        return F.linear(x, weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _build_mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int, use_bn: bool,
               bias: bool) -> nn.Sequential:
    """Linear(-BN)-GELU stacks ending in a Linear to the bottleneck; index layout matches DINOv2 keys."""
    if nlayers < 1:
        raise ValueError(f"nlayers must be >= 1, got {nlayers}")
    if nlayers == 1:
        return nn.Sequential(nn.Linear(in_dim, bottleneck_dim, bias=bias))
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """Projection to ``out_dim`` prototype scores, shared shape for the DINO (CLS) and iBOT (patch) heads.

    The bottleneck is L2-normalised before the weight-normalised ``last_layer`` so the logits are
    cosine similarities times ``weight_g``; the trainer freezes ``last_layer`` for the first epoch by
    parameter name, which stabilises early training."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, use_bn: bool = False, mlp_bias: bool = True) -> None:
        super().__init__()
        self.mlp = _build_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn, mlp_bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.out_dim = out_dim
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
