"""DINOv2 objectives: DINO (CLS), iBOT (masked patches), KoLeo, and teacher centering.

Exports resolve lazily so that ``dino_ray.losses.config`` (read by the job config) needs no torch.
"""

from __future__ import annotations

from dino_ray._lazy import lazy_exports

_EXPORTS = {
    "SoftmaxCentering": "centering",
    "sinkhorn_knopp": "centering",
    "DINOLoss": "dino",
    "dino_pair_count": "dino",
    "iBOTPatchLoss": "ibot",
    "masked_token_weights": "ibot",
    "KoLeoLoss": "koleo",
    "LossConfig": "config",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
