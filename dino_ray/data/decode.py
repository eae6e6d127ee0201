"""Robust image decoding: bytes in, RGB uint8 out, or a DecodeError with a reason from a fixed vocabulary.

Web-scale image pools always contain files that are empty, not images, cut off mid-download,
enormous (decompression bombs), tiny, or in exotic pixel modes. One bad file must never stop a
pipeline, and every skipped file must be accounted for: each failure is one ``DecodeError`` whose
``reason`` the callers count (``stages/inference.py``: a ``skip_reason`` per row of the feature shards;
``data/ssl_stream.py``: a ``skips`` count per reason, summed into the training stage's summary).

Choices, stated once:
- Alpha is composited on WHITE, not dropped. Transparent web images (logos, product shots) are
  made to sit on white pages, and the RGB hidden under fully transparent pixels is arbitrary.
- 16-bit and 32-bit integer images are scaled to 8 bits (divide by 257, i.e. 65535 -> 255), never
  clipped; float images in [0, 1] are multiplied by 255; anything else is min-max scaled.
- The decompression-bomb check uses the size in the file header, before any pixel is decoded, and
  our own per-call ``max_pixels``; PIL's global ``Image.MAX_IMAGE_PIXELS`` is left untouched.
- Memory, not pixels, is what kills a data actor: an RGBA or 16-bit image costs several times an RGB one.
  The header also gives the pixel mode, so ``max_bytes`` bounds the estimated peak of the whole decode
  (the decoded pixels plus the RGB output, after JPEG draft scaling) and refuses the file as ``too_large``
  before decoding. Conversions work in row strips, so they add little on top of that estimate.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dino_ray.config.fields import Checked, bounded

# The complete vocabulary of skip reasons; nothing else ever appears in ``skip_reason``. ``missing``: the
# listed file was gone when read (storage that keeps failing is not a skip: it fails the stage).
SKIP_REASONS = ("empty", "not_an_image", "truncated", "too_large", "too_small", "unsupported_mode", "other",
                "missing")

# 128 Mi pixels (~134 M, 400 MB as RGB uint8): above the largest common camera sensors (100-MP medium
# format), so no real photo is refused, yet a few concurrent decodes of the largest accepted image
# still fit in a worker's memory. It also stays below PIL's own hard limit (2 x 89.5 M pixels).
DEFAULT_MAX_PIXELS = 128 * 2**20
# 1 GiB per decode: every RGB image under max_pixels fits (128 Mi px x 6 B = 768 MiB), a 16-bit or RGBA one up
# to ~150 Mi / ~110 Mi pixels ... the largest still far above any camera, while four concurrent decodes stay
# inside a 8 GiB worker.
DEFAULT_MAX_BYTES = 2**30
# Bytes per pixel of PIL's decoded buffer, by mode (PIL stores 3-channel modes in 4 bytes); unknown modes: 4.
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 4, "PA": 4, "La": 4, "RGB": 4, "YCbCr": 4, "LAB": 4, "HSV": 4,
               "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4, "I;16": 2, "I;16L": 2, "I;16B": 2,
               "I;16N": 2}
# Pixels converted at a time (whole rows): float temporaries stay at a few MB whatever the image size.
_STRIP_PIXELS = 2**16

# Modes PIL converts to RGB directly without losing anything that matters for training.
_DIRECT_RGB_MODES = {"RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV", "P"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_GRAY_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


class DecodeError(Exception):
    """A file that cannot become a training image; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, message: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class DecodeConfig(Checked):
    """How bytes become images."""

    # Decompression-bomb limit in pixels (width * height), checked from the header before decoding.
    max_pixels: int = bounded(DEFAULT_MAX_PIXELS, ge=1)
    # Decode JPEGs at a reduced scale (1/2, 1/4, 1/8 via libjpeg DCT scaling) as long as the short
    # side stays >= this size. Much faster for large photos; None decodes at full size. The
    # multi-crop pipeline sets it from its crop sizes (MultiCropConfig.min_source_size()).
    draft_size: int | None = bounded(None, ge=1)
    # Images whose short side is below this are refused (nothing useful can be cropped from them).
    min_size: int = bounded(2, ge=1)
    # Estimated peak bytes of one decode (decoded pixels + RGB output), checked from the header.
    max_bytes: int = bounded(DEFAULT_MAX_BYTES, ge=1)

    def validate(self) -> "DecodeConfig":
        pil_limit = Image.MAX_IMAGE_PIXELS
        if pil_limit is not None and self.max_pixels > 2 * pil_limit:
            raise ValueError(
                f"DecodeConfig.max_pixels={self.max_pixels} exceeds PIL's hard limit 2 * Image.MAX_IMAGE_PIXELS"
                f" = {2 * pil_limit}: PIL would refuse such images first; raise Image.MAX_IMAGE_PIXELS in"
                " your program if you really need larger images")
        return self


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only; PIL's bomb warning is silenced because our own limit decides."""
    if len(data) == 0:
        raise DecodeError("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise DecodeError("too_large", str(e)) from None
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", "no image format recognised the bytes") from None
    except (OSError, EOFError, SyntaxError) as e:
        # A recognised signature followed by a header that ends early.
        reason = "truncated" if _looks_truncated(e) else "not_an_image"
        raise DecodeError(reason, f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise DecodeError("too_large", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    return img


def _looks_truncated(e: BaseException) -> bool:
    return isinstance(e, EOFError) or "truncat" in str(e).lower()


def _draft(img: Image.Image, draft_size: int) -> None:
    """Ask libjpeg for the largest DCT down-scaling that keeps the short side >= draft_size."""
    w, h = img.size
    short = min(w, h)
    if img.format != "JPEG" or short <= draft_size:
        return
    f = draft_size / short
    img.draft(None, (math.ceil(w * f), math.ceil(h * f)))


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except (OSError, EOFError, SyntaxError, ValueError) as e:
        reason = "truncated" if _looks_truncated(e) else "other"
        raise DecodeError(reason, f"{type(e).__name__}: {e}") from None


def _orient(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block leaves the pixels as stored (they are fine)."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - any EXIF parsing failure means "no usable orientation"
        return img


def policy(cfg: DecodeConfig) -> str:
    """What decoding does to images that are not plain 8-bit RGB, in words, for stage summaries."""
    return (f"alpha composited on white; 16/32-bit integer and float images scaled to 8 bits by their real "
            f"range (0..65535 when it fits, 0..1 for floats in it, else min..max; never clipped); EXIF orientation "
            f"applied; refused as too_large above {cfg.max_pixels} pixels or ~{cfg.max_bytes / 2**20:.0f} MiB of "
            f"decode memory, as too_small below {cfg.min_size} px")


def decode_bytes_estimate(mode: str, width: int, height: int) -> int:
    """Peak bytes of decoding an image of this header: PIL's buffer plus our RGB uint8 output."""
    return width * height * (_MODE_BYTES.get(mode, 4) + 3)


def _strips(img: Image.Image):
    """``(first row, rows as a numpy array)`` in strips of about ``_STRIP_PIXELS``: numpy never holds a
    whole-image copy of the decoded buffer (``np.asarray(img)`` costs two: PIL's ``tobytes`` and the array)."""
    w, h = img.size
    rows = max(1, _STRIP_PIXELS // max(w, 1))
    for r in range(0, h, rows):
        yield r, np.asarray(img.crop((0, r, w, min(h, r + rows))))


def _composite_on_white(img: Image.Image) -> np.ndarray:
    out = np.empty((img.size[1], img.size[0], 3), np.uint8)
    for r, strip in _strips(img if img.mode == "RGBA" else img.convert("RGBA")):
        strip = strip.astype(np.float32)
        alpha = strip[..., 3:4] / 255.0
        out[r:r + len(strip)] = np.rint(strip[..., :3] * alpha + 255.0 * (1.0 - alpha))
    return out


def _wide_to_uint8(img: Image.Image) -> np.ndarray:
    """16/32-bit integer and float gray to 8 bits by scaling with the real range (never clipping),
    replicated to RGB: integers that fit 16 bits use 0..65535, floats within [0, 1] use 0..1, anything
    else its own min..max (NaN and infinities become the minimum)."""
    w, h = img.size
    out = np.empty((h, w, 3), np.uint8)
    if w * h == 0:
        return out
    lo, hi, is_float = np.inf, -np.inf, False
    for _, strip in _strips(img):
        is_float = strip.dtype.kind == "f"
        finite = strip[np.isfinite(strip)] if is_float else strip
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    if not np.isfinite(lo):  # all NaN
        lo, hi = 0.0, 1.0
    if is_float and lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    elif not is_float and lo >= 0 and hi <= 65535:
        lo, hi = 0.0, 65535.0
    scale = 255.0 / max(hi - lo, 1e-12)
    for r, strip in _strips(img):
        strip = strip.astype(np.float64)
        if is_float:
            strip = np.nan_to_num(strip, nan=lo, posinf=lo, neginf=lo)
        out[r:r + len(strip)] = np.rint((strip - lo) * scale)[..., None]
    return out


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "P" and "transparency" in img.info:
        mode = "PA"
    if mode == "RGB":
        return np.array(img, dtype=np.uint8)  # a writable copy (np.asarray of a PIL image is read-only)
    if mode in _ALPHA_MODES or mode == "PA":
        return _composite_on_white(img)
    if mode in _WIDE_GRAY_MODES:
        return _wide_to_uint8(img)
    if mode in _DIRECT_RGB_MODES:
        return np.array(img.convert("RGB"), dtype=np.uint8)
    raise DecodeError("unsupported_mode", f"pixel mode {img.mode!r} has no RGB conversion here")


def decode_image(
    data: bytes,
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = 2,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> np.ndarray:
    """Decode one encoded image to a writable C-contiguous ``uint8 [H, W, 3]`` RGB array, or raise DecodeError.

    Every failure of the bytes becomes a DecodeError: PIL's plugins raise ValueError, TypeError,
    struct.error, IndexError ... on malformed headers (a byte fuzz finds them in minutes), and the
    training stream is deterministic, so an escaped exception would hit every restart at the same file.
    """
    try:
        return _decode(data, draft_size, max_pixels, min_size, max_bytes)
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder exception on these bytes is a fact about the bytes
        reason = "truncated" if _looks_truncated(e) else "other"
        raise DecodeError(reason, f"{type(e).__name__}: {e}") from None


def _decode(data: bytes, draft_size: int | None, max_pixels: int, min_size: int, max_bytes: int) -> np.ndarray:
    img = _open(data, max_pixels)
    w, h = img.size
    if min(w, h) < min_size:
        raise DecodeError("too_small", f"{w}x{h} has a side < min_size {min_size}")
    if draft_size is not None:
        _draft(img, draft_size)
    need = decode_bytes_estimate(img.mode, *img.size)
    if need > max_bytes:
        raise DecodeError("too_large", f"{img.size[0]}x{img.size[1]} {img.mode} needs ~{need / 2**20:.0f} MiB to "
                                       f"decode > max_bytes {max_bytes / 2**20:.0f} MiB")
    _load(img)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rgb = _to_rgb(_orient(img))
    return np.ascontiguousarray(rgb)
