"""Image sources: folders, ImageFolder trees, tar archives, parquet bytes, manifests; ids, labels, subsets."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dino_ray import storage
from dino_ray.data import archives
from dino_ray.data.sources import SourceConfig, class_names, list_images, read_image_bytes, resolve_format
from testlib import write_tar


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


def test_tar_members_are_refs_read_by_their_uri(tmp_path, jpegs):
    archive = tmp_path / "shard.tar"
    write_tar(archive, {"cat/1.jpg": jpegs[0], "dog/2.jpg": jpegs[1], "dog/readme.txt": b"x", "cat/3.png": jpegs[2]})
    cfg = SourceConfig(str(archive), labels_from_folders=True)
    assert resolve_format(cfg) == "tar"
    refs = list_images(cfg)
    assert [(r.id, r.label) for r in refs] == [("cat/1.jpg", 0), ("cat/3.png", 0), ("dog/2.jpg", 1)]
    assert refs[0].uri == f"{archive}#cat/1.jpg"
    assert [read_image_bytes(r.uri) for r in refs] == [jpegs[0], jpegs[2], jpegs[1]]
    with pytest.raises(FileNotFoundError, match="no member"):
        read_image_bytes(f"{archive}#cat/missing.jpg")


def test_tar_shards_prefix_ids_with_the_shard(tmp_path, jpegs):
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "000.tar", {"x.jpg": jpegs[0]})
    write_tar(tmp_path / "shards" / "001.tar", {"x.jpg": jpegs[1]})
    refs = list_images(SourceConfig(str(tmp_path / "shards"), max_images=2))
    assert [r.id for r in refs] == ["000.tar/x.jpg", "001.tar/x.jpg"]
    assert [read_image_bytes(r.uri) for r in refs] == jpegs[:2]


def test_parquet_bytes_with_ids_string_labels_and_hf_structs(tmp_path, jpegs):
    table = pa.table({"image": [jpegs[0], jpegs[1], jpegs[2]], "key": ["k2", "k0", "k1"],
                      "cls": ["dog", "cat", "dog"]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    cfg = SourceConfig(str(tmp_path / "part-0.parquet"), id_column="key", label_column="cls")
    assert resolve_format(cfg) == "parquet" and class_names(cfg) == ["cat", "dog"]
    refs = list_images(cfg)
    assert [(r.id, r.label) for r in refs] == [("k2", 1), ("k0", 0), ("k1", 1)]  # file order: row groups stay hot
    assert refs[2].uri == f"{tmp_path / 'part-0.parquet'}#row=2&column=image"
    assert [read_image_bytes(r.uri) for r in refs] == jpegs[:3]
    subset = [r.id for r in list_images(SourceConfig(str(tmp_path), id_column="key", max_images=2))]
    assert len(subset) == 2 and set(subset) < {"k0", "k1", "k2"}
    assert subset == [r.id for r in list_images(SourceConfig(str(tmp_path), id_column="key", max_images=2))]
    hf = pa.table({"picture": [{"bytes": jpegs[3], "path": "a.jpg"}, {"bytes": None, "path": "b.jpg"}],
                   "label": [7, 2]})
    pq.write_table(hf, tmp_path / "hf.parquet")
    hf_cfg = SourceConfig(str(tmp_path / "hf.parquet"), image_column="picture", label_column="label")
    hf_refs = list_images(hf_cfg)
    assert [(r.id, r.label) for r in hf_refs] == [("hf.parquet#0", 7), ("hf.parquet#1", 2)]  # no id column
    assert read_image_bytes(hf_refs[0].uri) == jpegs[3] and read_image_bytes(hf_refs[1].uri) == b""  # -> "empty"
    assert len(list_images(SourceConfig(str(tmp_path / "hf.parquet"), image_column="picture", max_images=1))) == 1
    with pytest.raises(ValueError, match="column 'image' not found in .*hf.parquet"):
        list_images(SourceConfig(str(tmp_path / "hf.parquet"), format="parquet"))


def test_parquet_rows_are_read_by_row_group_with_a_bounded_cache(tmp_path, jpegs, monkeypatch):
    """Reading a row reads its row group, not the file; rows read in order read each row group once; the
    cache holds two row groups at most; a row that is not there is an error naming the file and the row."""
    path = tmp_path / "groups.parquet"
    pq.write_table(pa.table({"image": jpegs[:7], "n": list(range(7))}), path, row_group_size=3)
    reads: list[int] = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: reads.append(i) or real(self, i, *a, **k))
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("a row read must not read the whole file"))
    archives.ROW_GROUPS.clear()
    refs = list_images(SourceConfig(str(path)))
    assert [r.id for r in refs] == [f"groups.parquet#{i}" for i in range(7)]
    assert [read_image_bytes(r.uri) for r in refs] == jpegs[:7]
    assert reads == [0, 1, 2]
    assert read_image_bytes(refs[4].uri) == jpegs[4] and reads == [0, 1, 2]  # still cached
    assert read_image_bytes(refs[1].uri) == jpegs[1] and reads == [0, 1, 2, 0]  # evicted: only 2 kept
    assert len(archives.ROW_GROUPS) == 2
    with pytest.raises(FileNotFoundError, match=r"groups.parquet' has no row 7: it has 7 rows"):
        read_image_bytes(f"{path}#row=7&column=image")
    with pytest.raises(ValueError, match=r"bad parquet row URI .*groups.parquet#row=-1"):
        read_image_bytes(f"{path}#row=-1&column=image")
    with pytest.raises(ValueError, match=r"bad parquet row URI .*#row=two"):
        read_image_bytes(f"{path}#row=two&column=image")
    with pytest.raises(ValueError, match="has no image column 'photo' .*row 0"):
        read_image_bytes(f"{path}#row=0&column=photo")
    with pytest.raises(FileNotFoundError):
        read_image_bytes(f"{tmp_path / 'gone.parquet'}#row=0&column=image")
    odd = archives.row_uri(str(path), 3, "my col#&=")
    assert archives.parse_row_uri(odd) == (str(path), 3, "my col#&=")  # any column name survives the URI


def test_a_flaky_store_is_retried_for_parquet_rows_and_tar_members(tmp_path, jpegs, monkeypatch):
    """Row and member reads retry like file reads: a transient OSError is retried, a store that keeps failing
    raises StorageError (never a skip)."""
    pq.write_table(pa.table({"image": jpegs[:2]}), tmp_path / "p.parquet")
    write_tar(tmp_path / "a.tar", {"x.jpg": jpegs[2]})
    failures = {"left": 0}
    real_filesystem = storage.filesystem

    class Flaky:
        def __init__(self, fs):
            self.fs = fs

        def open_input_file(self, path):
            if failures["left"]:
                failures["left"] -= 1
                raise OSError("connection reset by peer")
            return self.fs.open_input_file(path)

    monkeypatch.setattr(storage, "filesystem", lambda uri: (Flaky(real_filesystem(uri)[0]), real_filesystem(uri)[1]))
    monkeypatch.setattr(storage, "READ_RETRY", storage.Retry(attempts=3, backoff_s=0.01))
    for uri, expected in ((f"{tmp_path / 'p.parquet'}#row=1&column=image", jpegs[1]),
                          (f"{tmp_path / 'a.tar'}#x.jpg", jpegs[2])):
        archives.ROW_GROUPS.clear()
        failures["left"] = 2
        assert read_image_bytes(uri) == expected  # two failures, then the third attempt reads it
        archives.ROW_GROUPS.clear()
        failures["left"] = 3
        with pytest.raises(storage.StorageError, match="failed 3 times"):
            read_image_bytes(uri)


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
    assert read_image_bytes(refs[1].uri) == (tree / "zebra" / "a.jpg").read_bytes()


def test_a_manifest_of_parquet_rows_and_tar_members(tmp_path, jpegs):
    """What curate writes for a parquet or tar pool: a manifest whose URIs name rows and members."""
    pq.write_table(pa.table({"image": jpegs[:2]}), tmp_path / "pool.parquet")
    write_tar(tmp_path / "pool.tar", {"a/1.jpg": jpegs[2]})
    uris = [r.uri for r in list_images(SourceConfig(str(tmp_path / "pool.parquet")))]
    uris += [r.uri for r in list_images(SourceConfig(str(tmp_path / "pool.tar")))]
    pq.write_table(pa.table({"uri": uris}), tmp_path / "manifest.parquet")
    refs = list_images(SourceConfig(str(tmp_path / "manifest.parquet")))
    assert sorted(r.uri for r in refs) == sorted(uris)
    assert {read_image_bytes(r.uri) for r in refs} == set(jpegs[:3])


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


def test_s3_tar_shards_and_parquet_rows(s3_bucket, jpegs, tmp_path):
    write_tar(tmp_path / "0.tar", {"c/0.jpg": jpegs[0], "c/1.jpg": jpegs[1]})
    put_s3(f"{s3_bucket}/shards/0.tar", (tmp_path / "0.tar").read_bytes())
    tar_refs = list_images(SourceConfig(f"{s3_bucket}/shards"))
    assert [r.uri for r in tar_refs] == [f"{s3_bucket}/shards/0.tar#c/0.jpg", f"{s3_bucket}/shards/0.tar#c/1.jpg"]
    assert [read_image_bytes(r.uri) for r in tar_refs] == jpegs[:2]
    pq.write_table(pa.table({"image": jpegs[2:5], "y": [1, 0, 1]}), tmp_path / "p.parquet", row_group_size=2)
    put_s3(f"{s3_bucket}/pq/p.parquet", (tmp_path / "p.parquet").read_bytes())
    refs = list_images(SourceConfig(f"{s3_bucket}/pq", label_column="y"))
    assert [(r.id, r.label) for r in refs] == [("p.parquet#0", 1), ("p.parquet#1", 0), ("p.parquet#2", 1)]
    assert refs[0].uri == f"{s3_bucket}/pq/p.parquet#row=0&column=image"
    assert [read_image_bytes(r.uri) for r in refs] == jpegs[2:5]


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
    write_tar(good, {"1.jpg": jpegs[0]})
    write_tar(bad, {"2.jpg": jpegs[1], "3.jpg": jpegs[2]})
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
    write_tar(shards / "a.tar", {"1.jpg": jpegs[0], "2.jpg": jpegs[1]})
    data = (shards / "a.tar").read_bytes()
    (shards / "a.tar").write_bytes(data[:512 + len(jpegs[0]) + 1024 + 100])  # cut inside the second member
    write_tar(shards / "b.tar", {"3.jpg": jpegs[2]})
    os.symlink(shards / "gone.tar", shards / "c.tar")
    index = build_index(SourceConfig(str(shards)), str(tmp_path / "index.parquet"))
    assert index.n_images == 3  # a.tar: both headers were read before the damage (2.jpg is cut: a decode skip)
    summary = stage_summary({"timing": {}, "final_step": 5, "skipped_by_reason": {"missing": 3}}, index)
    assert summary["unlisted"] == 2
    assert summary["unlisted_by_reason"] == {"broken_symlink": 1, "damaged_archive": 1}
    assert any("a.tar" in s for s in summary["unlisted_samples"])
    assert summary["skipped_images"] == 3 and summary["skipped_by_reason"] == {"missing": 3}
