"""iBOT block masks for the global crops, generated per sample yet distributed like DINOv2's collate.

DINOv2 masks inside its collate function: of the ``n = B * n_global`` global crops in a batch,
``int(n * mask_probability)`` get a mask, the k-th of them with a ratio drawn uniformly from the
k-th of ``m`` equal strata of ``mask_ratio_min_max``, and the mask list is shuffled. Each crop is
thus masked with probability ``p`` and, if masked, has a ratio uniform over the whole range; the
batch structure only fixes the masked count and spreads the ratios evenly.

Ray Data transforms rows, not training batches, so we reproduce that scheme without coordination:
global-crop slot ``j = sample_index * n_global + crop_index`` belongs to a virtual collate batch
``g = j // group_size`` at position ``q = j % group_size``. Every crop of group ``g`` derives the
same permutation of its group from ``(seed, epoch, g)``, so the ``q``-th crop takes stratum
``perm[q]`` (masked iff ``perm[q] < int(group_size * p)``), and the ratio and block placement come
from a generator seeded with ``(seed, epoch, g, perm[q])``. With contiguous sample indices this is
exactly DINOv2's per-batch scheme for a batch of ``group_size`` crops; with any indices (e.g. hashed
ids) each crop still has exactly DINOv2's marginal distribution. No global RNG state is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dino_ray.config.fields import Checked, bounded


class MaskGenerator:
    """BEiT-style block masking on a patch grid: rectangles of random area and aspect until a target."""

    def __init__(
        self,
        grid: tuple[int, int],
        max_num_patches: float | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_attempts: int = 10,
    ):
        self.height, self.width = int(grid[0]), int(grid[1])
        if self.height < 1 or self.width < 1:
            raise ValueError(f"MaskGenerator grid must be positive, got {grid}")
        if not 0 < min_aspect:
            raise ValueError(f"MaskGenerator min_aspect must be > 0, got {min_aspect}")
        self.num_patches = self.height * self.width
        # DINOv2 caps every block (and so every image) at half the grid.
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else float(max_num_patches)
        self.min_num_patches = int(min_num_patches)
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.max_attempts = int(max_attempts)

    def _place_block(self, mask: np.ndarray, budget: float, rng: np.random.Generator) -> int:
        """Try a few random rectangles; the first that adds 1..budget new patches is applied."""
        for _ in range(self.max_attempts):
            # low + (high - low) * u, valid also when the budget is below the minimum block size.
            area = self.min_num_patches + (budget - self.min_num_patches) * rng.random()
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (w < self.width and h < self.height):
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            window = mask[top: top + h, left: left + w]
            added = h * w - int(window.sum())
            if 0 < added <= budget:
                window[...] = True
                return added
        return 0

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        """A bool [h, w] mask with at most ``num_masking_patches`` patches set (fewer if blocks stop fitting)."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._place_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask


@dataclass
class MaskingConfig(Checked):
    """iBOT masking of the global crops (DINOv2 defaults)."""

    # Fraction of global crops that get a mask at all (the others feed iBOT unmasked).
    mask_probability: float = bounded(0.5, ge=0.0, le=1.0)
    # Range of the masked fraction of patches for a masked crop, spread evenly over masked crops.
    mask_ratio_min_max: tuple[float, float] = bounded((0.1, 0.5), ge=0.0, le=1.0)
    # Upper bound on patches masked per block, as a fraction of the grid (DINOv2: 0.5 * N).
    max_block_fraction: float = bounded(0.5, gt=0.0, le=1.0)
    # Smallest block in patches and its log-uniform aspect range (BEiT / DINOv2 values).
    min_num_patches: int = bounded(4, ge=1)
    min_aspect: float = bounded(0.3, gt=0.0)
    max_aspect: float | None = bounded(None, gt=0.0)  # None = 1 / min_aspect
    # Crops per virtual collate batch (DINOv2: 64 images per GPU x 2 global crops). Larger groups
    # stratify ratios over more crops; the per-crop distribution does not depend on it.
    group_size: int = bounded(128, ge=1)

    def validate(self) -> "MaskingConfig":
        """Rules between fields (per-field bounds are declared above and checked on construction)."""
        lo, hi = self.mask_ratio_min_max
        if not lo <= hi:
            raise ValueError(f"MaskingConfig.mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {(lo, hi)}")
        if self.max_aspect is not None and self.max_aspect < self.min_aspect:
            raise ValueError(f"MaskingConfig aspect range invalid: min_aspect={self.min_aspect}, "
                             f"max_aspect={self.max_aspect}")
        return self


class MaskSampler:
    """Deterministic per-crop masks reproducing DINOv2's per-batch masking distribution (module doc)."""

    def __init__(self, cfg: MaskingConfig, grid: tuple[int, int], n_global: int, seed: int):
        self.cfg = cfg.validate()
        self.generator = MaskGenerator(grid, cfg.max_block_fraction * grid[0] * grid[1], cfg.min_num_patches,
                                       cfg.min_aspect, cfg.max_aspect)
        self.n_global = int(n_global)
        self.seed = int(seed)
        self.n_masked_per_group = int(cfg.group_size * cfg.mask_probability)
        lo, hi = cfg.mask_ratio_min_max
        self.strata = np.linspace(lo, hi, self.n_masked_per_group + 1)

    def slot(self, epoch: int, sample_index: int, crop_index: int) -> tuple[int, int]:
        """(virtual group, stratum) of a global crop; stratum >= n_masked_per_group means unmasked."""
        if not 0 <= crop_index < self.n_global:
            raise ValueError(f"crop_index {crop_index} out of range for {self.n_global} global crops")
        if sample_index < 0 or epoch < 0:
            raise ValueError(f"sample_index and epoch must be >= 0, got {sample_index} and {epoch}")
        j = int(sample_index) * self.n_global + int(crop_index)
        group, position = divmod(j, self.cfg.group_size)
        perm = np.random.default_rng([self.seed, int(epoch), group, 0]).permutation(self.cfg.group_size)
        return group, int(perm[position])

    def __call__(self, epoch: int, sample_index: int, crop_index: int) -> np.ndarray:
        """Flattened bool mask [h * w] for one global crop."""
        group, stratum = self.slot(epoch, sample_index, crop_index)
        n = self.generator.num_patches
        if stratum >= self.n_masked_per_group:
            return np.zeros(n, dtype=bool)
        rng = np.random.default_rng([self.seed, int(epoch), group, 1, stratum])
        ratio = rng.uniform(self.strata[stratum], self.strata[stratum + 1])
        return self.generator(int(n * ratio), rng).reshape(-1)
