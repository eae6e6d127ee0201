"""Heads and objective settings, free of torch so job configs validate in well under a second."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from dino_ray.config.fields import Checked, bounded

Centering = Literal["sinkhorn_knopp", "softmax"]
CENTERINGS: tuple[str, ...] = get_args(Centering)


def check_centering(centering: str) -> str:
    if centering not in CENTERINGS:
        raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
    return centering


@dataclass
class LossConfig(Checked):
    """Heads and objective; defaults are the DINOv2 ViT-g/14 (and ViT-L/14) recipe."""

    dino_loss_weight: float = 1.0  # weight of the CLS-token self-distillation term
    ibot_loss_weight: float = 1.0  # weight of the masked-patch term (adds ~3 mIoU on ADE20k)
    koleo_loss_weight: float = 0.1  # weight of the KoLeo spreading term (adds ~8 mAP on retrieval)
    dino_out_dim: int = bounded(131_072, ge=1)  # DINO prototypes ("128k"); far fewer suit small data / small batches
    ibot_out_dim: int = bounded(131_072, ge=1)  # iBOT prototypes (ignored when share_heads: the DINO head is reused)
    head_hidden_dim: int = bounded(2048, ge=1)  # width of the heads' two hidden layers
    dino_bottleneck_dim: int = bounded(384, ge=1)  # L2-normalised bottleneck before the DINO prototype layer
    ibot_bottleneck_dim: int = bounded(256, ge=1)  # the same for iBOT (the L/g configs do not override the default 256)
    head_n_layers: int = bounded(3, ge=1)  # linear layers before the bottleneck normalisation
    centering: Centering = "sinkhorn_knopp"  # "sinkhorn_knopp" (L/g recipe) or "softmax" (EMA centering, DINO v1)
    center_momentum: float = 0.9  # EMA momentum of the softmax center (unused by Sinkhorn-Knopp)
    sinkhorn_iterations: int = 3  # Sinkhorn-Knopp normalisation rounds
    student_temp: float = 0.1  # student softmax temperature (teacher's is scheduled, 0.04 -> 0.07)
    share_heads: bool = False  # True: iBOT uses the DINO head (default config); False: untied heads (L/g)
    koleo_all_global_crops: bool = True  # code: KoLeo on every global crop, summed; paper: first crop only

    def head_shapes(self) -> dict[str, int | bool]:
        """What decides the heads' tensor shapes: a stage that loads another stage's heads must agree on it."""
        keys = ("dino_out_dim", "head_hidden_dim", "dino_bottleneck_dim", "head_n_layers", "share_heads")
        if not self.share_heads:
            keys += ("ibot_out_dim", "ibot_bottleneck_dim")
        return {k: getattr(self, k) for k in keys}

    @property
    def patch_out_dim(self) -> int:
        """Prototype count of the head that scores masked patches."""
        return self.dino_out_dim if self.share_heads else self.ibot_out_dim
