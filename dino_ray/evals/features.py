"""Frozen-backbone features for the evaluation suite, in the layout that gets cached.

DINOv2 evaluates on features computed once: kNN uses the final normalised CLS token, the linear probe
uses the CLS tokens of the last four blocks plus the mean of the last block's patch tokens. We compute
all of them in one forward pass and keep them as separate float32 arrays, one per key:

- ``cls_{i}``     [B, D]  normalised CLS token of the i-th block counted from the end (``cls_1`` is the
                          last block, the one kNN and retrieval use);
- ``avgpool_{i}`` [B, D]  mean over the normalised patch tokens (registers excluded) of that block.

These keys are the parquet column names of the cached feature dataset (one fixed-size list column
each), so the eval stage can rebuild any probe input from them without touching the backbone again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Union

import numpy as np
import torch
from torch import nn

ArrayLike = Union[np.ndarray, torch.Tensor]


def feature_keys(n_last_blocks: int = 4) -> list[str]:
    """Column names produced by :func:`extract_features`, in a stable order."""
    if n_last_blocks < 1:
        raise ValueError(f"n_last_blocks must be >= 1, got {n_last_blocks}")
    keys = [f"cls_{i}" for i in range(1, n_last_blocks + 1)]
    return keys + [f"avgpool_{i}" for i in range(1, n_last_blocks + 1)]


def _module_device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 on CUDA (the released eval runs in reduced precision) and on CPUs that multiply bf16
    natively; exact fp32 elsewhere (see :mod:`dino_ray.train.precision`)."""
    from dino_ray.train import precision

    return precision.autocast(precision.resolve("auto", device), device)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Stochastic depth and dropout must be off while extracting; restore the caller's mode after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"images must be a float tensor [B, 3, H, W], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be normalised floats, got dtype {images.dtype}")


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def extract_features(backbone: nn.Module, images: torch.Tensor,
                     n_last_blocks: int = 4) -> dict[str, np.ndarray]:
    """CLS and average-pooled patch tokens of the last ``n_last_blocks`` blocks, as float32 numpy.

    ``images`` must already be normalised (ImageNet mean/std) and sized to a multiple of the patch
    size. See the module docstring for the key layout."""
    _check_images(images)
    if n_last_blocks < 1:
        raise ValueError(f"n_last_blocks must be >= 1, got {n_last_blocks}")
    device = _module_device(backbone)
    with _eval_mode(backbone), torch.inference_mode(), _autocast(device):
        outputs = backbone.get_intermediate_layers(
            images.to(device), n=n_last_blocks, return_class_token=True, norm=True)
    if len(outputs) != n_last_blocks:
        raise ValueError(f"backbone returned {len(outputs)} blocks, asked for {n_last_blocks}")
    feats: dict[str, np.ndarray] = {}
    for i in range(1, n_last_blocks + 1):  # outputs are ordered oldest block first
        feats[f"cls_{i}"] = _to_numpy(outputs[-i][1])
    for i in range(1, n_last_blocks + 1):
        feats[f"avgpool_{i}"] = _to_numpy(outputs[-i][0].float().mean(dim=1))
    return feats


def extract_patch_grid(backbone: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Final normalised patch tokens laid out on the patch grid, [B, H/p, W/p, D] float32.

    This is the input of the patch-PCA pictures; the grid shape comes from the image size and the
    backbone's patch size, so a mismatch (e.g. registers counted as patches) fails loudly here."""
    _check_images(images)
    patch = int(backbone.patch_size)
    h, w = images.shape[-2] // patch, images.shape[-1] // patch
    device = _module_device(backbone)
    with _eval_mode(backbone), torch.inference_mode(), _autocast(device):
        tokens = backbone.forward_features(images.to(device))["x_norm_patchtokens"]
    if tokens.shape[1] != h * w:
        raise ValueError(f"backbone returned {tokens.shape[1]} patch tokens, expected {h}x{w} "
                         f"for images {tuple(images.shape[-2:])} and patch size {patch}")
    return _to_numpy(tokens).reshape(tokens.shape[0], h, w, tokens.shape[-1])


def _feature(features: Mapping[str, ArrayLike], key: str) -> np.ndarray:
    if key not in features:
        raise KeyError(f"feature {key!r} missing; available: {sorted(features)}")
    value = features[key]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"feature {key!r} must be 2-D [N, D], got shape {arr.shape}")
    return arr


def linear_input(features: Mapping[str, ArrayLike], n_blocks: int, avgpool: bool) -> np.ndarray:
    """The DINOv2 linear-probe input: CLS tokens of the last ``n_blocks`` blocks, oldest first,
    then (if ``avgpool``) the mean patch token of the last block.

    The column order follows the official heads (``linear4`` = 4 CLS + avgpool = 5D), so released
    head weights would apply unchanged. It also makes every smaller layout a contiguous column slice
    of the widest one, which the grid trainer uses to feed all heads from one gathered batch."""
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
    parts = [_feature(features, f"cls_{i}") for i in range(n_blocks, 0, -1)]
    if avgpool:
        parts.append(_feature(features, "avgpool_1"))
    rows = {p.shape[0] for p in parts}
    if len(rows) != 1:
        raise ValueError(f"feature arrays disagree on the number of rows: {sorted(rows)}")
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def as_matrix(x: ArrayLike, name: str, device: torch.device) -> torch.Tensor:
    """Cached features arrive as numpy (parquet) or torch; every eval works on float32 torch."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return t.to(device=device, dtype=torch.float32)


def as_labels(y: ArrayLike, n: int, name: str, device: torch.device) -> torch.Tensor:
    """Integer class ids aligned with ``n`` feature rows; float or negative labels are a bug upstream."""
    t = y.detach() if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y))
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} labels, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    if n and int(t.min()) < 0:
        raise ValueError(f"{name} has a negative class id {int(t.min())}")
    return t.to(device=device, dtype=torch.long)


def infer_num_classes(num_classes: int | None, *labels: torch.Tensor) -> int:
    """The given class count, or one past the largest id seen (a split may miss the last classes)."""
    seen = max(int(y.max()) for y in labels) + 1
    if num_classes is None:
        return seen
    if num_classes < seen:
        raise ValueError(f"num_classes={num_classes} but labels go up to {seen - 1}")
    return num_classes
