"""DINO image-level self-distillation loss on CLS-token prototype scores.

Every student crop is pushed towards the teacher's centred, sharpened distribution of every teacher
(global) crop by cross-entropy. ``forward`` returns the plain SUM of per-pair batch-mean cross-entropies;
normalising by the number of pairs is the caller's job (see ``dino_pair_count``), because the official
recipe divides both the global and the local term by the SAME total pair count rather than each by its own.

Paper vs code (DINOv2): the paper describes the loss as an average over crop pairs; the code sums
(2 swapped global pairs) and (n_local x 2 local/global pairs) and divides each part by
n_g*(n_g-1) + n_g*n_l = 18, so the two logged parts add up to the average over all 18 pairs. We follow
the code. The code pairs global crops by swapping the two teacher crops; ``ignore_diagonal=True`` gives the
same pairs (A->B, B->A) and generalises to any number of global crops.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino_ray.losses.centering import CenteredTargets



def dino_pair_count(n_global: int, n_local: int) -> int:
    """Number of (student crop, teacher crop) pairs in the official DINOv2 normalisation."""
    if n_global < 1 or n_local < 0:
        raise ValueError(f"need n_global >= 1 and n_local >= 0, got n_global={n_global}, n_local={n_local}")
    if n_global * (n_global - 1) + n_global * n_local == 0:
        raise ValueError("with a single global crop and no local crops there is no cross-view pair to learn from")
    # The official code counts at least one local term (max(n_local * n_global, 1)), so without local crops
    # two global crops divide by 3, not by their 2 pairs.
    return n_global * (n_global - 1) + max(n_global * n_local, 1)


def student_log_probs(student_logits: Tensor, student_temp: float) -> Tensor:
    """log softmax(student_logits / student_temp) in fp32 (autocast off: K can be 10^5 prototypes)."""
    with torch.autocast(student_logits.device.type, enabled=False):
        return F.log_softmax(student_logits.float() / student_temp, dim=-1)


def cross_entropy_to_targets(student_log_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """Per-row cross-entropy H(teacher_probs, student) in fp32, shape [B]; targets carry no gradient."""
    if student_log_probs.shape != teacher_probs.shape:
        raise ValueError(
            f"student logits {tuple(student_log_probs.shape)} and teacher probs {tuple(teacher_probs.shape)} differ"
        )
    with torch.autocast(student_log_probs.device.type, enabled=False):
        return -(teacher_probs.detach().float() * student_log_probs).sum(dim=-1)


class DINOLoss(CenteredTargets):
    """Cross-entropy between student CLS prototype scores and centred teacher targets.

    Holds the centering state (the EMA center for "softmax"), so the same instance must be used every
    step and checkpointed with the training state.
    """

    def forward(
        self,
        student_logits_list: Sequence[Tensor],
        teacher_probs_list: Sequence[Tensor],
        ignore_diagonal: bool = False,
    ) -> Tensor:
        """Sum over (student crop i, teacher crop j) pairs of the batch-mean cross-entropy.

        ``ignore_diagonal`` skips i == j, i.e. a global crop is never matched with the teacher's view of
        the same crop (pass the student GLOBAL crops in the same order as the teacher crops).
        """
        if len(student_logits_list) == 0 or len(teacher_probs_list) == 0:
            raise ValueError("DINOLoss needs at least one student crop and one teacher crop")
        if ignore_diagonal and len(student_logits_list) != len(teacher_probs_list):
            raise ValueError(
                "ignore_diagonal pairs student crop i with teacher crop i: got "
                f"{len(student_logits_list)} student and {len(teacher_probs_list)} teacher crops"
            )
        total = student_logits_list[0].new_zeros((), dtype=torch.float32)
        for i, student_logits in enumerate(student_logits_list):
            log_p = student_log_probs(student_logits, self.student_temp)  # once per student crop
            for j, teacher_probs in enumerate(teacher_probs_list):
                if ignore_diagonal and i == j:
                    continue
                total = total + cross_entropy_to_targets(log_p, teacher_probs).mean()
        return total
