"""Ray Data path: bad files are counted exactly and good ones all kept; S3; tar and parquet; multi-crop batches."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dino_ray.data.decode import DecodeConfig, keep_decoded
from dino_ray.data.masking import MaskingConfig
from dino_ray.data.multicrop import MultiCropConfig
from dino_ray.data.sources import SourceConfig

SMALL_CROPS = MultiCropConfig(global_crops_size=56, local_crops_size=28, local_crops_number=3)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 32)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def good_jpegs(imagenette_dir) -> list[Path]:
    return sorted((imagenette_dir / "train").rglob("*.JPEG"))[::60][:20]


@pytest.fixture
def bad_input_folder(tmp_path, good_jpegs) -> tuple[Path, dict[str, str]]:
    """20 real JPEGs, 4 unusual-but-valid images, 7 bad files; returns (root, expected reason by name)."""
    root = tmp_path / "mixed"
    (root / "good").mkdir(parents=True)
    for i, path in enumerate(good_jpegs):
        (root / "good" / f"{i:02d}.jpg").write_bytes(path.read_bytes())
    rng = np.random.default_rng(0)
    photo = Image.open(good_jpegs[0]).convert("RGB")
    odd = {
        "cmyk.jpg": encode(photo.convert("CMYK"), "JPEG"),
        "deep16.png": encode(Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16)), "PNG"),
        "alpha.png": encode(photo.convert("RGBA"), "PNG"),
        "palette.png": encode(photo.convert("P"), "PNG"),
    }
    bad = {
        "corrupt.jpg": (rng.bytes(3000), "not_an_image"),
        "truncated.jpg": (good_jpegs[1].read_bytes()[:2500], "truncated"),
        "empty.png": (b"", "empty"),
        "text.jpg": (b"just some text, not a picture\n" * 10, "not_an_image"),
        "huge.png": (encode(Image.new("RGB", (500, 400)), "PNG"), "too_large"),  # over max_pixels below
        "bomb.png": (png_header_only(60_000, 60_000), "too_large"),
        "tiny.png": (encode(Image.new("RGB", (1, 1)), "PNG"), "too_small"),
    }
    (root / "odd").mkdir()
    for name, data in odd.items():
        (root / "odd" / name).write_bytes(data)
    (root / "bad").mkdir()
    for name, (data, _) in bad.items():
        (root / "bad" / name).write_bytes(data)
    return root, {f"bad/{name}": reason for name, (_, reason) in bad.items()}


def test_bad_inputs_are_counted_exactly_and_good_ones_kept(ray_session, bad_input_folder):
    from dino_ray.ray_data import image_dataset

    root, expected = bad_input_folder
    images = image_dataset(SourceConfig(str(root), labels_from_folders=True), DecodeConfig(max_pixels=150_000),
                           override_num_blocks=3)
    assert images.class_names == ["bad", "good", "odd"]
    rows = images.dataset.take_all()
    ids = sorted(r["id"] for r in rows)
    assert ids == sorted([f"good/{i:02d}.jpg" for i in range(20)] +
                         ["odd/alpha.png", "odd/cmyk.jpg", "odd/deep16.png", "odd/palette.png"])
    for row in rows:
        assert row["image"].dtype == np.uint8 and row["image"].ndim == 3 and row["image"].shape[2] == 3
        assert row["label"] == (1 if row["id"].startswith("good") else 2)
    report = images.skip_report()
    assert report.n_inputs == 31 and report.n_decoded == 24 and report.n_skipped == 7
    assert report.counts == {"not_an_image": 2, "truncated": 1, "empty": 1, "too_large": 2, "too_small": 1}
    for rel, reason in expected.items():
        assert str(root / rel) in report.samples[reason]


def test_s3_prefix_is_read_through_the_env_endpoint(ray_session, s3_bucket, good_jpegs):
    import boto3

    from dino_ray.ray_data import image_dataset

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = s3_bucket[len("s3://"):]
    for i, path in enumerate(good_jpegs[:4]):
        client.put_object(Bucket=bucket, Key=f"pool/c{i % 2}/{i}.jpg", Body=path.read_bytes())
    client.put_object(Bucket=bucket, Key="pool/c0/broken.jpg", Body=b"\xff\xd8 not really")
    images = image_dataset(SourceConfig(f"{s3_bucket}/pool", labels_from_folders=True), DecodeConfig(),
                           override_num_blocks=2)
    rows = sorted(images.dataset.take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == ["c0/0.jpg", "c0/2.jpg", "c1/1.jpg", "c1/3.jpg"]
    assert all(r["uri"].startswith(f"{s3_bucket}/pool/") for r in rows)
    assert [r["label"] for r in rows] == [0, 0, 1, 1]
    assert images.skip_report().counts == {"not_an_image": 1}


def test_tar_and_parquet_sources(ray_session, tmp_path, good_jpegs):
    from dino_ray.ray_data import image_dataset, skip_report

    with tarfile.open(tmp_path / "shard.tar", "w") as tf:
        for i, path in enumerate(good_jpegs[:5]):
            tf.add(path, arcname=f"k{i % 2}/{i}.jpg")
    tar_images = image_dataset(SourceConfig(str(tmp_path / "shard.tar"), labels_from_folders=True, max_images=4),
                               DecodeConfig())
    tar_rows = tar_images.dataset.take_all()
    assert len(tar_rows) == 4 and {r["label"] for r in tar_rows} == {0, 1}
    assert all(r["uri"].startswith(f"{tmp_path / 'shard.tar'}#k") for r in tar_rows)

    (tmp_path / "pq").mkdir()
    table = pa.table({"image": [p.read_bytes() for p in good_jpegs[:6]] + [b"junk"],
                      "name": [f"n{i}" for i in range(7)], "cls": ["b", "a", "b", "a", "b", "a", "a"]})
    pq.write_table(table, tmp_path / "pq" / "part.parquet")
    pq_images = image_dataset(SourceConfig(str(tmp_path / "pq"), id_column="name", label_column="cls"),
                              DecodeConfig(), override_num_blocks=1)
    decoded_once = pq_images.with_reasons.materialize()  # small data: decode once, derive rows and report
    pq_rows = sorted(decoded_once.map_batches(keep_decoded, batch_format="numpy").take_all(), key=lambda r: r["id"])
    assert [(r["id"], r["label"]) for r in pq_rows] == [(f"n{i}", 1 - i % 2) for i in range(6)]
    assert skip_report(decoded_once).counts == {"not_an_image": 1}


def test_multicrop_dataset_batches_and_epochs(ray_session, good_jpegs, tmp_path):
    from dino_ray.ray_data import EpochCounter, image_dataset, iter_ssl_batches, multicrop_dataset

    root = tmp_path / "few"
    root.mkdir()
    for i, path in enumerate(good_jpegs[:8]):
        (root / f"{i}.jpg").write_bytes(path.read_bytes())
    images = image_dataset(SourceConfig(str(root)), DecodeConfig(draft_size=SMALL_CROPS.min_source_size()),
                           override_num_blocks=2).dataset.materialize()
    views = multicrop_dataset(images, SMALL_CROPS, MaskingConfig(), seed=0, epoch=0)
    batches = list(iter_ssl_batches(views, batch_size=4, device="cpu", crop_cfg=SMALL_CROPS))
    assert len(batches) == 2
    first = batches[0]
    assert first["global_crops"].shape == (8, 3, 56, 56) and first["global_crops"].dtype == torch.float32
    assert first["local_crops"].shape == (12, 3, 28, 28) and first["masks"].shape == (8, 16)
    assert first["masks"].dtype == torch.bool and first["labels"].tolist() == [-1] * 4
    assert first["sample_index"].dtype == torch.int64

    counter = EpochCounter.remote(0)
    ray_session.get(counter.set.remote(1))
    later = multicrop_dataset(images, SMALL_CROPS, MaskingConfig(), seed=0, epoch=counter)
    raw = list(later.iter_torch_batches(batch_size=4))
    assert set(raw[0]) == {"global_0", "global_1", "local_0", "local_1", "local_2", "mask_0", "mask_1", "label",
                           "sample_index"}
    assert raw[0]["global_0"].dtype == torch.uint8 and raw[0]["local_2"].shape == (4, 3, 28, 28)
    epoch0 = {int(i): crop for b in batches for i, crop in zip(b["sample_index"], b["global_crops"][:4])}
    epoch1 = {int(i): crop for b in raw for i, crop in zip(b["sample_index"], b["global_0"])}
    assert set(epoch0) == set(epoch1) and len(epoch0) == 8
    assert all(not torch.equal(epoch0[k], (epoch1[k].float() / 255 - torch.tensor(SMALL_CROPS.mean).view(3, 1, 1))
                               / torch.tensor(SMALL_CROPS.std).view(3, 1, 1)) for k in epoch0)


def test_inference_shards_keep_input_order_and_count_bad_files(ray_session, bad_input_folder, tmp_path):
    """Two actors finish blocks in any order; the written shard must still list rows in input order (the
    linear probe's minibatches are drawn by row index), and a corrupt image is a skip row, not a crash."""
    from dino_ray import feature_store
    from dino_ray.stages.inference import InferenceSpec, run_inference

    root, expected = bad_input_folder
    files = sorted(p for p in root.rglob("*") if p.is_file())
    rows = [{"id": str(p.relative_to(root)), "uri": str(p), "label": i % 3} for i, p in enumerate(files)][::-1]
    spec = InferenceSpec(backbone=None, image_size=16, mode="pixels", decode=DecodeConfig(max_pixels=150_000),
                         pixel_size=8)
    shards, computed = run_inference(rows, spec, str(tmp_path / "feats"), num_actors=2, cpus_per_actor=0.5,
                                     batch_size=2, shard_size=16)
    assert computed == len(rows) and len(shards) == 2
    meta, feats = feature_store.read_features(shards)
    assert list(meta["id"]) == [r["id"] for r in rows]
    assert list(meta["label"]) == [r["label"] for r in rows]
    skipped = {i for i, reason in zip(meta["id"], meta["skip_reason"]) if reason}
    assert skipped == set(expected)
    again, recomputed = run_inference(rows, spec, str(tmp_path / "feats"), num_actors=2, cpus_per_actor=0.5,
                                       batch_size=2, shard_size=16)
    assert again == shards and recomputed == 0  # finished shards are reused, not recomputed


def test_in_input_order_undoes_any_arrival_order():
    from dino_ray.stages.inference import in_input_order

    chunk = [{"id": f"img{i}", "uri": f"/d/img{i}.jpg", "label": i} for i in range(6)]
    arrival = [3, 0, 5, 1, 4, 2]
    meta = {"id": [f"img{i}" for i in arrival], "uri": [f"/d/img{i}.jpg" for i in arrival],
            "label": arrival, "skip_reason": [""] * 6}
    meta, feats = in_input_order(chunk, meta, {"cls_1": np.array(arrival, np.float32)[:, None]})
    assert meta["id"] == [f"img{i}" for i in range(6)] and meta["label"] == list(range(6))
    assert feats["cls_1"][:, 0].tolist() == list(range(6))
