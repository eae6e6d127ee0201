"""Robust decoding: every failure maps to its reason, every pixel mode to correct RGB, nothing is lost."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dino_ray.data.decode import SKIP_REASONS, DecodeConfig, DecodeError, decode_image
from testlib import encode, png_header_only


@pytest.fixture(scope="module")
def jpeg_bytes(imagenette_dir) -> bytes:
    return sorted((imagenette_dir / "train").rglob("*.JPEG"))[0].read_bytes()


def reason_of(data: bytes, **kwargs) -> str:
    with pytest.raises(DecodeError) as info:
        decode_image(data, **kwargs)
    assert info.value.reason in SKIP_REASONS
    return info.value.reason


def test_real_jpeg_decodes_to_rgb_uint8(jpeg_bytes):
    image = decode_image(jpeg_bytes)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.flags["C_CONTIGUOUS"] and image.flags["WRITEABLE"] and image.std() > 10


def test_failure_reasons(jpeg_bytes):
    assert reason_of(b"") == "empty"
    assert reason_of(b"this is a text file, not an image\n" * 20) == "not_an_image"
    assert reason_of(np.random.default_rng(0).bytes(4000)) == "not_an_image"
    assert reason_of(jpeg_bytes[: len(jpeg_bytes) // 2]) == "truncated"
    assert reason_of(jpeg_bytes[:300]) == "truncated"
    assert reason_of(encode(Image.new("RGB", (1, 5)), "PNG")) == "too_small"
    assert reason_of(encode(Image.new("RGB", (3, 3)), "PNG"), min_size=4) == "too_small"


def test_too_large_is_decided_from_the_header_before_decoding():
    # The pixel data is missing: decoding would fail as "truncated". "too_large" proves the header
    # check ran first. Both below and above PIL's own bomb limit.
    assert reason_of(png_header_only(2000, 1000, color_type=0), max_pixels=1_000_000) == "too_large"
    assert reason_of(png_header_only(100_000, 100_000, color_type=0)) == "too_large"
    assert reason_of(png_header_only(2000, 1000, color_type=0), max_pixels=3_000_000) == "truncated"


def test_max_pixels_is_per_call_not_global():
    before = Image.MAX_IMAGE_PIXELS
    ok = encode(Image.new("RGB", (40, 30), (10, 20, 30)), "PNG")
    assert reason_of(ok, max_pixels=1000) == "too_large"
    assert decode_image(ok, max_pixels=1200).shape == (30, 40, 3)
    assert Image.MAX_IMAGE_PIXELS == before


def test_cmyk_jpeg_becomes_rgb():
    rgb = Image.new("RGB", (32, 24), (200, 40, 90))
    out = decode_image(encode(rgb.convert("CMYK"), "JPEG", quality=95))
    assert out.shape == (24, 32, 3)
    assert np.abs(out.astype(int) - [200, 40, 90]).max() <= 6


def test_alpha_is_composited_on_white():
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., :3] = (0, 0, 255)
    rgba[:, :2, 3] = 0  # fully transparent: hidden blue must not leak, white shows
    rgba[:, 2:4, 3] = 255  # opaque: blue
    rgba[:, 4:, 3] = 128  # half: blend
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert (out[:, :2] == 255).all()
    assert (out[:, 2:4] == [0, 0, 255]).all()
    assert np.abs(out[:, 4:].astype(int) - [127, 127, 255]).max() <= 1
    la = Image.fromarray(np.stack([np.full((3, 3), 10, np.uint8), np.zeros((3, 3), np.uint8)], -1), "LA")
    assert (decode_image(encode(la, "PNG")) == 255).all()


def test_palette_images_with_and_without_transparency():
    pal = Image.new("P", (5, 4))
    pal.putpalette([0, 0, 0, 250, 10, 10, 10, 250, 10] + [0] * 759)
    pixels = np.array([[1, 2, 1, 2, 0]] * 4, dtype=np.uint8)
    pal.putdata(pixels.ravel().tolist())
    out = decode_image(encode(pal, "PNG"))
    assert (out[0, 0] == [250, 10, 10]).all() and (out[0, 1] == [10, 250, 10]).all()
    out_t = decode_image(encode(pal, "PNG", transparency=0))
    assert (out_t[:, 4] == 255).all() and (out_t[0, 0] == [250, 10, 10]).all()


def test_16bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode.startswith("I;16")
    out = decode_image(encode(img, "PNG"), min_size=1)
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_32bit_int_and_float_tiffs():
    ints = Image.fromarray(np.array([[0, 65535], [257, 1000]], dtype=np.int32), "I")
    assert decode_image(encode(ints, "TIFF"))[:, :, 0].tolist() == [[0, 255], [1, 4]]
    wide = Image.fromarray(np.array([[-100, 100], [0, 300_000]], dtype=np.int32), "I")
    out = decode_image(encode(wide, "TIFF"))[:, :, 0]
    assert out.min() == 0 and out.max() == 255  # outside 16 bits: min-max scaled, order kept
    floats = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32), "F")
    assert decode_image(encode(floats, "TIFF"))[:, :, 0].tolist() == [[0, 128], [255, 64]]


def test_gray_and_bilevel_replicate_channels():
    gray = decode_image(encode(Image.fromarray(np.array([[0, 100, 255]], np.uint8), "L"), "PNG"), min_size=1)
    assert gray[0, :, 1].tolist() == [0, 100, 255] and (gray[..., 0] == gray[..., 2]).all()
    bits = decode_image(encode(Image.new("1", (3, 2), 1), "PNG"))
    assert (bits == 255).all()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.shape == (40, 20, 3)
    assert out[:8].mean() > 200 and out[-8:].mean() < 50  # the left band is now on top


def test_draft_decodes_large_jpegs_smaller_but_not_below_the_draft_size():
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (768, 1024, 3), dtype=np.uint8))
    data = encode(big, "JPEG", quality=80)
    assert decode_image(data).shape == (768, 1024, 3)
    small = decode_image(data, draft_size=150)
    assert 150 <= min(small.shape[:2]) < 768 and small.shape[0] * 4 == small.shape[1] * 3
    assert decode_image(data, draft_size=1000).shape == (768, 1024, 3)


def test_decode_config_validation():
    DecodeConfig().validate()
    with pytest.raises(ValueError, match="max_pixels"):
        DecodeConfig(max_pixels=0).validate()
    with pytest.raises(ValueError, match="min_size"):
        DecodeConfig(min_size=0).validate()
    with pytest.raises(ValueError, match="draft_size"):
        DecodeConfig(draft_size=0).validate()
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        DecodeConfig(max_pixels=10**12).validate()
    with pytest.raises(ValueError, match="unknown skip reason"):
        DecodeError("corrupt", "x")


def _encoded(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, fmt)
    return buf.getvalue()


def test_decode_memory_is_bounded_by_bytes_not_pixels():
    """A 16-bit or RGBA image costs more memory per pixel than RGB: the budget counts bytes, from the header."""
    from dino_ray.data.decode import decode_bytes_estimate

    wide = _encoded(np.full((300, 300), 40000, np.uint16))  # PIL: mode I;16
    rgb = _encoded(np.zeros((300, 300, 3), np.uint8))
    budget = decode_bytes_estimate("RGB", 300, 300)
    assert decode_image(rgb, max_bytes=budget).shape == (300, 300, 3)
    with pytest.raises(DecodeError) as e:
        decode_image(_encoded(np.zeros((300, 300, 4), np.uint8)), max_bytes=budget - 1)
    assert e.value.reason == "too_large" and "max_bytes" in str(e.value)
    assert decode_image(wide, max_bytes=decode_bytes_estimate("I;16", 300, 300)).shape == (300, 300, 3)


@pytest.mark.parametrize("kind", ["rgba", "uint16", "float"])
def test_wide_and_alpha_conversions_do_not_multiply_memory(kind):
    """Peak numpy memory of one decode, per pixel: it was ~45 B (RGBA) and ~20 B (16-bit) in float64/float32
    whole-image temporaries; converted in row strips it stays near the RGB output (3 B) plus small strips."""
    import tracemalloc

    rng = np.random.default_rng(0)
    side = 1200
    if kind == "rgba":
        data = _encoded(rng.integers(0, 255, (side, side, 4), dtype=np.uint8))
    elif kind == "uint16":
        data = _encoded(rng.integers(0, 65535, (side, side), dtype=np.uint16))
    else:
        data = _encoded(rng.random((side, side), dtype=np.float32), "F", "TIFF")
    tracemalloc.start()
    try:
        out = decode_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (side, side, 3)
    assert peak / side**2 < 7.0, f"{kind}: {peak / side**2:.1f} bytes of numpy temporaries per pixel"


def test_float_images_scale_by_their_real_range_ignoring_nan():
    a = np.array([[0.0, 2.0], [4.0, np.nan]], np.float32)
    out = decode_image(_encoded(a, "F", "TIFF"), min_size=1)
    assert out[..., 0].tolist() == [[0, 128], [255, 0]]  # min..max = 0..4; NaN becomes the minimum
