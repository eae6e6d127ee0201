"""Student/teacher SSL model and the DINOv2 objective, split for DeepSpeed ZeRO-3.

The trainer wraps the STUDENT ``SSLModel`` in a DeepSpeed engine; the teacher is a second ``SSLModel``
(EMA copy, or a bigger frozen model when distilling) called under ``torch.no_grad()``; the losses and
their centering state live in ``SSLObjective``, outside both, so the engine only ever sees a plain
module whose outputs are tensors.

Batch layout is crop-major everywhere: crop c of image b is row c * B + b, for crops, masks and logits.
Masked patch tokens are taken in ``masks`` row-major order, which is the same for student and teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from dino_ray.losses.dino import DINOLoss, dino_pair_count
from dino_ray.losses.ibot import iBOTPatchLoss
from dino_ray.losses.koleo import KoLeoLoss
from dino_ray.losses.config import LossConfig
from dino_ray.models.heads import DINOHead

SSLOutputs = Dict[str, Optional[Tensor]]
BackboneOut = Dict[str, Optional[Tensor]]


class SSLModel(nn.Module):
    """Backbone + DINO head + iBOT head; one packed backbone pass over all crops per call.

    ``forward`` returns logits and tokens only; it computes no loss, so the same module serves as the
    student (``apply_masks=True``: the mask token replaces masked patches in the input) and as the
    teacher (``apply_masks=False``: unmasked input, patch scores read at the same positions).
    A distilled student (paper sec. 5, DINOv3 code) is also called with ``apply_masks=False``: it sees no
    mask tokens, yet its patch scores at the sampled positions still feed the iBOT loss.
    """

    def __init__(
        self, backbone: nn.Module, dino_head: nn.Module, ibot_head: Optional[nn.Module] = None,
        share_heads: bool = False,
    ) -> None:
        super().__init__()
        if share_heads != (ibot_head is None):
            raise ValueError("pass ibot_head exactly when share_heads is False (share_heads reuses dino_head)")
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head
        self.share_heads = share_heads

    @classmethod
    def build(cls, backbone: nn.Module, cfg: LossConfig) -> "SSLModel":
        """Heads sized from ``cfg`` on top of ``backbone`` (which must expose ``embed_dim``)."""

        def head(out_dim: int, bottleneck: int) -> nn.Module:
            return DINOHead(backbone.embed_dim, out_dim, hidden_dim=cfg.head_hidden_dim,
                            bottleneck_dim=bottleneck, nlayers=cfg.head_n_layers)

        dino_head = head(cfg.dino_out_dim, cfg.dino_bottleneck_dim)
        ibot_head = None if cfg.share_heads else head(cfg.ibot_out_dim, cfg.ibot_bottleneck_dim)
        return cls(backbone, dino_head, ibot_head, share_heads=cfg.share_heads)

    def forward(
        self,
        global_crops: Tensor,
        local_crops: Optional[Tensor] = None,
        masks: Optional[Tensor] = None,
        apply_masks: bool = True,
    ) -> SSLOutputs:
        _check_inputs(global_crops, local_crops, masks)
        global_out, local_out = self._run_backbone(global_crops, local_crops, masks if apply_masks else None)
        global_cls = global_out["x_norm_clstoken"]
        patches = global_out["x_norm_patchtokens"]
        if masks is not None and masks.shape != patches.shape[:2]:
            raise ValueError(f"masks {tuple(masks.shape)} do not match the patch grid {tuple(patches.shape[:2])}")
        masked_patches = patches[masks] if masks is not None else patches.new_zeros((0, patches.shape[-1]))
        cls_inputs = [global_cls] + ([local_out["x_norm_clstoken"]] if local_out is not None else [])
        cls_logits, masked_logits = self.heads(cls_inputs, masked_patches)
        return {
            "global_cls_logits": cls_logits[0],
            "local_cls_logits": cls_logits[1] if local_out is not None else None,
            "global_cls_tokens": global_cls,
            "masked_patch_logits": masked_logits,
        }

    def _run_backbone(
        self, global_crops: Tensor, local_crops: Optional[Tensor], masks: Optional[Tensor]
    ) -> Tuple[BackboneOut, Optional[BackboneOut]]:
        """One packed backbone call on [global, local]; subclasses may split it (see benchmarks).

        The backbone is called as a module (not ``forward_features``): under ZeRO-3 only a module call
        gathers the backbone's own parameters (tokens, position embedding)."""
        if local_crops is None:
            return self.backbone([global_crops], [masks], is_training=True)[0], None
        global_out, local_out = self.backbone([global_crops, local_crops], [masks, None], is_training=True)
        return global_out, local_out

    def heads(self, cls_inputs: List[Tensor], masked_patches: Tensor) -> Tuple[List[Tensor], Tensor]:
        """One DINO-head call on all CLS tokens (and masked patches when shared), one iBOT-head call.

        The iBOT head runs even on zero masked tokens, so every parameter takes part in every step
        (ZeRO-3 gathers and reduces parameters per module and expects the same modules each step).
        """
        sizes = [t.shape[0] for t in cls_inputs]
        if self.share_heads:
            out = self.dino_head(torch.cat(cls_inputs + [masked_patches], dim=0))
            *cls_logits, masked_logits = out.split(sizes + [masked_patches.shape[0]], dim=0)
            return list(cls_logits), masked_logits
        cls_logits = self.dino_head(torch.cat(cls_inputs, dim=0)).split(sizes, dim=0)
        return list(cls_logits), self.ibot_head(masked_patches)


def _check_inputs(global_crops: Tensor, local_crops: Optional[Tensor], masks: Optional[Tensor]) -> None:
    if global_crops.ndim != 4:
        raise ValueError(f"global_crops must be [n_global*B, C, H, W], got shape {tuple(global_crops.shape)}")
    if local_crops is not None and local_crops.ndim != 4:
        raise ValueError(f"local_crops must be [n_local*B, C, h, w], got shape {tuple(local_crops.shape)}")
    if masks is not None and (masks.dtype != torch.bool or masks.ndim != 2 or masks.shape[0] != global_crops.shape[0]):
        raise ValueError(
            f"masks must be a bool [{global_crops.shape[0]}, N] tensor, got {masks.dtype} {tuple(masks.shape)}"
        )


@dataclass
class SSLTargets:
    """Teacher targets for one step: per-global-crop DINO probabilities and masked-patch probabilities."""

    dino_global_probs: List[Tensor]  # n_global tensors [B, K], in the teacher's crop order
    ibot_masked_probs: Tensor  # [M, K_ibot], rows in ``masks`` row-major order


class SSLObjective:
    """DINO + iBOT + KoLeo with the official DINOv2 normalisation, outside any engine.

    Holds the centering state; move it with ``to(device)`` and checkpoint ``state_dict()``. The teacher
    outputs may come from the EMA teacher or from a different, frozen model (distillation, paper sec. 5):
    only the prototype counts of its heads must match the student's.
    """

    def __init__(self, cfg: LossConfig) -> None:
        self.cfg = cfg
        common = dict(student_temp=cfg.student_temp, centering=cfg.centering,
                      center_momentum=cfg.center_momentum, sinkhorn_iterations=cfg.sinkhorn_iterations)
        self.losses = nn.ModuleDict({
            "dino": DINOLoss(cfg.dino_out_dim, **common),
            "ibot": iBOTPatchLoss(cfg.patch_out_dim, **common),
            "koleo": KoLeoLoss(),
        })

    @property
    def dino_loss(self) -> DINOLoss:
        return self.losses["dino"]

    @property
    def ibot_loss(self) -> iBOTPatchLoss:
        return self.losses["ibot"]

    @property
    def koleo_loss(self) -> KoLeoLoss:
        return self.losses["koleo"]

    def to(self, device: torch.device | str) -> "SSLObjective":
        self.losses.to(device)
        return self

    def state_dict(self) -> Dict[str, Tensor]:
        return self.losses.state_dict()

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        self.losses.load_state_dict(state)

    @torch.no_grad()
    def teacher_targets(self, teacher_out: SSLOutputs, teacher_temp: float, n_global: int) -> SSLTargets:
        """Centre and sharpen the teacher's global-crop and masked-patch scores.

        The official code swaps the two teacher crops so that student crop A is matched with teacher crop
        B; here the pairing happens in the loss (``ignore_diagonal``), which gives the same two pairs for
        two crops and the right n_g * (n_g - 1) pairs for more. Centering sees all global crops at once.
        """
        logits = teacher_out["global_cls_logits"]
        if logits is None or logits.shape[0] % n_global:
            shape = None if logits is None else tuple(logits.shape)
            raise ValueError(f"teacher global_cls_logits {shape} do not split into n_global={n_global} crops")
        probs = self.dino_loss.teacher_probs(logits, teacher_temp)
        patch_probs = self.ibot_loss.teacher_probs(teacher_out["masked_patch_logits"], teacher_temp)
        return SSLTargets(dino_global_probs=list(probs.chunk(n_global)), ibot_masked_probs=patch_probs)

    def __call__(
        self, student_out: SSLOutputs, targets: SSLTargets, masks: Optional[Tensor], n_global: int, n_local: int
    ) -> Tuple[Tensor, Dict[str, float]]:
        """Weighted total loss (with grad) and the official per-term metrics as detached floats.

        Logged terms are the unweighted values that enter the total (the official code additionally
        halves ``ibot_loss`` and ``koleo_loss`` "for display"; we do not).
        """
        if len(targets.dino_global_probs) != n_global:
            raise ValueError(f"targets hold {len(targets.dino_global_probs)} global crops, n_global={n_global}")
        pairs = dino_pair_count(n_global, n_local)
        student_global = list(student_out["global_cls_logits"].chunk(n_global))
        dino_global = self.dino_loss(student_global, targets.dino_global_probs, ignore_diagonal=True) / pairs
        dino_local = self._dino_local(student_out, targets, n_local) / pairs
        ibot = self._ibot(student_out, targets, masks)
        koleo = self._koleo(student_out["global_cls_tokens"], n_global)
        cfg = self.cfg
        total = (cfg.dino_loss_weight * (dino_global + dino_local) + cfg.ibot_loss_weight * ibot
                 + cfg.koleo_loss_weight * koleo)
        metrics = {
            "dino_local_crops_loss": dino_local,
            "dino_global_crops_loss": dino_global,
            "ibot_loss": ibot,
            "koleo_loss": koleo,
            "total_loss": total,
        }
        return total, {k: float(v.detach()) for k, v in metrics.items()}

    def _dino_local(self, student_out: SSLOutputs, targets: SSLTargets, n_local: int) -> Tensor:
        local_logits = student_out["local_cls_logits"]
        if n_local == 0:
            if local_logits is not None:
                raise ValueError("n_local=0 but the student output has local_cls_logits")
            return targets.dino_global_probs[0].new_zeros(())
        if local_logits is None or local_logits.shape[0] % n_local:
            shape = None if local_logits is None else tuple(local_logits.shape)
            raise ValueError(f"student local_cls_logits {shape} do not split into n_local={n_local} crops")
        return self.dino_loss(list(local_logits.chunk(n_local)), targets.dino_global_probs)

    def _ibot(self, student_out: SSLOutputs, targets: SSLTargets, masks: Optional[Tensor]) -> Tensor:
        student_masked = student_out["masked_patch_logits"]
        if masks is None:
            return student_masked.new_zeros((), dtype=torch.float32)
        return self.ibot_loss.forward_masked(student_masked, targets.ibot_masked_probs, masks)

    def _koleo(self, cls_tokens: Tensor, n_global: int) -> Tensor:
        if self.cfg.koleo_loss_weight == 0:
            return cls_tokens.new_zeros((), dtype=torch.float32)
        chunks = cls_tokens.chunk(n_global)
        if not self.cfg.koleo_all_global_crops:
            chunks = chunks[:1]
        return sum((self.koleo_loss(c) for c in chunks), cls_tokens.new_zeros((), dtype=torch.float32))
