"""Bundled sample data for the demo: real images that ship inside a registry package (scikit-learn).

``python -m dino_ray.demo_data OUT`` writes:

* ``OUT/pool/``: an unlabeled pool of scikit-learn's handwritten digits (8x8 scans, upsampled to
  32 px RGB) and its two sample photos, plus what a real bucket contains: near-duplicates (re-encoded,
  flipped, shifted copies), copies of evaluation images, and a few broken files. The curate stage
  should remove the first two and skip (and count) the last.
* ``OUT/eval/train/<digit>/`` and ``OUT/eval/test/<digit>/``: a labeled split for kNN and linear probes.
  The test images are held out of the pool (except the planted copies, which decontamination removes).

Point the same pipeline at your own folder or bucket by overriding ``curate.pool.uri``.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32
N_TEST = 400
N_NEAR_DUPLICATES = 24
N_EVAL_COPIES = 8


def _digit_image(pixels: np.ndarray) -> Image.Image:
    gray = (pixels.reshape(8, 8) / 16.0 * 255.0).astype(np.uint8)
    return Image.fromarray(gray).resize((SIZE, SIZE), Image.BICUBIC).convert("RGB")


def _near_duplicate(img: Image.Image, kind: int) -> bytes:
    buf = io.BytesIO()
    if kind % 3 == 0:
        img.save(buf, format="JPEG", quality=70)  # re-encoded
    elif kind % 3 == 1:
        img.transpose(Image.FLIP_LEFT_RIGHT).save(buf, format="PNG")  # mirrored
    else:
        w, h = img.size
        img.crop((1, 1, w - 1, h - 1)).resize((w, h), Image.BICUBIC).save(buf, format="PNG")  # cropped
    return buf.getvalue()


def prepare(out: str | os.PathLike, seed: int = 0) -> Path:
    """Write the demo folders under ``out`` (idempotent: an existing complete folder is kept)."""
    from sklearn.datasets import load_digits, load_sample_images

    out = Path(out)
    marker = out / ".complete"
    if marker.exists():
        return out
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    test, train = order[:N_TEST], order[N_TEST:]
    pool = out / "pool"
    for d in (pool, out / "eval" / "train", out / "eval" / "test"):
        d.mkdir(parents=True, exist_ok=True)
    for split, idx in (("train", train), ("test", test)):
        for i in idx:
            label_dir = out / "eval" / split / str(digits.target[i])
            label_dir.mkdir(exist_ok=True)
            _digit_image(digits.data[i]).save(label_dir / f"{i:04d}.png")
    for i in train:
        _digit_image(digits.data[i]).save(pool / f"digit_{i:04d}.png")
    for k, i in enumerate(rng.choice(train, N_NEAR_DUPLICATES, replace=False)):
        ext = "jpg" if k % 3 == 0 else "png"
        (pool / f"copy_{k:02d}_of_{i:04d}.{ext}").write_bytes(_near_duplicate(_digit_image(digits.data[i]), k))
    for k, i in enumerate(rng.choice(test, N_EVAL_COPIES, replace=False)):
        (pool / f"evalcopy_{k:02d}_of_{i:04d}.png").write_bytes(_near_duplicate(_digit_image(digits.data[i]), 1))
    for k, photo in enumerate(load_sample_images().images):
        Image.fromarray(photo).save(pool / f"photo_{k}.jpg", quality=90)
    good = io.BytesIO()
    _digit_image(digits.data[0]).save(good, format="PNG")
    (pool / "broken_truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (pool / "broken_empty.jpg").write_bytes(b"")
    (pool / "broken_notes.jpg").write_text("this is a text file with an image name\n")
    marker.touch()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write the demo data into")
    args = parser.parse_args()
    print(prepare(args.out))


if __name__ == "__main__":
    main()
