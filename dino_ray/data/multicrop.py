"""DINOv2 multi-crop: 2 global + 8 local views per image, plus iBOT masks, without torchvision.

Cost model: each image is decoded once; each crop is ONE crop+resize call on a zero-copy view of
its box (antialiased bicubic, PIL's filter; or PIL ``resize(..., box=...)`` itself), so only the
needed source pixels are touched; all photometric ops then run as vectorised tensor ops over the
stack of same-sized crops (``color.py``); crops leave as uint8 CHW (4x less to ship than float32),
and ``normalize_batch`` turns a whole batch into normalised floats on the training device.
Randomness comes from one numpy Generator seeded with ``(seed, epoch, sample_index)``, so a
sample's views are reproducible anywhere and differ per epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dino_ray.data import color
from dino_ray.data.crop_config import MultiCropConfig
from dino_ray.data.masking import MaskingConfig, MaskSampler

_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def random_resized_crop_boxes(
    rng: np.random.Generator,
    width: int,
    height: int,
    scales: np.ndarray,
    ratio: tuple[float, float],
    attempts: int = 10,
) -> np.ndarray:
    """[n, 4] int boxes (left, top, w, h), row i covering a fraction ~U(scales[i]) of the image.

    torchvision's RandomResizedCrop rule, for n crops in a few vectorised draws: up to ``attempts``
    (area fraction, log-uniform aspect) candidates per crop, the first that fits is kept, else the
    largest centred box with an aspect inside ``ratio``.
    """
    n = len(scales)
    fraction = scales[:, :1] + (scales[:, 1:] - scales[:, :1]) * rng.random((n, attempts))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, attempts)))
    target = width * height * fraction
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = np.argmax(fits, axis=1)
    rows = np.arange(n)
    w, h = w[rows, first], h[rows, first]
    fallback = ~fits.any(axis=1)
    if fallback.any():
        in_ratio = width / height
        if in_ratio < ratio[0]:
            fw, fh = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            fw, fh = int(round(height * ratio[1])), height
        else:
            fw, fh = width, height
        w[fallback], h[fallback] = fw, fh
    left = rng.integers(0, width - w + 1)
    top = rng.integers(0, height - h + 1)
    left[fallback], top[fallback] = (width - w[fallback]) // 2, (height - h[fallback]) // 2
    return np.stack([left, top, w, h], axis=1)


@dataclass
class _Draws:
    """Every random choice for the crops of one image, one row per crop (globals first)."""

    boxes: np.ndarray  # [n, 4] int: left, top, width, height
    flip: np.ndarray  # [n] bool
    jitter: np.ndarray  # [n] bool: ColorJitter applied at all
    order: np.ndarray  # [n, 4] the crop's permutation of the four jitter ops
    factors: np.ndarray  # [n, 4] brightness, contrast, saturation factors and hue shift
    grayscale: np.ndarray  # [n] bool
    blur: np.ndarray  # [n] bool
    sigma: np.ndarray  # [n]
    solarize: np.ndarray  # [n] bool


class MultiCrop:
    """Callable producing fixed-shape uint8 crops and bool masks from one decoded image.

    Crops of one size form one [n, 3, S*S] float table, so each photometric op is a few vectorised
    passes per image instead of a PIL round trip per crop and op. Each crop applies the four
    ColorJitter ops in its own random order. Brightness, contrast and saturation are affine in the
    pixels, so the ops a crop applies before its hue shift are one affine map, and those after it
    (plus grayscale) another: jitter costs two affine passes and one hue pass per table. Crops are
    ordered by the step of their hue shift, which keeps the crops that shift hue contiguous, and
    also serves ``clip_after_every_jitter_op``, which runs the four steps one by one.

    Worker processes should call ``dino_ray.data.allocator.reduce_allocator_churn()`` once.
    """

    def __init__(self, cfg: MultiCropConfig, masking: MaskingConfig | None = None, seed: int = 0):
        self.cfg = cfg.validate()
        self.seed = int(seed)
        self.masks = MaskSampler(masking, cfg.mask_grid, cfg.global_crops_number, seed) if masking else None
        self._resample = _INTERPOLATION[cfg.interpolation]
        n_g, n_l = cfg.global_crops_number, cfg.local_crops_number
        self._names = [f"global_{i}" for i in range(n_g)] + [f"local_{i}" for i in range(n_l)]
        self._groups = [(np.arange(n_g), cfg.global_crops_size)]
        if n_l:
            self._groups.append((np.arange(n_g, n_g + n_l), cfg.local_crops_size))
        self._scales = np.array([cfg.global_crops_scale] * n_g + [cfg.local_crops_scale] * n_l, dtype=np.float64)
        cycle = np.arange(n_g)
        self._blur_p = np.concatenate([
            np.asarray(cfg.global_blur_probability)[cycle % len(cfg.global_blur_probability)],
            np.full(n_l, cfg.local_blur_probability)])
        self._solarize_p = np.concatenate([
            np.asarray(cfg.global_solarize_probability)[cycle % len(cfg.global_solarize_probability)],
            np.zeros(n_l)])

    def _draw(self, rng: np.random.Generator, width: int, height: int) -> _Draws:
        cfg = self.cfg
        n = len(self._names)
        boxes = random_resized_crop_boxes(rng, width, height, self._scales, cfg.aspect_ratio_range)
        strengths = np.array([cfg.brightness, cfg.contrast, cfg.saturation])
        factors = np.empty((n, 4))
        factors[:, :3] = rng.uniform(1.0 - strengths, 1.0 + strengths, size=(n, 3)).clip(min=0.0)
        factors[:, 3] = rng.uniform(-cfg.hue, cfg.hue, size=n)
        return _Draws(
            boxes=boxes,
            flip=rng.random(n) < cfg.flip_probability,
            jitter=rng.random(n) < cfg.color_jitter_probability,
            order=np.argsort(rng.random((n, 4)), axis=1),
            factors=factors,
            grayscale=rng.random(n) < cfg.grayscale_probability,
            blur=rng.random(n) < self._blur_p,
            sigma=rng.uniform(*cfg.blur_sigma_range, size=n),
            solarize=rng.random(n) < self._solarize_p,
        )

    def _sorted_by_hue_step(self, d: _Draws, crops: np.ndarray) -> np.ndarray:
        """The crops in table order: by the jitter step of their hue shift, crops without one last."""
        step = np.argmax(d.order[crops] == color.HUE, axis=1)
        step[~d.jitter[crops]] = 4
        return crops[np.argsort(step, kind="stable")]

    def _crop(self, source: torch.Tensor, pil: Image.Image | None, box: np.ndarray, size: int) -> torch.Tensor:
        """One crop box resized to size x size with one call: uint8 [3, size, size]."""
        left, top, w, h = (int(v) for v in box)
        if pil is not None:
            view = pil.resize((size, size), self._resample, box=(left, top, left + w, top + h))
            return torch.from_numpy(np.array(view)).permute(2, 0, 1)  # np.array: torch wants writable memory
        window = source[:, :, top: top + h, left: left + w]  # a view: nothing is copied before the resize
        return F.interpolate(window, size=(size, size), mode=self.cfg.interpolation, antialias=True)[0]

    def _table(self, source: torch.Tensor, pil: Image.Image | None, d: _Draws, crops: np.ndarray,
               size: int) -> torch.Tensor:
        """Crop, resize and flip each view, stacked as a float [n, 3, size*size] pixel table."""
        views = torch.empty((len(crops), 3, size, size), dtype=torch.uint8)
        for row, crop in enumerate(crops):
            view = self._crop(source, pil, d.boxes[crop], size)
            views[row] = view.flip(-1) if d.flip[crop] else view
        return views.reshape(len(crops), 3, size * size).to(torch.float32)

    def _affine_runs(self, d: _Draws, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per crop, the affine maps before and after its hue shift ([n, 3] each, see color.compose_blend).

        Grayscale, which follows the jitter, is folded into the second map.
        """
        identity = (1.0, 0.0, 0.0)
        before = np.tile(identity, (len(crops), 1))
        after = np.tile(identity, (len(crops), 1))
        for row, crop in enumerate(crops):
            coef, split = identity, None
            if d.jitter[crop]:
                for op in d.order[crop]:
                    if op != color.HUE:
                        coef = color.compose_blend(coef, int(op), float(d.factors[crop, op]))
                    elif self.cfg.hue > 0:
                        split, coef = coef, identity
            if d.grayscale[crop]:
                coef = color.grayscale_coef(coef)
            if split is None:
                before[row] = coef
            else:
                before[row], after[row] = split, coef
        return before, after

    def _jitter_fused(self, x: torch.Tensor, d: _Draws, crops: np.ndarray) -> torch.Tensor:
        """Jitter + grayscale as: affine run, hue shift (one call for all crops), affine run."""
        before, after = self._affine_runs(d, crops)
        if (before != (1.0, 0.0, 0.0)).any():
            color.apply_affine(x, torch.from_numpy(before.astype(np.float32)))
        rows = np.flatnonzero(d.jitter[crops]) if self.cfg.hue > 0 else np.array([], dtype=np.int64)
        if rows.size:
            hi = rows[-1] + 1  # jittered crops come first in the table order
            x[:hi] = color.adjust_hue(x[:hi], _per_crop(d.factors[crops[:hi], color.HUE]))
        if (after != (1.0, 0.0, 0.0)).any():
            color.apply_affine(x, torch.from_numpy(after.astype(np.float32)))
        return x

    def _jitter_every_op(self, x: torch.Tensor, d: _Draws, crops: np.ndarray) -> torch.Tensor:
        """Four steps; at each, one clipped blend for the brightness/contrast/saturation crops, then hue."""
        n = len(crops)
        ops = d.order[crops]  # [n, 4]: op of each crop at each step
        blending = d.jitter[crops, None] & (ops != color.HUE)
        factor = np.where(blending, np.take_along_axis(d.factors[crops], np.minimum(ops, color.SATURATION), 1), 1.0)
        keep = 1.0 - factor
        contrast = np.where(blending & (ops == color.CONTRAST), keep, 0.0)
        saturation = np.where(blending & (ops == color.SATURATION), keep, 0.0)
        factor_t, contrast_t, saturation_t = (_per_step(a, n) for a in (factor, contrast, saturation))
        hue_rows = d.jitter[crops, None] & (ops == color.HUE) & (self.cfg.hue > 0)
        for step in range(4):
            if (factor[:, step] != 1.0).any():
                offset = None
                if contrast[:, step].any():
                    offset = color.mean_luma(x) * contrast_t[step]
                if saturation[:, step].any():
                    gray = color.luma(x)
                    offset = gray * saturation_t[step] if offset is None else torch.addcmul(offset, gray, saturation_t[step])
                if offset is None:
                    x.mul_(factor_t[step])
                else:
                    torch.addcmul(offset, x, factor_t[step], out=x)
                x.clamp_(0.0, 255.0)
            rows = np.flatnonzero(hue_rows[:, step])
            if rows.size:
                lo, hi = rows[0], rows[-1] + 1  # contiguous by construction of the table order
                x[lo:hi] = color.adjust_hue(x[lo:hi], _per_crop(d.factors[crops[lo:hi], color.HUE]))
        return x

    def _photometric(self, x: torch.Tensor, d: _Draws, crops: np.ndarray, size: int) -> torch.Tensor:
        """ColorJitter, grayscale, blur, solarize, each on the crops that drew it, in torchvision's order."""
        cfg = self.cfg
        if cfg.clip_after_every_jitter_op:
            x = self._jitter_every_op(x, d, crops)
            for row in np.flatnonzero(d.grayscale[crops]):
                x[row] = color.to_grayscale(x[row])
        else:
            x = self._jitter_fused(x, d, crops)
        rows = np.flatnonzero(d.blur[crops])
        if rows.size:
            index = torch.from_numpy(rows)
            images = x.index_select(0, index).view(len(rows), 3, size, size)
            blurred = color.gaussian_blur(images, torch.from_numpy(d.sigma[crops[rows]]), cfg.blur_kernel_size)
            x.index_copy_(0, index, blurred.view(len(rows), 3, size * size))
        for row in np.flatnonzero(d.solarize[crops]):
            x[row] = color.solarize(x[row], cfg.solarize_threshold)
        return x

    def __call__(self, image: np.ndarray, sample_index: int, epoch: int = 0) -> dict[str, np.ndarray]:
        """Views of one image: ``global_i`` uint8 [3,G,G], ``local_i`` uint8 [3,L,L], ``mask_i`` bool [N]."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"MultiCrop expects a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
        if not image.flags.writeable:
            image = image.copy()  # torch refuses read-only buffers (e.g. Arrow-backed Ray Data cells)
        source = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)  # [1, 3, H, W], channels-last, no copy
        pil = Image.fromarray(np.ascontiguousarray(image)) if self.cfg.resize_backend == "pil" else None
        height, width = image.shape[:2]
        d = self._draw(np.random.default_rng([self.seed, int(epoch), int(sample_index), 2]), width, height)
        views: dict[str, np.ndarray] = {}
        for group, size in self._groups:
            crops = self._sorted_by_hue_step(d, group)
            x = self._photometric(self._table(source, pil, d, crops, size), d, crops, size)
            pixels = torch.empty((len(crops), 3, size, size), dtype=torch.uint8)
            pixels.copy_(x.round_().view(len(crops), 3, size, size))
            for row, crop in enumerate(crops):
                views[self._names[crop]] = pixels[row].numpy()
        out = {name: views[name] for name in self._names}
        for i in range(self.cfg.global_crops_number):
            out[f"mask_{i}"] = (self.masks(epoch, sample_index, i) if self.masks is not None
                                else np.zeros(self.cfg.num_patches, dtype=bool))
        return out


def _per_step(values: np.ndarray, n: int) -> torch.Tensor:
    """[n, 4] per-crop, per-step values as a [4, n, 1, 1] float32 tensor (index by step)."""
    return torch.from_numpy(np.ascontiguousarray(values.T, dtype=np.float32)).reshape(4, n, 1, 1)


def _per_crop(values: np.ndarray) -> torch.Tensor:
    """Per-crop values as a [n, 1, 1] float32 tensor broadcasting over [n, 3, N] tables."""
    return torch.from_numpy(np.asarray(values, dtype=np.float32)).reshape(-1, 1, 1)


def normalize_batch(batch: dict[str, torch.Tensor], cfg: MultiCropConfig) -> dict[str, torch.Tensor]:
    """Stack per-crop uint8 columns crop-major and normalise, on whatever device the batch is on.

    Row ``c * B + b`` of ``global_crops`` / ``masks`` is crop ``c`` of image ``b`` (DINOv2's layout:
    the teacher's two global views of an image are ``B`` rows apart). Returns ``global_crops``
    float32 [n_g*B, 3, G, G], ``local_crops`` float32 [n_l*B, 3, L, L] (None without local crops),
    ``masks`` bool [n_g*B, N].
    """
    globals_ = [f"global_{i}" for i in range(cfg.global_crops_number)]
    locals_ = [f"local_{i}" for i in range(cfg.local_crops_number)]
    return {
        "global_crops": _stack_normalized(batch, globals_, cfg),
        "local_crops": _stack_normalized(batch, locals_, cfg) if locals_ else None,
        "masks": torch.cat([batch[f"mask_{i}"] for i in range(cfg.global_crops_number)]).to(torch.bool),
    }


def _stack_normalized(batch: dict[str, torch.Tensor], names: list[str], cfg: MultiCropConfig) -> torch.Tensor:
    """Copy the uint8 crops into one float tensor (conversion fused with the copy), then normalise in place."""
    first = batch[names[0]]
    b = first.shape[0]
    out = torch.empty((len(names) * b, *first.shape[1:]), dtype=torch.float32, device=first.device)
    for c, name in enumerate(names):
        out[c * b: (c + 1) * b].copy_(batch[name])
    std = torch.tensor(cfg.std, dtype=torch.float32, device=first.device).reshape(1, 3, 1, 1)
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=first.device).reshape(1, 3, 1, 1)
    return out.mul_(1.0 / (255.0 * std)).sub_(mean / std)  # (x / 255 - mean) / std
