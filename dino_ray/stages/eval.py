"""Eval stage: judge every backbone (and baselines) on labeled sets; one nested MLflow run each.

Features are extracted once per (backbone, dataset, resolution) with Ray Data and cached as parquet
under the stage folder, keyed by the backbone file's identity: a second run, or a new probe setting,
reuses them. On the cached features: weighted kNN, the DINOv2 linear-probe grid (all learning rates
of an input layout trained in one pass inside one Ray Tune trial; trials spread over the cluster and
resume after an interruption; the head is chosen on a validation split carved from train and only
then scored on test), nearest-neighbour retrieval, and patch-PCA pictures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from typing import Any

import numpy as np

from dino_ray import backbone_io, feature_store, model_registry, storage, tracking
from dino_ray.config.loader import config_hash
from dino_ray.stages.contract import StageContext, StageResult
from dino_ray.stages.inference import BackboneRef, InferenceSpec, image_rows, run_inference

log = logging.getLogger("dino_ray.eval")


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str  # "pretrain", "distill/vit_small", "random", "pixels", ...
    ref: BackboneRef | None  # None for raw pixels
    cache_key: str


def candidates(job: Any, ctx: StageContext) -> list[Candidate]:
    cfg = job.eval
    found: list[Candidate] = []
    for name in cfg.backbones:
        if name in ("pretrain", "highres"):
            uri = ctx.input(name, "backbone")
            found.append(Candidate(name, BackboneRef(uri=uri), backbone_io.weights_key(uri)))
        elif name == "distill":
            for key, uri in sorted(ctx.upstream["distill"].items()):
                if key.startswith("student/"):
                    found.append(Candidate(f"distill/{key[len('student/'):]}", BackboneRef(uri=uri),
                                           backbone_io.weights_key(uri)))
        else:
            found.append(Candidate(os.path.basename(name.rstrip("/")), BackboneRef(uri=name),
                                   backbone_io.weights_key(name)))
    if "random" in cfg.baselines:
        if not found:
            raise ValueError("eval.baselines has 'random' but no backbone to copy the architecture from")
        vit = backbone_io.read_meta(found[0].ref.uri)["vit"]
        key = hashlib.sha256(json.dumps(vit, sort_keys=True).encode() + str(job.seed).encode()).hexdigest()[:12]
        found.append(Candidate("random", BackboneRef(random_vit=vit, seed=job.seed), key))
    if "pixels" in cfg.baselines:
        found.append(Candidate("pixels", None, "pixels"))
    return found


def _features(cand: Candidate, split: str, rows: list[dict], ds_cfg: Any, job: Any, ctx: StageContext):
    cfg = job.eval
    mode = "pixels" if cand.ref is None else "eval"
    spec = InferenceSpec(backbone=cand.ref, image_size=ds_cfg.image_size, mode=mode, decode=job.curate.decode)
    # cached per (backbone weights, image size, decode policy): the decode policy changes what is embedded
    out = ctx.path("features", ds_cfg.name, f"{cand.name.replace('/', '_')}-{cand.cache_key}",
                   f"{ds_cfg.image_size}-{config_hash(job.curate.decode)[:8]}", split)
    shards, computed = run_inference(rows, spec, out, num_actors=1, cpus_per_actor=cfg.extract_cpus,
                                     gpus_per_actor=cfg.extract_gpus, batch_size=cfg.batch_size,
                                     task=f"eval features {cand.name}/{split}")
    meta, feats = feature_store.read_features(shards)
    ok = np.array([not r for r in meta["skip_reason"]])
    return {k: v[ok] for k, v in feats.items()}, meta["label"][ok].astype(np.int64), computed, shards


def _linear_trial(config: dict) -> None:
    """One Tune trial: every learning rate of one input layout, trained in one pass over the features.

    The thread count is set from the trial's CPUs, not left to the worker's environment: a float sum
    split over a different number of threads rounds differently, and a probe must score the same twice."""
    import torch
    from ray import tune

    from dino_ray.evals.linear import evaluate_head, split_train_val, train_linear_grid

    def load(shards):
        meta, feats = feature_store.read_features(shards)
        ok = np.array([not r for r in meta["skip_reason"]])
        return {k: v[ok] for k, v in feats.items()}, meta["label"][ok].astype(np.int64)

    torch.set_num_threads(max(1, int(config["threads"])))
    train_x, train_y = load(config["train_shards"])
    test_x, test_y = load(config["test_shards"])
    tr, va = split_train_val(train_y, config["val_fraction"], seed=config["seed"])
    grid = dataclasses.replace(config["linear"], n_last_blocks=(config["n_blocks"],), avgpool=(config["avgpool"],))
    result = train_linear_grid({k: v[tr] for k, v in train_x.items()}, train_y[tr],
                               {k: v[va] for k, v in train_x.items()}, train_y[va], grid, seed=config["seed"])
    test = evaluate_head(result.best, test_x, test_y)
    tune.report({"val_top1": result.best_val_top1, "test_top1": float(test["top1"]),
                 "test_top5": float(test.get("top5", 0.0)), "head": result.best.spec.name})


def linear_sweep(name: str, train_shards: list[str], test_shards: list[str], layouts: list[tuple[int, bool]],
                 job: Any, ctx: StageContext) -> dict[str, Any]:
    """Ray Tune over input layouts; resumes an interrupted sweep of the same name."""
    from ray import tune

    cfg = job.eval
    trainable = tune.with_resources(_linear_trial, {"cpu": cfg.linear_trial_cpus})
    param_space = {"train_shards": train_shards, "test_shards": test_shards, "linear": cfg.linear,
                   "val_fraction": cfg.val_fraction, "seed": job.seed,
                   "threads": cfg.linear_trial_cpus,
                   "layout": tune.grid_search([list(x) for x in layouts])}
    param_space["n_blocks"] = tune.sample_from(lambda config: config["layout"][0])
    param_space["avgpool"] = tune.sample_from(lambda config: config["layout"][1])
    storage_root = ctx.path("tune")
    fs, path = storage.filesystem(storage_root)
    path_uri = storage_root if storage.is_remote(storage_root) else path
    exp_path = storage.join(path_uri, name)
    if tune.Tuner.can_restore(exp_path):
        tuner = tune.Tuner.restore(exp_path, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space,
                           tune_config=tune.TuneConfig(metric="val_top1", mode="max",
                                                       max_concurrent_trials=cfg.tune_max_concurrent),
                           run_config=tune.RunConfig(name=name, storage_path=path_uri, verbose=0))
    results = tuner.fit()
    rows = []
    for r in results:
        if r.error or not r.metrics or "val_top1" not in r.metrics:
            raise RuntimeError(f"linear-probe trial failed: {r.error}")
        rows.append(r.metrics)
    best = max(rows, key=lambda m: m["val_top1"])  # selection on validation only
    return {"linear_val_top1": best["val_top1"], "linear_test_top1": best["test_top1"],
            "linear_test_top5": best["test_top5"], "linear_best_head": best["head"], "linear_trials": len(rows)}


def _pca_picture(cand: Candidate, rows: list[dict], ds_cfg: Any, n: int) -> bytes | None:
    import torch

    from dino_ray.data.decode import decode_image
    from dino_ray.data.eval_transform import eval_view
    from dino_ray.data.sources import read_image_bytes
    from dino_ray.evals.features import extract_patch_grid
    from dino_ray.evals.pca import patch_pca_rgb, side_by_side, to_uint8_images

    if cand.ref is None or n == 0:
        return None
    model = cand.ref.load().eval()
    views = []
    for r in rows[: n * 3]:
        try:
            views.append(eval_view(decode_image(read_image_bytes(r["uri"])), ds_cfg.image_size))
        except Exception:  # noqa: BLE001 - pictures use whatever decodes
            continue
        if len(views) == n:
            break
    if not views:
        return None
    x = torch.from_numpy(np.stack(views))
    grid = extract_patch_grid(model, x)
    picture = side_by_side(to_uint8_images(x), patch_pca_rgb(grid), scale=max(1, 128 // ds_cfg.image_size))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def evaluate(cand: Candidate, ds_cfg: Any, job: Any, ctx: StageContext) -> tuple[dict[str, Any], bytes | None, int]:
    from dino_ray.evals.knn import knn_classify
    from dino_ray.evals.retrieval import retrieval_metrics

    cfg = job.eval
    unlisted: list[tuple[str, str]] = []  # named in the log by the listing; counted in the results
    train_rows, test_rows = image_rows(ds_cfg.train, unlisted), image_rows(ds_cfg.test, unlisted)
    train_x, train_y, c1, train_shards = _features(cand, "train", train_rows, ds_cfg, job, ctx)
    test_x, test_y, c2, test_shards = _features(cand, "test", test_rows, ds_cfg, job, ctx)
    results: dict[str, Any] = {"train_images": int(len(train_y)), "test_images": int(len(test_y)),
                               "unlisted_files": len(unlisted)}
    knn = knn_classify(train_x["cls_1"], train_y, test_x["cls_1"], test_y, ks=tuple(cfg.knn.ks),
                       temperature=cfg.knn.temperature)
    results.update({f"knn_{k}": v for k, v in knn["metrics"].items()})
    if "avgpool_1" in train_x:
        # Average-pooled patch tokens too: a randomly initialised ViT (LayerScale 1e-5) gives nearly the
        # same CLS for every image, so only the better of the two is a fair random-init baseline.
        pooled = knn_classify(train_x["avgpool_1"], train_y, test_x["avgpool_1"], test_y, ks=tuple(cfg.knn.ks),
                              temperature=cfg.knn.temperature)
        results.update({f"knn_avgpool_{k}": v for k, v in pooled["metrics"].items()})
    blocks = sum(1 for k in train_x if k.startswith("cls_"))
    layouts = [(1, False)] if cand.ref is None else [
        (n, p) for n in cfg.linear.n_last_blocks for p in cfg.linear.avgpool if n <= blocks]
    if cfg.linear_enabled:
        sweep = f"linear-{ds_cfg.name}-{cand.name.replace('/', '_')}-{cand.cache_key}"
        results.update(linear_sweep(sweep, train_shards, test_shards, layouts, job, ctx))
    ret = retrieval_metrics(test_x["cls_1"], test_y, train_x["cls_1"], train_y, ks=tuple(cfg.retrieval_ks))
    results.update({f"retrieval_{k}": v for k, v in ret.items()})
    picture = _pca_picture(cand, test_rows, ds_cfg, cfg.pca_images)
    return results, picture, c1 + c2


def tag_registered_version(cand: Candidate, dataset: str, metrics: dict[str, float], eval_run_id: str,
                           ctx: StageContext) -> None:
    """Put a backbone's results on its registered model version (found by the weights fingerprint, which
    is the candidate's cache key), so the registry shows how each version scored. Baselines have no
    version; a backbone given by path has one only if a stage registered those weights."""
    if cand.ref is None or not cand.ref.uri:
        return
    tags: dict[str, Any] = {f"eval.{dataset}.{k}": v for k, v in metrics.items()}
    tags[f"eval.{dataset}.run_id"] = eval_run_id
    model_registry.tag_versions(ctx.tracking_uri, cand.cache_key, tags)


def run(job: Any, ctx: StageContext) -> StageResult:
    from dino_ray.evals.report import comparison_table, html_report, markdown_report
    from dino_ray.progress import Reporter

    ctx.ensure_ray()
    cfg = job.eval
    if not cfg.datasets:
        raise ValueError("eval.datasets is empty: name at least one labeled dataset (train and test sources)")
    cands = candidates(job, ctx)
    table, summary, extracted = [], {}, 0
    exp_id = tracking.experiment_id(ctx.tracking_uri, job.tracking.experiment)
    progress = Reporter("eval", len(cands) * len(cfg.datasets), "backbones")
    progress.update(0)
    for ds_cfg in cfg.datasets:
        for cand in cands:
            results, picture, computed = evaluate(cand, ds_cfg, job, ctx)
            extracted += computed
            run_name = f"eval/{ds_cfg.name}/{cand.name}"
            child = tracking.create_run(ctx.tracking_uri, exp_id, run_name, parent_run_id=ctx.run_id,
                                        tags={"dino_ray.backbone": cand.name, "dino_ray.dataset": ds_cfg.name})
            metrics = {k: v for k, v in results.items() if isinstance(v, (int, float))}
            tracking.log_metrics(ctx.tracking_uri, child, metrics)
            tag_registered_version(cand, ds_cfg.name, metrics, child, ctx)
            pictures = []
            if picture:
                pic_name = f"pca_{ds_cfg.name}_{cand.name.replace('/', '_')}.png"
                storage.write_bytes(ctx.path("pictures", pic_name), picture)
                tracking.log_bytes(ctx.tracking_uri, child, picture, pic_name, "pictures")
                tracking.log_bytes(ctx.tracking_uri, ctx.run_id, picture, pic_name, "pictures")
                pictures.append(f"pictures/{pic_name}")
            tracking.log_text(ctx.tracking_uri, child, markdown_report(run_name, results, pictures), "report.md")
            tracking.log_text(ctx.tracking_uri, child, html_report(run_name, results, pictures), "report.html")
            tracking.set_status(ctx.tracking_uri, child, "FINISHED")
            row = {"dataset": ds_cfg.name, "backbone": cand.name, **{k: v for k, v in results.items()
                                                                    if isinstance(v, (int, float, str))}}
            table.append(row)
            progress.update(len(table))
            for k, v in results.items():
                if isinstance(v, (int, float)):
                    summary[f"{ds_cfg.name}/{cand.name}/{k}"] = v
    text = comparison_table(table)
    storage.write_bytes(ctx.path("results.md"), text.encode())
    storage.write_json(ctx.path("results.json"), table)
    tracking.log_text(ctx.tracking_uri, ctx.run_id, text, "comparison.md")
    summary["images_extracted_this_run"] = extracted
    return StageResult(outputs={"results": ctx.path("results.json"), "table": ctx.path("results.md")},
                       summary=summary)

