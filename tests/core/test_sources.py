"""Image sources: folders, ImageFolder trees, tar archives, parquet bytes, manifests; ids, labels, subsets."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dino_ray.data.sources import (
    SourceConfig, class_names, iter_rows, list_images, read_image_bytes, resolve_format, stable_index,
)


@pytest.fixture(scope="module")
def jpegs(imagenette_dir) -> list[bytes]:
    return [p.read_bytes() for p in sorted((imagenette_dir / "val").rglob("*.JPEG"))[::50][:9]]


@pytest.fixture
def tree(tmp_path, jpegs) -> Path:
    """root/<class>/<file> with three classes, odd extensions and a non-image file."""
    root = tmp_path / "tree"
    names = {"zebra": ["a.jpg", "b.JPG"], "apple": ["c.jpeg", "d.JPEG", "sub/e.jpg"], "mango": ["f.jpg"]}
    k = 0
    for cls, files in names.items():
        for name in files:
            path = root / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpegs[k])
            k += 1
    (root / "apple" / "notes.txt").write_text("not an image")
    (root / "top.png").write_bytes(jpegs[k])
    return root


def test_folder_listing_is_recursive_sorted_and_filters_extensions(tree):
    refs = list_images(SourceConfig(str(tree)))
    assert [r.id for r in refs] == ["apple/c.jpeg", "apple/d.JPEG", "apple/sub/e.jpg", "mango/f.jpg", "top.png",
                                    "zebra/a.jpg", "zebra/b.JPG"]
    assert all(r.label == -1 for r in refs) and refs[0].uri == str(tree / "apple" / "c.jpeg")
    assert resolve_format(SourceConfig(str(tree))) == "folder"
    assert [r.id for r in list_images(SourceConfig(str(tree), extensions=("png",)))] == ["top.png"]


def test_imagefolder_labels_follow_sorted_class_names(tree):
    cfg = SourceConfig(str(tree), labels_from_folders=True)
    assert resolve_format(cfg) == "imagefolder"
    names = class_names(cfg)
    assert names == ["apple", "mango", "sub", "zebra"]  # the parent folder names the class
    labels = {r.id: r.label for r in list_images(cfg)}
    assert labels == {"apple/c.jpeg": 0, "apple/d.JPEG": 0, "apple/sub/e.jpg": 2, "mango/f.jpg": 1,
                      "top.png": -1, "zebra/a.jpg": 3, "zebra/b.JPG": 3}


def test_max_images_is_a_deterministic_seeded_sample(imagenette_dir):
    cfg = SourceConfig(str(imagenette_dir / "val"), labels_from_folders=True, max_images=30)
    first, second = list_images(cfg), list_images(cfg)
    assert first == second and len(first) == 30
    assert [r.id for r in first] == sorted(r.id for r in first)
    all_ids = {r.id for r in list_images(SourceConfig(str(imagenette_dir / "val")))}
    assert {r.id for r in first} <= all_ids
    other = list_images(SourceConfig(str(imagenette_dir / "val"), max_images=30, subset_seed=1))
    assert {r.id for r in other} != {r.id for r in first}
    assert len({r.label for r in first}) >= 6  # a sample, not the first classes in sorted order


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_tar_archives_yield_members_as_rows(tmp_path, jpegs):
    archive = tmp_path / "shard.tar"
    _tar(archive, {"cat/1.jpg": jpegs[0], "dog/2.jpg": jpegs[1], "dog/readme.txt": b"x", "cat/3.png": jpegs[2]})
    cfg = SourceConfig(str(archive), labels_from_folders=True)
    assert resolve_format(cfg) == "tar"
    refs = list_images(cfg)
    assert [(r.id, r.label) for r in refs] == [("cat/1.jpg", 0), ("cat/3.png", 0), ("dog/2.jpg", 1)]
    assert refs[0].uri == f"{archive}#cat/1.jpg"
    rows = list(iter_rows(cfg))
    assert [r["id"] for r in rows] == ["cat/1.jpg", "dog/2.jpg", "cat/3.png"]  # archive order
    assert rows[1]["bytes"] == jpegs[1] and rows[1]["label"] == 1
    assert read_image_bytes(refs[2].uri) == jpegs[1]
    with pytest.raises(FileNotFoundError, match="no member"):
        read_image_bytes(f"{archive}#cat/missing.jpg")


def test_tar_shards_prefix_ids_with_the_shard(tmp_path, jpegs):
    (tmp_path / "shards").mkdir()
    _tar(tmp_path / "shards" / "000.tar", {"x.jpg": jpegs[0]})
    _tar(tmp_path / "shards" / "001.tar", {"x.jpg": jpegs[1]})
    rows = list(iter_rows(SourceConfig(str(tmp_path / "shards"), max_images=2)))
    assert [r["id"] for r in rows] == ["000.tar/x.jpg", "001.tar/x.jpg"]
    assert [r["bytes"] for r in rows] == jpegs[:2]


def test_parquet_bytes_with_ids_string_labels_and_hf_structs(tmp_path, jpegs):
    table = pa.table({"image": [jpegs[0], jpegs[1], jpegs[2]], "key": ["k0", "k1", "k2"],
                      "cls": ["dog", "cat", "dog"]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    cfg = SourceConfig(str(tmp_path / "part-0.parquet"), id_column="key", label_column="cls")
    assert resolve_format(cfg) == "parquet" and class_names(cfg) == ["cat", "dog"]
    rows = list(iter_rows(cfg))
    assert [(r["id"], r["label"]) for r in rows] == [("k0", 1), ("k1", 0), ("k2", 1)]
    assert rows[2]["bytes"] == jpegs[2] and rows[0]["uri"].endswith("part-0.parquet#k0")
    subset = [r["id"] for r in iter_rows(SourceConfig(str(tmp_path), id_column="key", max_images=2))]
    assert len(subset) == 2 and set(subset) < {"k0", "k1", "k2"}
    assert subset == [r["id"] for r in iter_rows(SourceConfig(str(tmp_path), id_column="key", max_images=2))]
    hf = pa.table({"image": [{"bytes": jpegs[3], "path": "a.jpg"}], "label": [7]})
    pq.write_table(hf, tmp_path / "hf.parquet")
    hf_rows = list(iter_rows(SourceConfig(str(tmp_path / "hf.parquet"), label_column="label")))
    assert hf_rows[0]["bytes"] == jpegs[3] and hf_rows[0]["label"] == 7 and hf_rows[0]["id"].startswith("sha1:")
    with pytest.raises(ValueError, match="needs id_column"):
        list(iter_rows(SourceConfig(str(tmp_path / "hf.parquet"), max_images=1)))


def test_manifest_of_uris_relative_and_absolute(tmp_path, tree):
    out = tmp_path / "curated"
    out.mkdir()
    pq.write_table(pa.table({"uri": [str(tree / "zebra" / "a.jpg"), "../tree/mango/f.jpg"], "id": ["z", "m"],
                             "label": [3, 1]}), out / "manifest.parquet")
    cfg = SourceConfig(str(out / "manifest.parquet"), id_column="id", label_column="label")
    assert resolve_format(cfg) == "manifest"
    refs = list_images(cfg)
    assert [(r.id, r.label) for r in refs] == [("m", 1), ("z", 3)]
    assert Path(refs[0].uri).resolve() == (tree / "mango" / "f.jpg").resolve()
    rows = list(iter_rows(cfg))
    assert rows[1]["bytes"] == (tree / "zebra" / "a.jpg").read_bytes()


def test_validation_names_field_and_value(tmp_path):
    with pytest.raises(ValueError, match="format='zip'"):
        SourceConfig(str(tmp_path), format="zip").validate()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(SourceConfig(str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="uri is empty"):
        list_images(SourceConfig(""))
    SourceConfig("").validate()  # config loading: no I/O, an empty uri is filled in later
    with pytest.raises(ValueError, match="max_images"):
        SourceConfig(str(tmp_path), max_images=0).validate()
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        resolve_format(SourceConfig(str(tmp_path)))


def test_duplicate_ids_are_rejected(tmp_path, tree):
    pq.write_table(pa.table({"uri": [str(tree / "zebra" / "a.jpg")] * 2}), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="duplicate image id"):
        list_images(SourceConfig(str(tmp_path / "m.parquet")))


def put_s3(uri: str, data: bytes) -> None:
    # boto3 rather than storage.write_bytes: pyarrow's multipart upload fails against moto here.
    import os

    import boto3

    bucket, key = uri[len("s3://"):].split("/", 1)
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_object(Bucket=bucket, Key=key, Body=data)


def test_s3_folder_listing(s3_bucket, jpegs):
    for i in range(3):
        put_s3(f"{s3_bucket}/imgs/c{i % 2}/{i}.jpg", jpegs[i])
    refs = list_images(SourceConfig(f"{s3_bucket}/imgs", labels_from_folders=True))
    assert [(r.id, r.label) for r in refs] == [("c0/0.jpg", 0), ("c0/2.jpg", 0), ("c1/1.jpg", 1)]
    assert refs[2].uri == f"{s3_bucket}/imgs/c1/1.jpg" and read_image_bytes(refs[2].uri) == jpegs[1]


def test_stable_index_is_a_deterministic_63_bit_hash():
    values = [stable_index(f"img/{i}.jpg") for i in range(1000)]
    assert values == [stable_index(f"img/{i}.jpg") for i in range(1000)]
    assert min(values) >= 0 and max(values) < 2**63 and len(set(values)) == 1000


def test_listing_survives_bad_names_links_and_loops(tree):
    """One odd entry must not fail (or multiply) the listing; each is reported with its reason."""
    import os

    from dino_ray.data.sources import scan

    os.symlink("..", tree / "apple" / "up")  # a cycle: apple/up/apple/up/...
    os.symlink(tree / "gone.jpg", tree / "mango" / "dangling.jpg")
    with open(os.path.join(os.fsencode(tree / "zebra"), b"caf\xe9.jpg"), "wb") as f:  # Latin-1, not UTF-8
        f.write(b"x")
    (tree / "folder.jpg").mkdir()  # a folder with an image's name is walked, not read as an image
    before = [r.id for r in list_images(SourceConfig(str(tree)))]
    listing = scan(SourceConfig(str(tree)))
    reasons = sorted(reason for _, reason in listing.unlisted)
    assert reasons == ["broken_symlink", "non_utf8_name", "symlink_loop"]
    assert before == ["apple/c.jpeg", "apple/d.JPEG", "apple/sub/e.jpg", "mango/f.jpg", "top.png", "zebra/a.jpg",
                      "zebra/b.JPG"]


def test_a_truncated_tar_shard_keeps_the_members_before_the_damage(tmp_path, jpegs):
    good, bad = tmp_path / "shards" / "a.tar", tmp_path / "shards" / "b.tar"
    good.parent.mkdir()
    _tar(good, {"1.jpg": jpegs[0]})
    _tar(bad, {"2.jpg": jpegs[1], "3.jpg": jpegs[2]})
    data = bad.read_bytes()
    bad.write_bytes(data[:512 + len(jpegs[1]) + 1024 + 100])  # cut inside the second member
    ids = [r.id for r in list_images(SourceConfig(str(good.parent)))]  # used to raise tarfile.ReadError
    assert ids[:2] == ["a.tar/1.jpg", "b.tar/2.jpg"]  # the intact shard and the members before the cut


def test_what_a_training_listing_could_not_list_reaches_the_stage_summary(tmp_path, jpegs):
    """Listed once on the driver: unlisted entries (a dangling link, a damaged shard) are counted and named in
    the summary that goes to the stage manifest and MLflow, next to the images the stream skipped."""
    import os

    from dino_ray.stages.training import build_index, stage_summary

    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "a.tar", {"1.jpg": jpegs[0], "2.jpg": jpegs[1]})
    data = (shards / "a.tar").read_bytes()
    (shards / "a.tar").write_bytes(data[:512 + len(jpegs[0]) + 1024 + 100])  # cut inside the second member
    _tar(shards / "b.tar", {"3.jpg": jpegs[2]})
    os.symlink(shards / "gone.tar", shards / "c.tar")
    index = build_index(SourceConfig(str(shards)), str(tmp_path / "index.parquet"))
    assert index.n_images == 3  # a.tar: both headers were read before the damage (2.jpg is cut: a decode skip)
    summary = stage_summary({"timing": {}, "final_step": 5, "skipped_by_reason": {"missing": 3}}, index)
    assert summary["unlisted"] == 2
    assert summary["unlisted_by_reason"] == {"broken_symlink": 1, "damaged_archive": 1}
    assert any("a.tar" in s for s in summary["unlisted_samples"])
    assert summary["skipped_images"] == 3 and summary["skipped_by_reason"] == {"missing": 3}
