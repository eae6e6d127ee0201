"""Optimizer parameter groups for DINOv2: layer-wise lr decay, patch-embed lr, no-decay sets, last layer.

Multipliers are stored in each group so that the schedules can set absolute ``lr`` / ``weight_decay``
every step (``apply_schedules``) without rebuilding the optimizer. Groups are built before DeepSpeed
wraps the model: ZeRO-3 partitions parameters in place, so the same Parameter objects stay valid.

Deliberate difference from the official code: besides biases, norms and LayerScale gammas, we also
exempt the learned tokens (cls / mask / register) and ``pos_embed`` from weight decay (the official code
decays them), as is usual for ViTs: decaying them only shrinks embeddings that have no scale to learn.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Tuple

from torch import nn
from torch.optim import Optimizer

TOKEN_NAMES = ("cls_token", "mask_token", "register_tokens", "pos_embed")
EMBEDDING_NAMES = TOKEN_NAMES + ("patch_embed",)
# "blocks.<i>." or, with FSDP-style chunking, "blocks.<chunk>.<i>." (the global index is the last one).
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(?:\d+\.)?(\d+)\.")


def _components(name: str) -> List[str]:
    return name.split(".")


def block_index(name: str) -> int:
    """Index of the transformer block a parameter belongs to, or -1 for non-block parameters."""
    match = _BLOCK_RE.search(name)
    return int(match.group(1)) if match else -1


def layer_id(name: str, n_blocks: int) -> int:
    """0 for embeddings and tokens, i + 1 for block i, n_blocks + 1 for everything after (norm, heads)."""
    if any(part in EMBEDDING_NAMES for part in _components(name)):
        return 0
    index = block_index(name)
    return index + 1 if index >= 0 else n_blocks + 1


def lr_multiplier(name: str, n_blocks: int, layerwise_decay: float, patch_embed_lr_mult: float) -> float:
    mult = layerwise_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
    if "patch_embed" in _components(name):
        mult *= patch_embed_lr_mult
    return mult


def wd_multiplier(name: str) -> float:
    """0 for biases, norm weights, LayerScale gammas, tokens and positional embeddings; 1 otherwise."""
    parts = _components(name)
    no_decay = (
        name.endswith(".bias")
        or any("norm" in part for part in parts[:-1])
        or parts[-1] == "gamma"
        or any(part in TOKEN_NAMES for part in parts)
    )
    return 0.0 if no_decay else 1.0


def is_last_layer(name: str) -> bool:
    """The prototype layer of a DINO/iBOT head, which is frozen during the first iterations."""
    return "last_layer" in _components(name)


def build_param_groups(
    model: nn.Module, layerwise_decay: float = 1.0, patch_embed_lr_mult: float = 0.2, weight_decay: float = 0.04
) -> List[Dict]:
    """One optimizer group per (lr multiplier, wd multiplier, is_last_layer) over trainable parameters."""
    if not 0.0 < layerwise_decay <= 1.0:
        raise ValueError(f"layerwise_decay must be in (0, 1], got {layerwise_decay}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    n_blocks = 1 + max((block_index(n) for n, _ in named), default=-1)
    groups: Dict[Tuple[float, float, bool], Dict] = {}
    for name, param in named:
        key = (
            lr_multiplier(name, n_blocks, layerwise_decay, patch_embed_lr_mult),
            wd_multiplier(name),
            is_last_layer(name),
        )
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr_multiplier": key[0],
                "wd_multiplier": key[1],
                "is_last_layer": key[2],
                "weight_decay": weight_decay * key[1],
            }
        groups[key]["params"].append(param)
    return list(groups.values())


def _check_group(group: Dict) -> None:
    missing = [k for k in ("lr_multiplier", "wd_multiplier", "is_last_layer") if k not in group]
    if missing:
        raise KeyError(f"optimizer param group lacks {missing}: build it with build_param_groups")


def apply_schedules(optimizer: Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set this iteration's absolute lr / weight decay on every group from its stored multipliers."""
    groups: Iterable[Dict] = optimizer.param_groups
    for group in groups:
        _check_group(group)
        base = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]
