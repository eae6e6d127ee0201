"""Curate stage: embed a raw pool with a frozen backbone, then dedup / decontaminate / cluster / sample.

The embedder is a backbone checkpoint in our layout (``curate.embed.checkpoint``). A pool from a
domain no public model knows can bootstrap its own: with no checkpoint and
``curate.embed.bootstrap_iterations > 0`` the stage first trains a small SSL backbone on the raw
pool with the pretrain machinery and embeds with that.

Output: ``manifest.parquet`` (uri, id, source, label, cluster ids at every level, why kept) that the
training stages read directly, ``dropped.parquet`` (every other pool file: why it went, and for a
duplicate the copy that was kept), the embeddings (parquet shards, reused on a re-run), a cluster-size
histogram, and the summary figures in the stage manifest and MLflow.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections import Counter
from typing import Any

import numpy as np

from dino_ray import backbone_io, feature_store, storage, tracking
from dino_ray.config.loader import config_hash
from dino_ray.data.decode import policy as decode_policy
from dino_ray.data.sources import unlisted_summary
from dino_ray.stages.contract import StageContext, StageResult
from dino_ray.stages.inference import BackboneRef, InferenceSpec, image_rows, run_inference

log = logging.getLogger("dino_ray.curate")
MANIFEST = "manifest.parquet"
DROPPED = "dropped.parquet"  # every pool file not in the manifest, with why


def _embed(name: str, source: Any, embedder: BackboneRef, job: Any, ctx: StageContext,
           unlisted: list[tuple[str, str]]):
    shards, computed = _embed_shards(name, source, embedder, job, ctx, unlisted)
    meta, feats = feature_store.read_features(shards)
    return meta, feats["embedding"], computed


def _embed_shards(name: str, source: Any, embedder: BackboneRef, job: Any, ctx: StageContext,
                  unlisted: list[tuple[str, str]]) -> tuple[list[str], int]:
    """Embed a source into parquet shards (cached); returns (shard URIs, images embedded this run)."""
    cfg = job.curate.embed
    spec = InferenceSpec(backbone=embedder, image_size=cfg.image_size, mode="embed", decode=job.curate.decode,
                         flip_invariant=cfg.flip_invariant)
    rows = image_rows(source, unlisted)
    if not rows:
        raise ValueError(f"curate: no images found for {name} at {source.uri}")
    # Cached per (embedder weights, embedding settings, source): re-running with other curation
    # settings reuses them; a new embedder or source embeds afresh.
    key = config_hash({"weights": backbone_io.weights_key(embedder.uri), "spec": spec, "source": source})
    shards, computed = run_inference(rows, spec, ctx.path("embeddings", f"{name}-{key}"), num_actors=cfg.num_actors,
                                     cpus_per_actor=cfg.cpus_per_actor, gpus_per_actor=cfg.gpus_per_actor,
                                     batch_size=cfg.batch_size, shard_size=cfg.shard_size, task=f"curate embed {name}")
    return shards, computed


def _bootstrap_embedder(job: Any, ctx: StageContext) -> str:
    """Train a small SSL backbone on the raw pool (same loop as pretrain) and return its export dir."""
    from dino_ray.train.loop_spec import LoopSpec, StudentSpec
    from dino_ray.stages.training import index_for, run_training

    cfg = job.curate.embed
    pre = job.pretrain
    data = dataclasses.replace(pre.data, source=job.curate.pool, crops=_bootstrap_crops(pre.data.crops, cfg.model))
    schedule = dataclasses.replace(pre.schedule, total_iters=cfg.bootstrap_iterations,
                                   warmup_iters=min(pre.schedule.warmup_iters, cfg.bootstrap_iterations // 5),
                                   warmup_teacher_temp_iters=min(pre.schedule.warmup_teacher_temp_iters,
                                                                 cfg.bootstrap_iterations // 2),
                                   freeze_last_layer_iters=min(pre.schedule.freeze_last_layer_iters,
                                                               cfg.bootstrap_iterations // 10))
    # Keyed by everything that shapes the embedder, so changing only curation settings keeps it.
    out = ctx.path("bootstrap", config_hash({"model": cfg.model, "pretrain": [pre.loss, pre.train], "data": data,
                                             "schedule": schedule, "seed": job.seed}))
    if storage.exists(storage.join(out, "backbone.json")):
        return out
    index = index_for("curate", data, ctx, None)
    spec = LoopSpec(stage="curate_bootstrap", students=[StudentSpec("teacher", cfg.model)], loss=pre.loss,
                    schedule=schedule, train=pre.train, data=data, index_uri=index.uri, n_images=index.n_images,
                    seed=job.seed,
                    output_dir=out, tracking_uri=ctx.tracking_uri, run_id=ctx.run_id)
    run_training(spec, ctx)
    return out


def _bootstrap_crops(crops: Any, model: Any) -> Any:
    """The pretrain crops, rescaled to the embedder: global crops at its image size, local crops at the
    same fraction of it as in pretraining, both on its patch grid (iBOT masks are drawn on that grid)."""
    p, g = model.patch_size, model.img_size
    local = max(p, round(g * crops.local_crops_size / crops.global_crops_size / p) * p)
    return dataclasses.replace(crops, patch_size=p, global_crops_size=g, local_crops_size=local)


def _centered(pool: np.ndarray, eval_sets: dict, seed_set: np.ndarray | None):
    """Subtract the pool's mean embedding and re-normalise every set with it.

    Early or small embedders put all images in a narrow cone (every pair above any cosine threshold);
    removing the shared component spreads them out without changing who is near whom much.
    """
    # float64 sum, float32 mean: what the distributed path computes from per-shard sums (count_rows)
    mean = pool.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)

    def norm(x: np.ndarray) -> np.ndarray:
        x = x - mean
        return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    return norm(pool), {k: norm(v) for k, v in eval_sets.items()}, None if seed_set is None else norm(seed_set)


def _histogram_png(before: list[int], after: list[int]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    order = np.argsort(before)[::-1]
    x = np.arange(len(before))
    ax.bar(x, np.asarray(before)[order], color="#bbbbbb", label="before balancing")
    if after:
        ax.bar(x, np.asarray(after)[order], color="#2a6fbb", label="after balancing")
    ax.set_xlabel("top-level cluster (sorted by size)")
    ax.set_ylabel("images")
    ax.set_title("cluster sizes")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _write_manifest(uri: str, meta: dict, result: Any, keep_rows: np.ndarray) -> None:
    import pyarrow as pa

    cols = {
        "uri": pa.array([str(meta["uri"][i]) for i in keep_rows]),
        "id": pa.array([str(meta["id"][i]) for i in keep_rows]),
        "label": pa.array([int(meta["label"][i]) for i in keep_rows], pa.int64()),
        "source": pa.array(["pool"] * len(keep_rows)),
        "reason": pa.array([str(r) for r in result.reason]),
    }
    for level in range(result.cluster_ids.shape[1]):
        cols[f"cluster_l{level}"] = pa.array(result.cluster_ids[result.keep, level], pa.int64())
    storage.write_parquet(uri, pa.table(cols))


def _write_dropped(uri: str, meta: dict, rows: np.ndarray, result: Any, keep_rows: np.ndarray) -> dict[str, int]:
    """Account for every pool file missing from the manifest; returns counts by reason."""
    import pyarrow as pa

    uris = [str(u) for u in meta["uri"]]
    why = [str(r) for r in meta["skip_reason"]]  # decode failures first: never embedded
    of = [""] * len(uris)
    for j, i in enumerate(rows):
        if result.dropped[j]:
            why[i] = str(result.dropped[j])
            if result.duplicate_of[j] >= 0:
                of[i] = uris[rows[result.duplicate_of[j]]]
        elif not why[i]:
            why[i] = "not_sampled"
    for i in keep_rows:
        why[i] = ""
    out = [i for i, w in enumerate(why) if w]
    table = pa.table({"uri": [uris[i] for i in out], "id": [str(meta["id"][i]) for i in out],
                      "why": [why[i] for i in out], "duplicate_of": [of[i] for i in out]})
    storage.write_parquet(uri, table)
    return dict(Counter(why[i] for i in out))


def run(job: Any, ctx: StageContext) -> StageResult:
    from dino_ray.curation.plan import curate_arrays
    from dino_ray.curation.shards import open_shards

    ctx.ensure_ray()
    cfg = job.curate
    checkpoint = cfg.embed.checkpoint or _bootstrap_embedder(job, ctx)
    embedder = BackboneRef(uri=checkpoint)

    unlisted: list[tuple[str, str]] = []  # files no listing could list, in the pool or the reference sets
    shards, computed = _embed_shards("pool", cfg.pool, embedder, job, ctx, unlisted)
    eval_sets = {}
    for i, src in enumerate(cfg.eval_sets):
        emeta, emb, _ = _embed(f"eval_{i}", src, embedder, job, ctx, unlisted)
        eval_sets[f"eval_{i}"] = emb[[not r for r in emeta["skip_reason"]]]
    seed_set = None
    if cfg.seed_set is not None:
        smeta, emb, _ = _embed("seed", cfg.seed_set, embedder, job, ctx, unlisted)
        seed_set = emb[[not r for r in smeta["skip_reason"]]]
    store = open_shards(shards, cfg.curation.execution.shard_rows)
    if cfg.curation.distributed(sum(s.n_rows for s in store.shards)):
        return _run_distributed(store, eval_sets, seed_set, job, ctx, checkpoint, computed, unlisted)

    meta, feats = feature_store.read_features(shards)
    pool = feats["embedding"]
    reasons = Counter(r for r in meta["skip_reason"] if r)
    ok = np.array([not r for r in meta["skip_reason"]], dtype=bool)
    rows = np.flatnonzero(ok)
    pool_x = pool[rows]
    if cfg.embed.center:
        pool_x, eval_sets, seed_set = _centered(pool_x, eval_sets, seed_set)
    result = curate_arrays(pool_x, cfg.curation, eval_sets or None, seed_set, seed=job.seed)
    keep_rows = rows[result.keep]
    manifest_uri = ctx.path(MANIFEST)
    _write_manifest(manifest_uri, meta, result, keep_rows)
    dropped_by_reason = _write_dropped(ctx.path(DROPPED), meta, rows, result, keep_rows)
    bad = {r: [str(u) for u, why in zip(meta["uri"], meta["skip_reason"]) if why == r][:20] for r in reasons}
    return _finish(result.summary, job, ctx, checkpoint, computed, unlisted, files=len(meta["uri"]),
                   reasons=dict(reasons), bad=bad, kept=len(keep_rows), dropped_by_reason=dropped_by_reason)


def _run_distributed(store: Any, eval_sets: dict, seed_set: np.ndarray | None, job: Any, ctx: StageContext,
                     checkpoint: str, computed: int, unlisted: list[tuple[str, str]]) -> StageResult:
    """Curation as Ray tasks over the embedding shards: the driver never loads the pool's embeddings."""
    from dino_ray.curation.distributed_plan import RayRunner, count_rows, curate_shards
    from dino_ray.curation.shard_export import export_outputs

    cfg = job.curate
    runner = RayRunner(cfg.curation.execution.workers)
    store, mean = count_rows(store, runner)
    if cfg.embed.center:
        store.center = mean
        _, eval_sets, seed_set = _centered(mean[None, :], eval_sets, seed_set)
    result = curate_shards(store, cfg.curation, ctx.path("decisions"), eval_sets or None, seed_set, job.seed, runner)
    n_levels = len(cfg.curation.clustering.n_clusters) if cfg.curation.clustering.enabled else 0
    out = export_outputs(store, result, runner, ctx.path(MANIFEST), ctx.path(DROPPED), n_levels)
    return _finish(result.summary, job, ctx, checkpoint, computed, unlisted, files=out["rows"], reasons=out["skipped"],
                   bad=out["bad"], kept=int(result.keep.size), dropped_by_reason=out["dropped_by_reason"])


def _finish(s: dict, job: Any, ctx: StageContext, checkpoint: str, computed: int, unlisted: list[tuple[str, str]],
            files: int, reasons: dict, bad: dict, kept: int, dropped_by_reason: dict) -> StageResult:
    """The stage summary, histogram and logs, the same for both curation paths."""
    manifest_uri = ctx.path(MANIFEST)
    skipped = int(sum(reasons.values()))
    before = [int(v) for v in s.get("cluster_counts_before", [])]
    after = [int(v) for v in s.get("cluster_counts_after", [])]
    summary = {
        "pool_files": int(files), "pool_decoded": int(files - skipped),
        "pool_skipped": skipped, "skipped_by_reason": dict(reasons), "bad_samples": bad,
        "embedded_this_run": computed, "embedder": checkpoint,
        "duplicates_removed": s.get("n_duplicates_removed", 0), "decontaminated": s.get("n_decontaminated", 0),
        "kept": int(kept), "dropped_by_reason": dropped_by_reason,
        "index": s.get("index_type"), "index_recall": s.get("index_recall"),
        "cluster_sizes_before": before, "cluster_sizes_after": after,
        "kept_by_reason": s.get("n_kept_by_reason", {}), "timings_s": s.get("timings_s", {}),
        "curation_path": "distributed" if "shards" in s else "local",
        **unlisted_summary(unlisted), "decode": decode_policy(job.curate.decode),
    }
    if before:
        png = _histogram_png(before, after)
        storage.write_bytes(ctx.path("cluster_sizes.png"), png)
        tracking.log_bytes(ctx.tracking_uri, ctx.run_id, png, "cluster_sizes.png")
    tracking.log_text(ctx.tracking_uri, ctx.run_id, "\n".join(
        f"{r}\t{u}" for r, us in summary["bad_samples"].items() for u in us) or "none", "skipped_images.tsv")
    log.info("curate: %d files, %d decoded, %d skipped %s, %d duplicates, %d decontaminated, %d kept",
             summary["pool_files"], summary["pool_decoded"], summary["pool_skipped"], dict(reasons),
             summary["duplicates_removed"], summary["decontaminated"], summary["kept"])
    return StageResult(outputs={"manifest": manifest_uri, "dropped": ctx.path(DROPPED),
                                "embeddings": ctx.path("embeddings"),
                                "embedder": checkpoint}, summary=summary)
