"""KoLeo regulariser: spreads the batch's CLS features uniformly over the unit sphere.

It is the Kozachenko-Leonenko differential-entropy estimator up to constants: maximising the log distance
of every feature to its nearest neighbour in the batch. DINOv2 credits it with +8 mAP on instance
retrieval. Computed in fp32 with autocast off because nearest-neighbour distances of nearly collapsed
features are tiny; the eps keeps log() finite for duplicates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KoLeoLoss(nn.Module):
    """-mean_i log ||x_i - x_nn(i)|| over L2-normalised rows of a [B, D] batch (B >= 2)."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim != 2:
            raise ValueError(f"KoLeo expects [B, D] features, got shape {tuple(features.shape)}")
        if features.shape[0] < 2:
            raise ValueError(
                f"KoLeo needs a batch of at least 2 samples to find nearest neighbours, got {features.shape[0]}"
            )
        with torch.autocast(features.device.type, enabled=False):
            x = F.normalize(features.float(), p=2.0, dim=-1, eps=self.eps)
            with torch.no_grad():
                similarity = x @ x.t()
                similarity.fill_diagonal_(float("-inf"))
                nearest = similarity.argmax(dim=1)  # max cosine = min distance on the sphere
            distances = torch.linalg.vector_norm(x - x[nearest], dim=-1)
            return -torch.log(distances + self.eps).mean()
