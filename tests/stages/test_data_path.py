"""The one data path of every stage: ``list_images`` on the driver, ``read_image_bytes`` in the Ray Data actors.

Bad files are counted exactly by reason and good ones all kept; an s3:// prefix is read through the moto
endpoint; tar shards and parquet rows reach inference, the training stream and a real pretrain run; inference
shards keep their input order.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dino_ray import feature_store, storage
from dino_ray.data.decode import DecodeConfig
from dino_ray.data.sources import SourceConfig, class_names, list_images
from testlib import encode, png_header_only, write_tar

PRESET = Path(__file__).resolve().parents[1] / "presets" / "tiny.yaml"


def features(sources: list[SourceConfig], out: Path, decode: DecodeConfig | None = None, **kwargs):
    """Pixel features of every listed image of ``sources``, as the curate and eval stages compute them."""
    from dino_ray.stages.inference import InferenceSpec, run_inference

    rows = [{"id": r.id, "uri": r.uri, "label": r.label} for source in sources for r in list_images(source)]
    spec = InferenceSpec(backbone=None, image_size=16, mode="pixels", decode=decode or DecodeConfig(), pixel_size=8)
    shards, computed = run_inference(rows, spec, str(out), cpus_per_actor=0.5, batch_size=8, **kwargs)
    assert computed == len(rows)
    return feature_store.read_features(shards)


def skipped(meta: dict) -> dict[str, str]:
    return {str(i): str(r) for i, r in zip(meta["id"], meta["skip_reason"]) if r}


@pytest.fixture(scope="module")
def good_jpegs(imagenette_dir) -> list[Path]:
    return sorted((imagenette_dir / "train").rglob("*.JPEG"))[::60][:20]


@pytest.fixture
def bad_input_folder(tmp_path, good_jpegs) -> tuple[Path, dict[str, str]]:
    """20 real JPEGs, 4 unusual-but-valid images, 7 bad files; returns (root, expected reason by id)."""
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


def test_bad_inputs_are_counted_exactly_and_good_ones_kept(ray_session, bad_input_folder, tmp_path):
    root, expected = bad_input_folder
    source = SourceConfig(str(root), labels_from_folders=True)
    assert class_names(source) == ["bad", "good", "odd"]
    meta, feats = features([source], tmp_path / "feats", DecodeConfig(max_pixels=150_000))
    assert len(meta["id"]) == 31 and skipped(meta) == expected
    assert Counter(skipped(meta).values()) == {"not_an_image": 2, "truncated": 1, "empty": 1, "too_large": 2,
                                               "too_small": 1}
    kept = {str(i): int(label) for i, label, r in zip(meta["id"], meta["label"], meta["skip_reason"]) if not r}
    assert kept == {**{f"good/{i:02d}.jpg": 1 for i in range(20)},
                    **{f"odd/{n}": 2 for n in ("alpha.png", "cmyk.jpg", "deep16.png", "palette.png")}}
    good = np.array([not r for r in meta["skip_reason"]])
    assert np.abs(feats["cls_1"][good]).sum(axis=1).min() > 0  # every kept image has real pixels


def test_s3_prefix_and_s3_parquet_are_read_through_the_env_endpoint(ray_session, s3_bucket, good_jpegs, tmp_path):
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = s3_bucket[len("s3://"):]
    for i, path in enumerate(good_jpegs[:4]):
        client.put_object(Bucket=bucket, Key=f"pool/c{i % 2}/{i}.jpg", Body=path.read_bytes())
    client.put_object(Bucket=bucket, Key="pool/c0/broken.jpg", Body=b"\xff\xd8 not really")
    pq.write_table(pa.table({"image": [p.read_bytes() for p in good_jpegs[4:7]], "key": ["p0", "p1", "p2"]}),
                   tmp_path / "rows.parquet", row_group_size=2)
    client.put_object(Bucket=bucket, Key="rows/rows.parquet", Body=(tmp_path / "rows.parquet").read_bytes())
    meta, _ = features([SourceConfig(f"{s3_bucket}/pool", labels_from_folders=True),
                        SourceConfig(f"{s3_bucket}/rows", id_column="key")], tmp_path / "feats")
    assert skipped(meta) == {"c0/broken.jpg": "not_an_image"}
    kept = [(str(i), str(u), int(label)) for i, u, label, r in zip(meta["id"], meta["uri"], meta["label"],
                                                                   meta["skip_reason"]) if not r]
    assert kept == [("c0/0.jpg", f"{s3_bucket}/pool/c0/0.jpg", 0), ("c0/2.jpg", f"{s3_bucket}/pool/c0/2.jpg", 0),
                    ("c1/1.jpg", f"{s3_bucket}/pool/c1/1.jpg", 1), ("c1/3.jpg", f"{s3_bucket}/pool/c1/3.jpg", 1)] + [
        (f"p{i}", f"{s3_bucket}/rows/rows.parquet#row={i}&column=image", -1) for i in range(3)]


def test_tar_and_parquet_sources(ray_session, tmp_path, good_jpegs):
    tar = write_tar(tmp_path / "shard.tar", {f"k{i % 2}/{i}.jpg": p.read_bytes() for i, p in enumerate(good_jpegs[:5])})
    (tmp_path / "pq").mkdir()
    table = pa.table({"image": [p.read_bytes() for p in good_jpegs[:6]] + [b"junk"],
                      "name": [f"n{i}" for i in range(7)], "cls": ["b", "a", "b", "a", "b", "a", "a"]})
    pq.write_table(table, tmp_path / "pq" / "part.parquet", row_group_size=3)
    meta, _ = features([SourceConfig(str(tar), labels_from_folders=True, max_images=4),
                        SourceConfig(str(tmp_path / "pq"), id_column="name", label_column="cls")], tmp_path / "feats")
    tar_rows = [(str(u), int(label)) for u, label in zip(meta["uri"], meta["label"]) if str(u).startswith(str(tar))]
    assert len(tar_rows) == 4 and {label for _, label in tar_rows} == {0, 1}
    assert all(u.startswith(f"{tar}#k") for u, _ in tar_rows)
    assert skipped(meta) == {"n6": "not_an_image"}
    pq_rows = [(str(i), int(label)) for i, label, r in zip(meta["id"], meta["label"], meta["skip_reason"])
               if str(i).startswith("n") and not r]
    assert pq_rows == [(f"n{i}", 1 - i % 2) for i in range(6)]


def test_the_training_stream_crops_parquet_rows_and_counts_a_bad_one(ray_session, tmp_path, good_jpegs):
    """The multi-crop batches of ssl_stream over an index of parquet row URIs: every crop and mask column with
    its shape, fresh views in the second epoch, and the one undecodable row skipped once per epoch."""
    import torch

    from dino_ray.config.loader import load_job
    from dino_ray.data.ssl_stream import StreamSpec, ssl_batches, write_index

    images = [p.read_bytes() for p in good_jpegs[:7]] + [b"not an image"]
    pq.write_table(pa.table({"image": images}), tmp_path / "rows.parquet", row_group_size=3)
    refs = list_images(SourceConfig(str(tmp_path / "rows.parquet")))
    n = write_index([r.uri for r in refs], str(tmp_path / "index.parquet"), ids=[r.id for r in refs])
    data = load_job(PRESET, [f"output_root={tmp_path}", "stages=[pretrain]",
                             f"pretrain.data.source.uri={tmp_path / 'rows.parquet'}"]).pretrain.data
    spec = StreamSpec(index_uri=str(tmp_path / "index.parquet"), n_images=n, seed=0, batch_size=4, world_size=1,
                      rank=0, start_step=0, total_steps=4)
    batches = list(ssl_batches(spec, data))
    crops = data.crops
    assert len(batches) == 4
    for b in batches:
        assert b["global_0"].shape == (4, 3, crops.global_crops_size, crops.global_crops_size)
        assert b["global_0"].dtype == torch.uint8 and b["mask_0"].dtype == torch.bool
        assert b[f"local_{crops.local_crops_number - 1}"].shape == (4, 3, crops.local_crops_size, crops.local_crops_size)
    epoch = torch.cat([b["epoch"] for b in batches])
    index = torch.cat([b["sample_index"] for b in batches])
    views = torch.cat([b["global_0"] for b in batches])
    assert epoch.tolist() == [0] * 8 + [1] * 8 and 7 not in index.tolist()  # row 7 never trains
    assert sum(int(b["skips"].sum()) for b in batches) == 2  # met once in each epoch, replaced, counted
    first = {int(i): v for i, v, e in zip(index, views, epoch) if e == 0}
    second = {int(i): v for i, v, e in zip(index, views, epoch) if e == 1}
    shared = set(first) & set(second)
    assert shared and all(not torch.equal(first[i], second[i]) for i in shared)  # new views each epoch


def test_inference_shards_keep_input_order_and_count_bad_files(ray_session, bad_input_folder, tmp_path):
    """Two actors finish blocks in any order; the written shard must still list rows in input order (the
    linear probe's minibatches are drawn by row index), and a corrupt image is a skip row, not a crash."""
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
    assert set(skipped(meta)) == set(expected)
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


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tar", "parquet"])
def test_pretrain_trains_from_tar_shards_and_from_parquet_rows(ray_session, cifar10_dir, tmp_path, kind):
    """The real pretrain stage, 2 steps on one worker, from two tar shards or a parquet file of image bytes
    (several row groups, string labels): it trains on every listed image and exports its teacher."""
    from dino_ray import backbone_io
    from dino_ray.config.loader import load_job
    from dino_ray.pipeline import Pipeline

    jpgs = sorted((cifar10_dir / "train").rglob("*.jpg"))[::97][:20]
    if kind == "tar":
        (tmp_path / "shards").mkdir()
        for shard in range(2):
            write_tar(tmp_path / "shards" / f"{shard:03d}.tar",
                   {f"{p.parent.name}/{p.name}": p.read_bytes() for p in jpgs[shard::2]})
        source = [f"pretrain.data.source.uri={tmp_path / 'shards'}"]
    else:
        pq.write_table(pa.table({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in jpgs],
                                 "label": [p.parent.name for p in jpgs]}), tmp_path / "train.parquet",
                       row_group_size=6)
        source = [f"pretrain.data.source.uri={tmp_path / 'train.parquet'}", "pretrain.data.source.label_column=label"]
    job = load_job(PRESET, [f"output_root={tmp_path / 'run'}", "stages=[pretrain]",
                            f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", *source,
                            "pretrain.schedule.total_iters=2", "pretrain.schedule.warmup_iters=1",
                            "pretrain.train.checkpoint_every=2", "pretrain.train.batch_size_per_worker=8",
                            "pretrain.train.scaling.num_workers=1"])
    Pipeline(job, ensure_ray=lambda: None).run()
    summary = storage.read_json(os.path.join(job.output_root, "pretrain", "_manifest.json"))["summary"]
    assert summary["images"] == len(jpgs) == 20 and summary["steps"] == 2
    assert summary["skipped_images"] == 0 and summary["unlisted"] == 0
    teacher = backbone_io.load_backbone(os.path.join(job.output_root, "pretrain", "teacher"))
    assert teacher.embed_dim == job.pretrain.model.embed_dim
