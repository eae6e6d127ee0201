"""Byte-mutation fuzz of the decode path every stage runs: whatever the bytes, a counted skip or an image.

PIL's plugins raise ValueError / TypeError / struct.error on malformed headers (a truncated PNG IHDR, a PPM
with a broken size field), which used to escape the stages' ``except DecodeError``; the training stream is
deterministic, so every Ray Train restart would hit the same file again. Fixed seed, bounded size: the
mutations are the same on every run.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dino_ray.data.decode import SKIP_REASONS, DecodeConfig, DecodeError, decode_image

FORMATS = (("PNG", {}), ("PPM", {}), ("TIFF", {}), ("JPEG", {"quality": 80}), ("GIF", {}), ("BMP", {}),
           ("WEBP", {}))


def mutants(n: int, seed: int = 0) -> list[bytes]:
    """n small images in seven formats, each with 1-3 byte flips, cuts or truncations."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8))
    seeds = []
    for fmt, kwargs in FORMATS:
        buf = io.BytesIO()
        img.save(buf, fmt, **kwargs)
        seeds.append(buf.getvalue())
    out = []
    for i in range(n):
        data = bytearray(seeds[i % len(seeds)])
        for _ in range(int(rng.integers(1, 4))):
            if not data:
                break
            pos, kind = int(rng.integers(len(data))), int(rng.integers(3))
            if kind == 0:
                data[pos] = int(rng.integers(256))
            elif kind == 1:
                del data[pos:pos + int(rng.integers(1, 16))]
            else:
                del data[pos:]
        out.append(bytes(data))
    return out


def test_any_mutated_bytes_decode_or_raise_decode_error_with_a_known_reason():
    decoded, reasons, escaped = 0, {}, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for data in mutants(3000):
            try:
                img = decode_image(data)
                assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
                decoded += 1
            except DecodeError as e:
                reasons[e.reason] = reasons.get(e.reason, 0) + 1
            except Exception as e:  # noqa: BLE001 - what the test exists to catch
                escaped.append(f"{type(e).__name__}: {e}")
    assert not escaped, f"{len(escaped)} inputs escaped decode_image, e.g. {escaped[:3]}"
    assert set(reasons) <= set(SKIP_REASONS)
    assert decoded + sum(reasons.values()) == 3000
    assert decoded > 100 and sum(reasons.values()) > 1000  # the fuzz really mutates, and some survive


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory):
    """300 mutated files, each followed by a good one (the training stream skips to the next image)."""
    root = tmp_path_factory.mktemp("fuzz")
    good = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(good, "PNG")
    uris = []
    for i, data in enumerate(mutants(300, seed=1)):
        for name, payload in ((f"{i:04d}_m.bin", data), (f"{i:04d}_ok.png", good.getvalue())):
            (root / name).write_bytes(payload)
            uris.append(str(root / name))
    return uris


def test_the_inference_stage_decoder_counts_every_bad_file(fuzz_files):
    from dino_ray.stages.inference import FeatureMaker, InferenceSpec

    maker = FeatureMaker(InferenceSpec(backbone=None, image_size=16, mode="pixels", decode=DecodeConfig(),
                                       pixel_size=8))
    batch = {"id": np.array(fuzz_files, dtype=object), "uri": np.array(fuzz_files, dtype=object),
             "label": np.zeros(len(fuzz_files), np.int64)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = maker(batch)
    reasons = [str(r) for r in out["skip_reason"]]
    assert len(reasons) == len(fuzz_files)  # nothing dropped: a bad file is a row with its reason
    assert all(r == "" for r, u in zip(reasons, fuzz_files) if u.endswith("_ok.png"))
    assert sum(1 for r in reasons if r) > 150
    assert {r for r in reasons if r} <= set(SKIP_REASONS)


def test_the_training_stream_decoder_counts_every_bad_file(fuzz_files, tmp_path):
    from dino_ray.data.crop_config import MultiCropConfig
    from dino_ray.data.masking import MaskingConfig
    from dino_ray.data.ssl_stream import CropMaker, StreamSpec

    pq.write_table(pa.table({"uri": fuzz_files}), tmp_path / "index.parquet")
    crops = MultiCropConfig(global_crops_size=16, local_crops_number=0, patch_size=4)

    class DataCfg:  # the three sections CropMaker reads from a stage's data config
        decode, masking = DecodeConfig(), MaskingConfig()

    DataCfg.crops = crops
    n = len(fuzz_files)
    spec = StreamSpec(index_uri=str(tmp_path / "index.parquet"), n_images=n, seed=0, batch_size=n, world_size=1,
                      rank=0, start_step=0, total_steps=1)
    maker = CropMaker(spec, DataCfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = maker({"id": np.arange(n)})
    assert out["global_0"].shape == (n, 3, 16, 16)  # every position got an image
    # each bad draw counted by reason (a file drawn at several positions counts each time)
    assert out["skips"].shape == (n, len(SKIP_REASONS)) and out["skips"].sum() > 100
    used = {fuzz_files[i] for i in out["sample_index"]}
    assert all(u.endswith("_ok.png") or _decodes(u) for u in used)  # only images that decode were used


def _decodes(uri: str) -> bool:
    with open(uri, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            decode_image(f.read())
            return True
        except DecodeError:
            return False
