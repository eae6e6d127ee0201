"""The curate stage on real photos, with copies planted the way they turn up in scraped pools.

Pool: Imagenette photos, plus re-encoded, resized, cropped and mirrored copies of some of them,
copies of evaluation images, and a broken file. The embedder is bootstrapped by the stage itself
(a small SSL backbone trained on the pool: no pretrained weights exist offline). Every pool file
must come out either in ``manifest.parquet`` or in ``dropped.parquet``, with the right reason.
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from dino_ray.config.loader import load_job
from dino_ray.pipeline import Pipeline

pytestmark = pytest.mark.slow
PRESET = Path(__file__).resolve().parents[1] / "presets" / "tiny.yaml"
KINDS = ("reencoded", "resized", "cropped", "mirrored")
PER_CLASS, EVAL_PER_CLASS = 14, 3
# A 600-step, 4-block embedder puts distinct photos within cosine ~0.985 of each other after
# centering (a narrow cone), and copies above it: the thresholds are set for that embedder.
THRESHOLD = 0.985


def near_copy(img: Image.Image, kind: str) -> tuple[bytes, str]:
    w, h = img.size
    buf = io.BytesIO()
    if kind == "reencoded":
        img.save(buf, "JPEG", quality=35)
        return buf.getvalue(), "jpg"
    if kind == "resized":
        img = img.resize((w * 3 // 5, h * 3 // 5), Image.BICUBIC)
    elif kind == "cropped":  # a 5% border trimmed on every side
        img = img.crop((w // 20, h // 20, w - w // 20, h - h // 20))
    else:
        img = ImageOps.mirror(img)
    img.save(buf, "PNG")
    return buf.getvalue(), "png"


def open_rgb(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


@pytest.fixture(scope="module")
def planted(imagenette_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("curate")
    pool, evals, seeds = root / "pool", root / "eval", root / "seed"
    for d in (pool, evals, seeds):
        d.mkdir()
    originals = [f for cls in sorted((imagenette_dir / "train").iterdir()) for f in sorted(cls.iterdir())[:PER_CLASS]]
    eval_images = [f for cls in sorted((imagenette_dir / "val").iterdir())
                   for f in sorted(cls.iterdir())[:EVAL_PER_CLASS]]
    names = [f"{f.parent.name}_{f.name}" for f in originals]
    for f, name in zip(originals, names):
        (pool / name).write_bytes(f.read_bytes())
    for f in eval_images:
        (evals / f.name).write_bytes(f.read_bytes())
    copies = {}  # planted file name -> the original's pool name
    for i in range(0, len(originals), 5):
        kind = KINDS[(i // 5) % len(KINDS)]
        data, ext = near_copy(open_rgb(originals[i]), kind)
        copies[f"copy_{kind}_{i:03d}.{ext}"] = names[i]
        (pool / f"copy_{kind}_{i:03d}.{ext}").write_bytes(data)
    eval_copies = []
    for i in range(0, len(eval_images), 4):
        data, ext = near_copy(open_rgb(eval_images[i]), KINDS[(i // 4) % len(KINDS)])
        eval_copies.append(f"evalcopy_{i:03d}.{ext}")
        (pool / eval_copies[-1]).write_bytes(data)
    (pool / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    seed_of = {}  # seed file -> the pool original it was made from (none of them has a planted copy)
    for i in range(2, len(originals), 23):
        buf = io.BytesIO()
        ImageOps.mirror(open_rgb(originals[i])).save(buf, "JPEG", quality=60)
        (seeds / f"seed_{i:03d}.jpg").write_bytes(buf.getvalue())
        seed_of[f"seed_{i:03d}.jpg"] = names[i]
    return {"pool": pool, "eval": evals, "seed": seeds, "copies": copies, "eval_copies": eval_copies,
            "originals": names, "seed_of": seed_of}


def curate_job(planted: dict, tmp_path: Path, *extra: str):
    return load_job(PRESET, [
        f"output_root={tmp_path / 'out'}", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "stages=[curate]", f"curate.pool.uri={planted['pool']}", f"curate.eval_sets=[{{uri: {planted['eval']}}}]",
        "curate.embed.bootstrap_iterations=600", "curate.embed.image_size=64",
        "curate.embed.model={embed_dim: 96, depth: 4, num_heads: 3, patch_size: 8, img_size: 64}",
        f"curate.curation.dedup.threshold={THRESHOLD}", f"curate.curation.decontamination.threshold={THRESHOLD}",
        "curate.curation.sampling.target_fraction=0.5", *extra,
    ])


def test_curate_drops_planted_copies_balances_and_retrieves(ray_session, planted, tmp_path):
    manifests = Pipeline(curate_job(planted, tmp_path), ensure_ray=lambda: None).run()
    out, summary = manifests["curate"]["outputs"], manifests["curate"]["summary"]
    kept = {Path(r["uri"]).name: r for r in pq.read_table(out["manifest"]).to_pylist()}
    dropped = {Path(r["uri"]).name: r for r in pq.read_table(out["dropped"]).to_pylist()}

    # Nothing is lost: every pool file is either kept or dropped with a reason, never both.
    files = {p.name for p in planted["pool"].iterdir()}
    assert set(kept) | set(dropped) == files and not set(kept) & set(dropped)
    assert dropped["broken.jpg"]["why"] not in ("duplicate", "eval_copy", "not_sampled")
    assert summary["pool_skipped"] == 1

    # Planted copies: the copy or its original goes as a duplicate (the other may stay, or go with
    # the whole component when the weak embedder also joined a third photo to it).
    caught = {c: "duplicate" in (dropped.get(c, {}).get("why"), dropped.get(o, {}).get("why"))
              for c, o in planted["copies"].items()}
    assert all(v for c, v in caught.items() if not c.startswith("copy_cropped")), caught
    assert sum(caught.values()) >= 0.85 * len(caught), caught
    # Distinct photos joined to something by mistake: the small embedder packs a few dark, plain
    # photos within the threshold of each other (5 of 140 when this test was written).
    pair_members = set(planted["copies"]) | set(planted["copies"].values())
    wrongly_merged = [n for n, r in dropped.items() if r["why"] == "duplicate" and n not in pair_members]
    assert len(wrongly_merged) <= 0.06 * len(planted["originals"]), wrongly_merged

    # Copies of evaluation images go; distinct pool photos stay.
    eval_dropped = {n for n, r in dropped.items() if r["why"] == "eval_copy"}
    assert len(eval_dropped & set(planted["eval_copies"])) >= 0.75 * len(planted["eval_copies"]), eval_dropped
    assert len(eval_dropped - set(planted["eval_copies"])) <= 0.03 * len(planted["originals"]), eval_dropped

    # Balanced sampling flattens the cluster sizes: the biggest cluster's share shrinks.
    before, after = summary["cluster_sizes_before"], summary["cluster_sizes_after"]
    assert max(after) / sum(after) < max(before) / sum(before), (before, after)
    assert all(r["reason"] == "balanced_sample" for r in kept.values())

    # The same curation as Ray tasks over the embedding shards (embeddings reused): the same files kept
    # and dropped, for the same reasons, and the driver never loaded the pool's embeddings.
    dist = Pipeline(curate_job(planted, tmp_path, "curate.curation.execution.mode=distributed"),
                    ensure_ray=lambda: None).run()["curate"]
    assert dist["summary"]["curation_path"] == "distributed" and dist["summary"]["embedded_this_run"] == 0
    dist_kept = {Path(r["uri"]).name: r for r in pq.read_table(dist["outputs"]["manifest"]).to_pylist()}
    dist_dropped = {Path(r["uri"]).name: r for r in pq.read_table(dist["outputs"]["dropped"]).to_pylist()}
    assert dist_kept == kept
    assert {n: (r["why"], Path(r["duplicate_of"]).name) for n, r in dist_dropped.items()} == {
        n: (r["why"], Path(r["duplicate_of"]).name) for n, r in dropped.items()}
    assert dist["summary"]["pool_skipped"] == 1 and dist["summary"]["kept"] == summary["kept"]

    # Second run, retrieval only: the embedder and pool embeddings are reused, and each seed image
    # (a mirrored re-encode of a pool photo) retrieves that photo.
    job = curate_job(planted, tmp_path, f"curate.seed_set={{uri: {planted['seed']}}}",
                     "curate.curation.pool_selection=none", "curate.curation.retrieval={mode: sample, n_per_seed: 1}")
    again = Pipeline(job, ensure_ray=lambda: None).run()["curate"]
    assert again["summary"]["embedded_this_run"] == 0
    retrieved = {Path(r["uri"]).name for r in pq.read_table(again["outputs"]["manifest"]).to_pylist()}
    hits = [planted["seed_of"][s] in retrieved for s in planted["seed_of"]]
    assert sum(hits) >= len(hits) - 1, (retrieved, planted["seed_of"])
