"""Multi-crop settings, free of torch and PIL so job configs validate in well under a second.

Defaults are what the released DINOv2 models were trained with; see the field comments where the
official code and the paper's intent differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from dino_ray.config.fields import Checked, bounded

Interpolation = Literal["bicubic", "bilinear"]
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)
PROBABILITY = dict(ge=0.0, le=1.0, hint="probabilities are in [0, 1]")


@dataclass
class MultiCropConfig(Checked):
    """Views and augmentations, DINOv2 defaults (ViT-*/14 training configs)."""

    # Global views: seen by teacher and student; their size sets the patch grid of the iBOT masks.
    global_crops_number: int = bounded(2, ge=1)
    global_crops_size: int = bounded(224, ge=1)
    # Fraction of the image area a crop covers (random-resized-crop scale), DINOv2 [0.32, 1].
    global_crops_scale: tuple[float, float] = bounded((0.32, 1.0), gt=0.0, le=1.0)
    # Local views: student only; 98 px = 7 x 14-px patches (96 for /16 models).
    local_crops_number: int = bounded(8, ge=0)
    local_crops_size: int = bounded(98, ge=1)
    local_crops_scale: tuple[float, float] = bounded((0.05, 0.32), gt=0.0, le=1.0)
    # Aspect-ratio range (w / h) of the crop box, sampled log-uniformly (torchvision default).
    aspect_ratio_range: tuple[float, float] = bounded((3.0 / 4.0, 4.0 / 3.0), gt=0.0)
    # Backbone patch size: global masks are (global_crops_size // patch_size)^2 booleans.
    patch_size: int = bounded(14, ge=1)
    flip_probability: float = bounded(0.5, **PROBABILITY)
    # ColorJitter: applied with this probability, ops in a random order per crop.
    color_jitter_probability: float = bounded(0.8, **PROBABILITY)
    brightness: float = bounded(0.4, ge=0.0)  # factor ~ U[1 - 0.4, 1 + 0.4]
    contrast: float = bounded(0.4, ge=0.0)  # factor ~ U[0.6, 1.4]
    saturation: float = bounded(0.2, ge=0.0)  # factor ~ U[0.8, 1.2]
    hue: float = bounded(0.1, ge=0.0, le=0.5)  # shift ~ U[-0.1, 0.1] turns of the colour wheel
    # torchvision clips to [0, 255] after each jitter op (they act on uint8 images). By default a
    # run of brightness / contrast / saturation ops is applied as one exact affine map clipped once,
    # at about half the cost; clipping is the only difference (measured over all views of 75
    # Imagenette images: 0.27 gray levels mean absolute difference, 1% of values off by > 8).
    # True reproduces the clip after every op.
    clip_after_every_jitter_op: bool = False
    grayscale_probability: float = bounded(0.2, **PROBABILITY)
    # Gaussian blur: kernel 9 taps, sigma ~ U[0.1, 2.0].
    blur_kernel_size: int = bounded(9, ge=1)
    blur_sigma_range: tuple[float, float] = bounded((0.1, 2.0), gt=0.0)
    # Blur probability per global crop (crop i uses entry i % len). The paper and the code's
    # arguments say 1.0 / 0.1 (BYOL-style), but DINOv2's blur wrapper hands 1 - p to RandomApply,
    # so every released DINOv2/DINOv3 model was trained with 0.0 / 0.9: we default to what was
    # actually trained (set (1.0, 0.1) for the paper's intent).
    global_blur_probability: tuple[float, ...] = bounded((0.0, 0.9), **PROBABILITY)
    # Local crops: written 0.5, effective 1 - 0.5 = 0.5, so both readings agree.
    local_blur_probability: float = bounded(0.5, **PROBABILITY)
    # Solarisation per global crop (crop i uses entry i % len): only the second view, p = 0.2.
    global_solarize_probability: tuple[float, ...] = bounded((0.0, 0.2), **PROBABILITY)
    solarize_threshold: float = 128.0
    # ImageNet statistics used by normalize_batch (applied on device, not in the data workers).
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = bounded((0.229, 0.224, 0.225), gt=0.0)
    interpolation: Interpolation = "bicubic"
    # Crop + resize engine, one call per crop either way. "torch": antialiased uint8 interpolate on
    # a zero-copy view of the crop box (PIL's filters; mean difference to PIL <= 0.15 gray levels,
    # measured 2.5-3.5x faster); "pil": Image.resize(..., box=...).
    resize_backend: Literal["torch", "pil"] = "torch"

    def validate(self) -> "MultiCropConfig":
        """Rules between fields (per-field bounds are declared above and checked on construction)."""
        if self.global_crops_size % self.patch_size:
            raise ValueError(f"MultiCropConfig.global_crops_size {self.global_crops_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        for name in ("global_crops_scale", "local_crops_scale", "aspect_ratio_range", "blur_sigma_range"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"MultiCropConfig.{name} must satisfy 0 < min <= max, got {(lo, hi)}")
        if not self.global_blur_probability or not self.global_solarize_probability:
            raise ValueError("MultiCropConfig.global_blur_probability / global_solarize_probability must not be empty")
        if self.blur_kernel_size % 2 == 0:
            raise ValueError(f"MultiCropConfig.blur_kernel_size must be odd and >= 1, got {self.blur_kernel_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"MultiCropConfig.mean/std must be 3 values (std > 0), got {self.mean}, {self.std}")
        return self

    @property
    def mask_grid(self) -> tuple[int, int]:
        side = self.global_crops_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        h, w = self.mask_grid
        return h * w

    def min_source_size(self) -> int:
        """Short side at which even the smallest crop box (min scale, extreme aspect) is not upsampled.

        Used as ``DecodeConfig.draft_size``: decoding JPEGs any smaller would lose detail the crops
        need, any larger wastes decode time.
        """
        worst = 0.0
        squeeze = math.sqrt(1.0 / max(self.aspect_ratio_range[1], 1.0 / self.aspect_ratio_range[0]))
        for size, (smin, _) in ((self.global_crops_size, self.global_crops_scale),
                                (self.local_crops_size, self.local_crops_scale)):
            worst = max(worst, size / (math.sqrt(smin) * squeeze))
        return math.ceil(worst)
