"""Label-free collapse diagnostics, computed from tensors a training step already has.

A DINO run can fail quietly: the loss looks finite and smooth, and yet the student learns nothing. The
usual shapes of failure, and the number that shows each one:

- **uniform targets** (teacher too soft, centring too strong, no signal yet): the teacher's target
  distributions are near uniform, so the DINO cross-entropy sits at ln(K). Shown by
  ``dino_loss_over_lnk`` and ``teacher_entropy_over_lnk`` near 1.0.
- **one-prototype collapse** (teacher too sharp, no centring): every image gets the same prototype.
  Shown by ``prototypes_used`` near 1 and ``teacher_entropy_over_lnk`` near 0.
- **feature collapse**: every image maps to (nearly) the same CLS vector, or to a low-dimensional
  subspace. Shown by ``cls_mean_cosine`` near 1, ``cls_std`` near 0 and ``cls_effective_rank`` of a
  few dimensions. The effective rank is exp(entropy of the normalised singular values), the RankMe
  measure of Garrido et al. (2023): D for isotropic features, 1 for features on one line.

Everything here is plain torch on one process's batch: no Ray, no labels, no extra forward.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def row_entropy(probs: Tensor) -> float:
    """Mean entropy (nats) of the rows of a [N, K] probability matrix."""
    p = probs.float().clamp_min(1e-12)
    return float(-(p * p.log()).sum(-1).mean())


def prototypes_used(probs: Tensor) -> int:
    """How many distinct prototypes win (argmax) over the rows: the targets' working vocabulary."""
    return int(probs.argmax(-1).unique().numel()) if probs.numel() else 0


def mean_pairwise_cosine(x: Tensor) -> float:
    """Mean cosine similarity between distinct rows (1.0: every row points the same way)."""
    n = x.shape[0]
    if n < 2:
        return float("nan")
    z = torch.nn.functional.normalize(x.float(), dim=-1)
    total = z.sum(0)
    return float((total @ total - n) / (n * (n - 1)))  # sum over i != j of z_i . z_j, rows are unit


def effective_rank(x: Tensor) -> float:
    """exp(entropy of the normalised singular values) of the L2-normalised rows (RankMe).

    Not centred on purpose: identical rows must score 1 (centring would leave only their rounding
    noise, which looks isotropic)."""
    s = torch.linalg.svdvals(torch.nn.functional.normalize(x.float(), dim=-1))
    if float(s.sum()) <= 1e-12:
        return 1.0
    p = (s / s.sum()).clamp_min(1e-12)
    return float(torch.exp(-(p * p.log()).sum()))


def feature_std(x: Tensor) -> float:
    """Mean per-dimension std of the L2-normalised rows: 0 when collapsed, ~1/sqrt(D) when spread out."""
    if x.shape[0] < 2:
        return float("nan")
    return float(torch.nn.functional.normalize(x.float(), dim=-1).std(0).mean())


def collapse_metrics(dino_probs: Sequence[Tensor], ibot_probs: Tensor | None, cls_tokens: Tensor,
                     dino_loss: float) -> dict[str, float]:
    """The diagnostics of one step, under the names logged to MLflow (``collapse/...``).

    ``dino_probs``: the teacher's DINO targets per global crop ([B, K] each); ``ibot_probs``: its
    masked-patch targets ([M, K_ibot], may be empty); ``cls_tokens``: the teacher's normalised CLS
    tokens of the global crops; ``dino_loss``: the DINO cross-entropy per crop pair (global + local
    terms as logged), which is ln(K) when the student predicts uniformly against uniform targets."""
    probs = torch.cat([p.float() for p in dino_probs])
    ln_k = math.log(probs.shape[-1])
    out = {
        "collapse/dino_loss_over_lnk": dino_loss / ln_k,
        "collapse/teacher_entropy_over_lnk": row_entropy(probs) / ln_k,
        "collapse/prototypes_used": float(prototypes_used(probs)),
        "collapse/cls_mean_cosine": mean_pairwise_cosine(cls_tokens),
        "collapse/cls_effective_rank": effective_rank(cls_tokens),
        "collapse/cls_std": feature_std(cls_tokens),
    }
    if ibot_probs is not None and ibot_probs.numel():
        out["collapse/ibot_entropy_over_lnk"] = row_entropy(ibot_probs) / math.log(ibot_probs.shape[-1])
    return out
