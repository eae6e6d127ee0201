"""The deterministic view frozen backbones see: resize, centre crop, ImageNet normalisation.

Shared by curation embedding and evaluation feature extraction so both judge images the same way.
The crop ratio 0.875 (256 -> 224) is the usual evaluation protocol of DINOv2's kNN and linear probes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CROP_RATIO = 0.875


def eval_view(image: np.ndarray, size: int, crop_ratio: float = CROP_RATIO) -> np.ndarray:
    """uint8 HWC image -> float32 CHW [3, size, size], normalised (bicubic resize of the short side)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
    img = Image.fromarray(np.ascontiguousarray(image))
    short = max(size, int(round(size / crop_ratio)))
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return ((arr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy()
