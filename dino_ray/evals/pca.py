"""Patch-feature PCA pictures (the DINOv2 paper's Fig. 1 style), a qualitative check of dense features.

Two PCAs, both fitted jointly over all given images so colours are comparable across them:

1. On all patches: the first component usually separates object from background. Its scores are
   min-max scaled to [0, 1] and thresholded; the side of the threshold that holds FEWER patches is
   taken as foreground (the sign of a principal component is arbitrary, and in object-centric images
   the object covers less area than its surroundings). Pass ``foreground="larger"`` for close-ups.
2. On the foreground patches only: the first three components, min-max scaled per component to
   0..255, become RGB. Background patches are black.

Component signs are fixed (largest-magnitude loading positive) so the same features always give the
same colours. These pictures are diagnostics, not metrics: DINOv3 showed that global metrics can
hide degraded dense features, which these images make visible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from dino_ray.evals.features import ArrayLike


def _principal_components(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k components [D, k] of the rows of x (covariance eigendecomposition, D x D) and the mean."""
    mean = x.mean(axis=0)
    centred = (x - mean).astype(np.float64)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    components = vectors[:, ::-1][:, :k]
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(components.shape[1])])
    return components * np.where(signs == 0, 1.0, signs), mean


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(axis=0), x.max(axis=0)
    return (x - lo) / np.where(hi > lo, hi - lo, 1.0)


def _as_grid(patch_tokens: ArrayLike, grid: tuple[int, int] | None) -> np.ndarray:
    tokens = patch_tokens.detach().cpu().numpy() if isinstance(patch_tokens, torch.Tensor) \
        else np.asarray(patch_tokens)
    tokens = tokens.astype(np.float32, copy=False)
    if tokens.ndim == 4:
        return tokens
    if tokens.ndim != 3:
        raise ValueError(f"patch_tokens must be [B, h, w, D] or [B, N, D], got {tokens.shape}")
    n = tokens.shape[1]
    if grid is None:
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"{n} patches are not a square grid; pass grid=(h, w)")
        grid = (side, side)
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid {grid} does not hold {n} patches")
    return tokens.reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[2])


def foreground_mask(patches: np.ndarray, threshold: float = 0.5,
                    foreground: str = "smaller") -> np.ndarray:
    """Boolean mask over rows of ``patches`` [M, D] from the first principal component."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if foreground not in ("smaller", "larger"):
        raise ValueError(f"foreground must be 'smaller' or 'larger', got {foreground!r}")
    component, mean = _principal_components(patches, 1)
    score = _minmax((patches - mean) @ component)[:, 0]
    mask = score > threshold
    flip = mask.sum() * 2 > mask.size if foreground == "smaller" else mask.sum() * 2 < mask.size
    return (1.0 - score) > threshold if flip else mask


def patch_pca_rgb(patch_tokens: ArrayLike, grid: tuple[int, int] | None = None,
                  threshold: float = 0.5, foreground: str = "smaller") -> np.ndarray:
    """uint8 pictures [B, h, w, 3]: foreground patches coloured by their top-3 PCA components.

    ``patch_tokens`` is [B, h, w, D], or [B, N, D] with ``grid=(h, w)`` (a square grid is inferred
    when omitted). ``threshold`` applies to the min-max scaled first component."""
    tokens = _as_grid(patch_tokens, grid)
    b, h, w, d = tokens.shape
    patches = tokens.reshape(-1, d)
    if patches.shape[0] < 2:
        raise ValueError("PCA needs at least two patches")
    mask = foreground_mask(patches, threshold, foreground)
    rgb = np.zeros((patches.shape[0], 3), dtype=np.uint8)
    fg = patches[mask]
    if fg.shape[0] >= 2:
        k = min(3, d)
        components, mean = _principal_components(fg, k)
        colours = _minmax((fg - mean) @ components)
        rgb[mask, :k] = np.round(colours * 255.0).astype(np.uint8)
    return rgb.reshape(b, h, w, 3)


def to_uint8_images(images: torch.Tensor, mean: Sequence[float] = (0.485, 0.456, 0.406),
                    std: Sequence[float] = (0.229, 0.224, 0.225)) -> np.ndarray:
    """Undo the ImageNet normalisation of a [B, 3, H, W] batch to uint8 [B, H, W, 3] for display."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (images.detach().float().cpu() * s + m).clamp(0.0, 1.0)
    return (pixels * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def side_by_side(images: np.ndarray, pca_rgb: np.ndarray, scale: int = 4) -> Image.Image:
    """One row per image: original | PCA picture, both upsampled with nearest neighbour by ``scale``.

    The PCA picture is first stretched to the image size, so each patch becomes a visible block."""
    images, pca_rgb = np.asarray(images), np.asarray(pca_rgb)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
    if pca_rgb.ndim != 4 or pca_rgb.shape[-1] != 3 or pca_rgb.shape[0] != images.shape[0]:
        raise ValueError(f"pca_rgb must be [B={images.shape[0]}, h, w, 3], got {pca_rgb.shape}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    b, h, w, _ = images.shape
    tile_w, tile_h = w * scale, h * scale
    canvas = Image.new("RGB", (2 * tile_w, b * tile_h))
    for i in range(b):
        original = Image.fromarray(images[i]).resize((tile_w, tile_h), Image.NEAREST)
        picture = Image.fromarray(pca_rgb[i]).resize((tile_w, tile_h), Image.NEAREST)
        canvas.paste(original, (0, i * tile_h))
        canvas.paste(picture, (tile_w, i * tile_h))
    return canvas
