"""Multi-crop: each augmentation's parameters and semantics, output layout, determinism, normalisation."""

from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from dino_ray.data import color
from dino_ray.data.decode import decode_image
from dino_ray.data.masking import MaskingConfig
from dino_ray.data.multicrop import MultiCrop, MultiCropConfig, normalize_batch, random_resized_crop_boxes

# Every photometric op off: crops are pure crop + resize (+ flip).
GEOMETRY_ONLY = dict(color_jitter_probability=0.0, grayscale_probability=0.0, global_blur_probability=(0.0,),
                     local_blur_probability=0.0, global_solarize_probability=(0.0,))
SMALL = dict(global_crops_size=56, local_crops_size=28, local_crops_number=4)


@pytest.fixture(scope="module")
def photo(imagenette_dir) -> np.ndarray:
    return decode_image(sorted((imagenette_dir / "train").rglob("*.JPEG"))[3].read_bytes())


def table(image: np.ndarray) -> torch.Tensor:
    """An HWC uint8 image as a [1, 3, N] float pixel table."""
    return torch.from_numpy(image.reshape(-1, 3).T.astype(np.float32).copy())[None]


def untable(x: torch.Tensor, shape) -> np.ndarray:
    return x[0].T.reshape(shape).numpy()


def test_output_layout_dtypes_and_defaults(photo):
    cfg = MultiCropConfig()
    assert (cfg.global_crops_number, cfg.global_crops_size, cfg.local_crops_number, cfg.local_crops_size) == (2, 224, 8, 98)
    assert cfg.global_blur_probability == (0.0, 0.9) and cfg.local_blur_probability == 0.5  # as the models were trained
    out = MultiCrop(cfg, MaskingConfig(), seed=0)(photo, sample_index=5, epoch=0)
    assert list(out) == [f"global_{i}" for i in range(2)] + [f"local_{i}" for i in range(8)] + ["mask_0", "mask_1"]
    for i in range(2):
        assert out[f"global_{i}"].shape == (3, 224, 224) and out[f"global_{i}"].dtype == np.uint8
        assert out[f"mask_{i}"].shape == (256,) and out[f"mask_{i}"].dtype == bool
    for i in range(8):
        assert out[f"local_{i}"].shape == (3, 98, 98) and out[f"local_{i}"].flags["C_CONTIGUOUS"]
    no_masks = MultiCrop(cfg, None, seed=0)(photo, 5, 0)
    assert not no_masks["mask_0"].any() and no_masks["mask_0"].shape == (256,)


def test_deterministic_and_different_across_epochs_indices_and_seeds(photo):
    cfg = MultiCropConfig(**SMALL)
    a, b = MultiCrop(cfg, MaskingConfig(), seed=0), MultiCrop(cfg, MaskingConfig(), seed=1)
    ref = a(photo, 3, 0)
    again = a(photo, 3, 0)
    assert all((ref[k] == again[k]).all() for k in ref)
    for other in (a(photo, 3, 1), a(photo, 4, 0), b(photo, 3, 0)):
        assert (ref["global_0"] != other["global_0"]).any() and (ref["local_0"] != other["local_0"]).any()


def test_random_resized_crop_boxes_honour_scale_and_ratio():
    rng = np.random.default_rng(0)
    scales = np.array([(0.32, 1.0), (0.05, 0.32)] * 500)
    boxes = random_resized_crop_boxes(rng, 300, 200, scales, (3 / 4, 4 / 3))
    left, top, w, h = boxes.T
    assert boxes.dtype == np.int64 and boxes.shape == (1000, 4)
    assert (left >= 0).all() and (left + w <= 300).all() and (top >= 0).all() and (top + h <= 200).all()
    fraction = w * h / 60000
    assert (fraction >= scales[:, 0] * 0.95).all() and (fraction <= scales[:, 1] * 1.05).all()
    assert (w / h >= 3 / 4 * 0.9).all() and (w / h <= 4 / 3 * 1.1).all()
    # same distribution as torchvision's sequential rule (written out plainly here)
    ref_rng, reference = np.random.default_rng(1), []
    for lo, hi in scales:
        for _ in range(10):
            target, aspect = 60000 * ref_rng.uniform(lo, hi), math.exp(ref_rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            rw, rh = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < rw <= 300 and 0 < rh <= 200:
                reference.append(rw * rh / 60000)
                break
        else:
            reference.append(np.nan)  # fallback box: left out of the comparison
    reference = np.array(reference)
    assert abs(fraction[::2].mean() - np.nanmean(reference[::2])) < 0.02
    assert abs(fraction[1::2].mean() - np.nanmean(reference[1::2])) < 0.01
    assert len(set(left[::2])) > 20 and len(set(top[1::2])) > 20  # positions vary
    # impossible aspect (a 1000 x 10 strip): falls back to the largest centred box with a valid ratio
    strip = random_resized_crop_boxes(rng, 1000, 10, np.array([(0.9, 1.0)]), (3 / 4, 4 / 3))
    assert strip.tolist() == [[(1000 - 13) // 2, 0, 13, 10]]


def test_crop_scale_is_honoured_on_an_image_with_known_content():
    # Red encodes x and green encodes y, so a crop's corner colours reveal its box.
    ramp = np.arange(256, dtype=np.uint8)
    image = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.zeros((1, 1), np.uint8)), -1).copy()
    cfg = MultiCropConfig(**GEOMETRY_ONLY, flip_probability=0.0, global_crops_size=70, local_crops_size=32)
    mc = MultiCrop(cfg, None, seed=0)
    areas = {"global": [], "local": []}
    for index in range(25):
        out = mc(image, index, 0)
        for kind in areas:
            for name in (k for k in out if k.startswith(kind)):
                crop = out[name].astype(float)
                size = crop.shape[1]
                # corner samples sit half a source pixel per output pixel inside the box edges
                w = (crop[0, size // 2, -1] - crop[0, size // 2, 0]) * size / (size - 1)
                h = (crop[1, -1, size // 2] - crop[1, 0, size // 2]) * size / (size - 1)
                areas[kind].append(w * h / 256**2)
    assert 0.32 * 0.85 <= min(areas["global"]) and max(areas["global"]) <= 1.0 * 1.05
    assert 0.05 * 0.8 <= min(areas["local"]) and max(areas["local"]) <= 0.32 * 1.1
    assert np.mean(areas["global"]) > np.mean(areas["local"]) * 3


def test_flip_mirrors_the_same_crop(photo):
    base = dict(SMALL, brightness=0.4, grayscale_probability=0.5)  # photometric ops commute with a flip
    never = MultiCrop(MultiCropConfig(**base, flip_probability=0.0), None, seed=2)(photo, 1, 0)
    always = MultiCrop(MultiCropConfig(**base, flip_probability=1.0), None, seed=2)(photo, 1, 0)
    for name in (k for k in never if not k.startswith("mask")):
        assert np.abs(always[name].astype(int) - never[name][..., ::-1]).max() <= 1


@pytest.mark.parametrize("clip_every_op", [False, True])
def test_grayscale_makes_channels_equal(photo, clip_every_op):
    cfg = MultiCropConfig(**SMALL, grayscale_probability=1.0, clip_after_every_jitter_op=clip_every_op)
    out = MultiCrop(cfg, None, seed=0)(photo, 0, 0)
    for name in (k for k in out if not k.startswith("mask")):
        assert (out[name][0] == out[name][1]).all() and (out[name][1] == out[name][2]).all()


def test_draw_probabilities_match_the_config():
    mc = MultiCrop(MultiCropConfig(), None, seed=0)
    draws = [mc._draw(np.random.default_rng(i), 224, 224) for i in range(2000)]
    mean = {k: np.mean([getattr(d, k) for d in draws], axis=0) for k in ("flip", "jitter", "grayscale", "blur", "solarize")}
    assert mean["blur"][0] == 0.0 and abs(mean["blur"][1] - 0.9) < 0.03  # global 1 never, global 2 90%
    assert abs(mean["blur"][2:].mean() - 0.5) < 0.02
    assert mean["solarize"][0] == 0.0 and abs(mean["solarize"][1] - 0.2) < 0.03 and mean["solarize"][2:].max() == 0
    assert abs(mean["flip"].mean() - 0.5) < 0.02 and abs(mean["jitter"].mean() - 0.8) < 0.02
    assert abs(mean["grayscale"].mean() - 0.2) < 0.02
    factors = np.concatenate([d.factors for d in draws])
    assert factors[:, 0].min() >= 0.6 and factors[:, 0].max() <= 1.4 and factors[:, 2].min() >= 0.8
    assert np.abs(factors[:, 3]).max() <= 0.1 and np.abs(factors[:, 3]).mean() > 0.04
    sigma = np.concatenate([d.sigma for d in draws])
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0
    orders = {tuple(o) for d in draws for o in d.order}
    assert len(orders) == 24  # every permutation of the four jitter ops occurs


def test_blend_ops_match_pil_image_enhance(photo):
    img = Image.fromarray(photo)
    x = table(photo)
    for factor in (0.6, 1.3):
        ours = {
            "brightness": color.adjust_brightness(x, factor),
            "contrast": color.adjust_contrast(x, factor),
            "saturation": color.adjust_saturation(x, factor),
        }
        pil = {
            "brightness": ImageEnhance.Brightness(img).enhance(factor),
            "contrast": ImageEnhance.Contrast(img).enhance(factor),
            "saturation": ImageEnhance.Color(img).enhance(factor),
        }
        for name in ours:
            diff = np.abs(untable(ours[name], photo.shape).round() - np.asarray(pil[name], dtype=float))
            assert diff.mean() < 0.6 and diff.max() <= 2, (name, factor, diff.max())
    assert (color.adjust_brightness(x, 0.0) == 0).all()
    flat = color.adjust_contrast(x, 0.0)
    assert torch.allclose(flat, flat[..., :1].expand_as(flat))
    gray = color.adjust_saturation(x, 0.0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])


def test_hue_shift_matches_colorsys_hsv():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (500, 3)).astype(np.float32)
    pixels[:20] = pixels[:20, :1]  # gray pixels (zero spread)
    pixels[20:40, 1] = pixels[20:40, 0]  # ties for the max channel
    for shift in (-0.1, 0.03, 0.1, 1 / 3):
        ours = color.adjust_hue(torch.from_numpy(pixels.T.copy())[None], shift)[0].T.numpy()
        ref = []
        for r, g, b in pixels / 255.0:
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            ref.append(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v))
        assert np.abs(ours - np.array(ref) * 255).max() < 0.01
    red = torch.tensor([[[255.0], [0.0], [0.0]]])
    assert torch.allclose(color.adjust_hue(red, 1 / 3), torch.tensor([[[0.0], [255.0], [0.0]]]), atol=1e-3)


def test_composed_blends_equal_sequential_blends_when_nothing_clips():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.uniform(80, 170, (2, 3, 400)).astype(np.float32))
    ops = [(color.SATURATION, 1.15), (color.BRIGHTNESS, 0.9), (color.CONTRAST, 1.2)]
    sequential, coef = x.clone(), (1.0, 0.0, 0.0)
    for op, f in ops:
        sequential = {color.BRIGHTNESS: color.adjust_brightness, color.CONTRAST: color.adjust_contrast,
                      color.SATURATION: color.adjust_saturation}[op](sequential, f)
        coef = color.compose_blend(coef, op, f)
    fused = color.apply_affine(x.clone(), torch.tensor([coef, coef], dtype=torch.float32))
    assert torch.allclose(fused, sequential, atol=1e-3)
    gray = color.apply_affine(x.clone(), torch.tensor([color.grayscale_coef(coef)] * 2, dtype=torch.float32))
    assert torch.allclose(gray, color.to_grayscale(sequential), atol=1e-3)


def test_fused_jitter_stays_close_to_clipping_after_every_op(photo):
    base = dict(SMALL, grayscale_probability=0.0, global_blur_probability=(0.0,), local_blur_probability=0.0,
                global_solarize_probability=(0.0,), color_jitter_probability=1.0)
    fused = MultiCrop(MultiCropConfig(**base), None, seed=4)
    exact = MultiCrop(MultiCropConfig(**base, clip_after_every_jitter_op=True), None, seed=4)
    diffs = []
    for index in range(6):
        a, b = fused(photo, index, 0), exact(photo, index, 0)
        diffs += [np.abs(a[k].astype(int) - b[k]).mean() for k in a if not k.startswith("mask")]
    assert 0.0 < np.mean(diffs) < 3.0


def test_solarize_threshold():
    x = torch.tensor([[[0.0, 127.0, 128.0, 200.0, 255.0]] * 3])
    assert color.solarize(x, 128.0)[0, 0].tolist() == [0.0, 127.0, 127.0, 55.0, 0.0]
    photo = np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)
    off = MultiCropConfig(**SMALL, **GEOMETRY_ONLY)
    on = dataclasses.replace(off, global_solarize_probability=(1.0,))
    plain, sol = MultiCrop(off, None, 0)(photo, 0, 0), MultiCrop(on, None, 0)(photo, 0, 0)
    expected = np.where(plain["global_0"] >= 128, 255 - plain["global_0"].astype(int), plain["global_0"])
    assert np.abs(sol["global_0"].astype(int) - expected).max() <= 1
    assert (sol["local_0"] == plain["local_0"]).all()  # locals never solarised


def test_blur_reduces_variance_and_preserves_flat_images():
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.uniform(0, 255, (3, 3, 40, 40)).astype(np.float32))
    blurred = color.gaussian_blur(noise, torch.tensor([0.3, 1.0, 2.0]), 9)
    var = [noise[i].var().item() for i in range(3)], [blurred[i].var().item() for i in range(3)]
    assert var[1][0] < var[0][0] and var[1][2] < var[1][1] < var[1][0]
    assert torch.allclose(color.gaussian_blur(torch.full((1, 3, 20, 20), 77.0), torch.tensor([1.5]), 9),
                          torch.full((1, 3, 20, 20), 77.0))
    assert torch.allclose(color.gaussian_kernels(torch.tensor([0.5, 2.0]), 9).sum(1), torch.ones(2))


def test_blur_through_multicrop_smooths_crops(photo):
    off = MultiCropConfig(**SMALL, **GEOMETRY_ONLY)
    on = dataclasses.replace(off, global_blur_probability=(1.0,), local_blur_probability=1.0, blur_sigma_range=(1.5, 2.0))
    plain, smooth = MultiCrop(off, None, 0)(photo, 0, 0), MultiCrop(on, None, 0)(photo, 0, 0)

    def roughness(crop: np.ndarray) -> float:
        return float(np.abs(np.diff(crop.astype(float), axis=2)).mean())

    for name in ("global_0", "global_1", "local_0", "local_3"):
        assert roughness(smooth[name]) < 0.8 * roughness(plain[name])


def test_resize_backends_agree(photo):
    torch_cfg = MultiCropConfig(**SMALL, **GEOMETRY_ONLY)
    pil_cfg = dataclasses.replace(torch_cfg, resize_backend="pil")
    a, b = MultiCrop(torch_cfg, None, 0)(photo, 0, 0), MultiCrop(pil_cfg, None, 0)(photo, 0, 0)
    for name in ("global_0", "local_2"):
        assert np.abs(a[name].astype(int) - b[name]).mean() < 1.0


def test_min_source_size_keeps_the_smallest_crop_box_at_crop_resolution():
    cfg = MultiCropConfig()
    side = cfg.min_source_size()
    for size, (smin, _) in ((224, cfg.global_crops_scale), (98, cfg.local_crops_scale)):
        short_side_of_smallest_box = math.sqrt(smin * side * side * 3 / 4)
        assert short_side_of_smallest_box >= size - 1


def test_normalize_batch_is_crop_major_and_normalised():
    cfg = MultiCropConfig(global_crops_size=28, local_crops_size=14, local_crops_number=3)
    b = 4
    batch = {}
    for c in range(2):
        batch[f"global_{c}"] = torch.stack([torch.full((3, 28, 28), 10 * c + i, dtype=torch.uint8) for i in range(b)])
        batch[f"mask_{c}"] = torch.stack([torch.full((4,), c == 1 and i == 2) for i in range(b)])
    for c in range(3):
        batch[f"local_{c}"] = torch.full((b, 3, 14, 14), 255, dtype=torch.uint8)
    out = normalize_batch(batch, cfg)
    assert out["global_crops"].shape == (8, 3, 28, 28) and out["global_crops"].dtype == torch.float32
    assert out["local_crops"].shape == (12, 3, 14, 14) and out["masks"].shape == (8, 4)
    mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
    for c in range(2):
        for i in range(b):
            expected = ((10 * c + i) / 255.0 - mean) / std
            assert torch.allclose(out["global_crops"][c * b + i, :, 0, 0], expected, atol=1e-5)
    assert out["masks"].nonzero().tolist() == [[1 * b + 2, k] for k in range(4)]
    assert torch.allclose(out["local_crops"][0, :, 0, 0], (1.0 - mean) / std, atol=1e-5)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="patch_size"):
        MultiCropConfig(global_crops_size=100).validate()
    with pytest.raises(ValueError, match="probabilities"):
        MultiCropConfig(grayscale_probability=1.5).validate()
    with pytest.raises(ValueError, match="local_crops_scale"):
        MultiCropConfig(local_crops_scale=(0.3, 0.1)).validate()
    with pytest.raises(ValueError, match="interpolation"):
        MultiCropConfig(interpolation="lanczos").validate()
    with pytest.raises(ValueError, match="blur_kernel_size"):
        MultiCropConfig(blur_kernel_size=8).validate()
    with pytest.raises(ValueError, match="uint8"):
        MultiCrop(MultiCropConfig(**SMALL))(np.zeros((10, 10), np.uint8), 0, 0)
