"""Resuming must not unpickle: checkpoint files come from a bucket that other people can write to.

DeepSpeed's ``TorchCheckpointEngine.load`` calls ``torch.load(weights_only=False)``: a crafted
``*_optim_states.pt`` would run code on every worker that resumes. :func:`load_weights_only` reads with
``weights_only=True`` and allows exactly the two DeepSpeed classes its checkpoints hold besides tensors,
dicts and numbers (the ZeRO stage enum and the loss-scaler record), which carry data, not code.
"""

from __future__ import annotations

from typing import Any

import torch


def deepspeed_safe_globals() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler]


def load_weights_only(path: str, map_location: Any = None) -> Any:
    """``torch.load`` that refuses any pickled callable outside tensors, containers and DeepSpeed's records."""
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def use_weights_only_loads(engine: Any) -> None:
    """Make a DeepSpeed engine read its checkpoints with :func:`load_weights_only` (its checkpoint engine
    is pluggable; only ``load`` changes, saving is DeepSpeed's own)."""
    engine.checkpoint_engine.load = load_weights_only
