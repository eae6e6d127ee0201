"""DINOv2 objectives: DINO (CLS), iBOT (masked patches), KoLeo, and teacher centering."""

from dino_ray.losses.centering import SoftmaxCentering, sinkhorn_knopp
from dino_ray.losses.dino import DINOLoss, dino_pair_count
from dino_ray.losses.ibot import iBOTPatchLoss, masked_token_weights
from dino_ray.losses.koleo import KoLeoLoss

__all__ = [
    "DINOLoss",
    "KoLeoLoss",
    "SoftmaxCentering",
    "dino_pair_count",
    "iBOTPatchLoss",
    "masked_token_weights",
    "sinkhorn_knopp",
]
