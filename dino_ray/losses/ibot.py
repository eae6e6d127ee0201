"""iBOT masked-image-modelling loss on patch-token prototype scores.

The student sees global crops with some patches replaced by the mask token; at exactly those positions
it must predict the teacher's (unmasked) patch distribution. Weighting follows the official DINOv2 code,
not the iBOT paper's plain mean over masked tokens: every token weighs 1 / (masked tokens in its image),
so each masked image contributes equally whatever its mask size, and the sum is divided by the number
of global-crop images INCLUDING unmasked ones. With the default 50% masking probability the value is
therefore about half the per-masked-image mean.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from dino_ray.losses.centering import CenteredTargets
from dino_ray.losses.dino import cross_entropy_to_targets, student_log_probs


def masked_token_weights(masks: Tensor) -> Tensor:
    """Weight 1 / (masked count of its image) for every masked token, in ``masks`` row-major order [M]."""
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool [B, N] tensor, got {masks.dtype} {tuple(masks.shape)}")
    per_image = masks.sum(dim=-1, keepdim=True).clamp_min(1).float()
    return (1.0 / per_image).expand_as(masks)[masks]


class iBOTPatchLoss(CenteredTargets):  # noqa: N801 - the method's own spelling
    """Cross-entropy between student masked-patch scores and centred teacher patch targets."""

    @property
    def patch_out_dim(self) -> int:
        return self.out_dim

    def forward_masked(
        self,
        student_patch_logits_masked: Tensor,
        teacher_probs_masked: Tensor,
        masks: Tensor,
        n_masked_patches: Optional[int] = None,
        masks_weight: Optional[Tensor] = None,
    ) -> Tensor:
        """Weighted cross-entropy over the masked tokens, divided by the number of images in ``masks``.

        ``n_masked_patches`` keeps only the first rows, for callers that pad to a static upper bound;
        ``masks_weight`` [M] overrides the per-token weights computed from ``masks``.
        """
        if masks.ndim != 2 or masks.dtype != torch.bool:
            raise ValueError(f"masks must be a bool [B, N] tensor, got {masks.dtype} {tuple(masks.shape)}")
        n_masked = int(masks.sum()) if n_masked_patches is None else n_masked_patches
        student = student_patch_logits_masked[:n_masked]
        teacher = teacher_probs_masked[:n_masked]
        weights = masked_token_weights(masks) if masks_weight is None else masks_weight[:n_masked]
        if student.shape[0] != n_masked or weights.shape[0] != n_masked:
            raise ValueError(
                f"expected {n_masked} masked tokens, got {student.shape[0]} student rows and "
                f"{weights.shape[0]} weights"
            )
        per_token = cross_entropy_to_targets(student_log_probs(student, self.student_temp), teacher)
        return (per_token * weights.to(per_token.dtype)).sum() / masks.shape[0]
