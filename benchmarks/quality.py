"""Quality per CPU-minute: the real pretrain + eval stages on CIFAR-10 for a fixed wall-clock budget.

Pretrains on the CIFAR-10 train images (all 50,000; 10,000 with ``--quick``) with a preset
(``jobs/presets/cpu.yaml`` by default) for about ``--minutes`` of training, then runs the eval stage on
the test images (10,000; 2,000 with ``--quick``) at 32 px. The number of steps that fits the budget is
calibrated first: a 40-step run of the real pretrain stage on the same data, whose steady images/s
sets the steps (start-up is not counted against the budget, for either tool). Warm-ups scale
with the steps, so a shorter budget is the same recipe, compressed.

Baselines, all measured in the same run on the same split and evaluator:
- ``baseline``: raw pixels (kNN@20 on the flattened, normalised 32x32 image): what SSL must beat;
- random init of the same ViT, the better of CLS and average-pooled patch tokens (a fresh ViT with a
  small LayerScale maps every image to nearly the same CLS vector, so CLS alone would be a strawman);
- ``--peer lightly``: LightlyTrain's DINOv2 (``lightly_train.pretrain(method="dinov2")``) on the same
  architecture, crops, batch and wall-clock, run by ``benchmarks/peers/lightly_dinov2.py`` in the
  Python of a separate venv (``--peer-python``; see the README), its backbone judged by our eval stage.

    python benchmarks/quality.py [--minutes 30] [--quick] [--peer lightly --peer-python PEER/bin/python]

Last stdout line: JSON with ours = SSL kNN@20 top-1, baseline = raw-pixel kNN@20 top-1, ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
SHARED = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.xz"


def extract_cifar(archive: Path, dest: Path, train_per_class: int, test_per_class: int) -> Path:
    """``dest-<N>-<M>/train/<class>/*.jpg`` and ``.../test/<class>/*.jpg``, the first N (M) of each class.

    One folder per split size: extracting a smaller split into a folder that already holds a larger one
    would leave the larger one's files in place, and the stages read every file of the folder."""
    dest = dest.with_name(f"{dest.name}-{train_per_class}-{test_per_class}")
    marker = dest / ".extracted"
    if marker.exists():
        return dest
    if not archive.is_file():
        raise SystemExit(f"CIFAR-10 not found at {archive} (the project's shared/data folder beside the repo)")

    def wanted(name: str) -> bool:
        parts = name.split("/")
        if len(parts) < 3:
            return False
        limit = train_per_class if parts[0] == "train" else test_per_class
        return int(os.path.splitext(parts[2])[0]) < limit

    with tarfile.open(archive) as tf:
        tf.extractall(dest, members=[m for m in tf.getmembers() if m.isfile() and wanted(m.name)], filter="data")
    marker.touch()
    return dest


def calibrate_step_s(preset: str, train: str, work: Path, steps: int = 40) -> float:
    """Seconds per training step of the real pretrain stage (Ray Data crops, DeepSpeed, the preset's
    resources), from its steady images/s over a short run: timing the model alone in this process
    overestimated the stage's speed by 1.6x, so its budget overran the peer's by as much."""
    from dino_ray.config.loader import load_job
    from dino_ray.pipeline import Pipeline

    base = load_job(preset, [f"pretrain.data.source={train}"])
    root = work / f"calibrate-{int(time.time())}"
    job = load_job(preset, [
        f"output_root={root}", f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", "stages=[pretrain]",
        f"pretrain.data.source={train}", *scaled_schedule(base.pretrain.schedule, steps),
        f"pretrain.train.checkpoint_every={steps}", "pretrain.monitor.every=0"])
    summary = Pipeline(job, ensure_ray=lambda: None).run()["pretrain"]["summary"]
    return job.pretrain.train.batch_size_per_worker / float(summary["train_images_per_s"])


def scaled_schedule(schedule, steps: int) -> list[str]:
    """Overrides that shorten the preset's schedule to ``steps``, its warm-ups scaled alike. One key each:
    a ``pretrain.schedule={...}`` mapping would replace the whole section, and every key it does not name
    (learning rate, teacher temperature, EMA momentum) would fall back to the ViT-g/14 defaults."""
    f = steps / schedule.total_iters

    def scale(n: int) -> int:
        return max(0, min(steps - 1, round(n * f)))

    return [f"pretrain.schedule.total_iters={steps}",
            f"pretrain.schedule.warmup_iters={max(1, scale(schedule.warmup_iters))}",
            f"pretrain.schedule.warmup_teacher_temp_iters={scale(schedule.warmup_teacher_temp_iters)}",
            f"pretrain.schedule.freeze_last_layer_iters={scale(schedule.freeze_last_layer_iters)}"]


def peer_available(python: str, who: str) -> bool:
    """Whether ``python`` exists and imports lightly_train (with the peer script's shim); if not, one line
    on stderr says why (``who`` names the benchmark) and the caller leaves the peer out."""
    if not python or not Path(python).exists():
        print(f"[{who}] peer lightly skipped: no peer Python at {python!r} (see README: benchmarks)",
              file=sys.stderr)
        return False
    shim = REPO / "benchmarks" / "peers"  # the peer script's torchvision shim, as the run will use it
    probe = subprocess.run([python, "-c", f"import sys; sys.path.insert(0, {str(shim)!r}); import lightly_dinov2; "
                            "lightly_dinov2.install_torchvision_cpu_shim(); import lightly_train"],
                           capture_output=True, text=True)
    if probe.returncode:
        print(f"[{who}] peer lightly skipped: lightly_train does not import in {python}: "
              f"{probe.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return False
    return True


def run_peer_script(python: str, job, train_dir: Path, out: Path, **extra) -> dict:
    """Run ``benchmarks/peers/lightly_dinov2.py`` on the spec of ``job``'s pretrain stage (ViT, crops, loss,
    schedule, batch) plus ``extra`` keys, training on ``train_dir``; returns its ``result.json``."""
    import dataclasses

    from dino_ray.models import build_backbone

    cfg = job.pretrain
    vit = dataclasses.asdict(build_backbone(cfg.model.arch, **cfg.model.backbone_kwargs()).config)
    spec = {"vit": vit, "crops": dataclasses.asdict(cfg.data.crops), "loss": dataclasses.asdict(cfg.loss),
            "schedule": dataclasses.asdict(cfg.schedule), "batch": cfg.train.batch_size_per_worker,
            "data": str(train_dir), "out": str(out), "seed": job.seed, **extra}
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec, default=str))
    subprocess.run([python, str(REPO / "benchmarks" / "peers" / "lightly_dinov2.py"), str(out / "spec.json")],
                   check=True)
    return json.loads((out / "result.json").read_text())


def run_peer(python: str, train_dir: Path, job, minutes: float, out: Path) -> Path | None:
    """Train LightlyTrain's DINOv2 in its own venv; returns a dino-ray backbone dir, or None (skipped)."""
    from dino_ray import backbone_io

    if not peer_available(python, "quality"):
        return None
    start = time.time()
    result = run_peer_script(python, job, train_dir, out, minutes=minutes)
    import torch

    state = torch.load(result["weights"], map_location="cpu", weights_only=True)
    vit = result["vit"]
    backbone_io.save_state_dict(state, vit, str(out / "lightly_train"), extra={"stage": "lightly_train",
                                                                          "steps": result["planned_steps"]})
    result["wall_s"] = round(time.time() - start, 1)
    (out / "result.json").write_text(json.dumps(result))
    return out / "lightly_train"


def add_peer_args(p: argparse.ArgumentParser) -> None:
    """``--peer lightly`` and ``--peer-python`` (default: env DINO_RAY_PEER_PYTHON), shared by the benchmarks."""
    p.add_argument("--peer", choices=["lightly"], default=None)
    p.add_argument("--peer-python", default=os.environ.get("DINO_RAY_PEER_PYTHON", ""),
                   help="the Python of the LightlyTrain venv (README: benchmarks)")


def monitor_curve(job, manifest: dict) -> list[tuple[int, float]]:
    """(step, kNN top-1) of the teacher on the monitor subset over the run, from the stage's MLflow run."""
    import mlflow

    client = mlflow.MlflowClient(job.tracking.tracking_uri)
    history = client.get_metric_history(manifest["mlflow_run_id"], "monitor/knn_top1")
    return sorted((m.step, round(m.value, 4)) for m in history)


def speed_ratio(ours_images_per_s: float | None, peer_images_per_s: float | None) -> float | None:
    """Our training images/s over the peer's (None when either is unknown)."""
    if not ours_images_per_s or not peer_images_per_s:
        return None
    return ours_images_per_s / peer_images_per_s


def markdown(result: dict) -> str:
    """The README block of one result: the table of backbones and the lines that say who won, by how much."""
    d = result["details"]
    pct = lambda v: "-" if v is None else f"{100 * float(v):.1f} %"  # noqa: E731
    peer = d.get("peer_lightly") if isinstance(d.get("peer_lightly"), dict) else None
    rows = [(f"dino-ray (`{d['preset']}`)", result["ours"], d["ours_knn_pooled_patches"],
             d["ours_linear_top1"], d["steps"], d["train_images_per_s"])]
    if peer:
        rows.append((f"LightlyTrain {peer['lightly_train']} (`method=\"dinov2\"`, same ViT, crops, batch)",
                     peer["knn_k20_top1"], peer["knn_pooled_patches"], peer["linear_top1"], peer.get("steps"),
                     peer.get("train_images_per_s")))
    rows += [("random init, same ViT (better of CLS / pooled)", d["random_init_knn_best_of_cls_and_pooled"], None,
              d["random_init_linear_top1"], None, None),
             ("raw pixels", result["baseline"], None, d["pixels_linear_top1"], None, None)]
    lines = [f"CIFAR-10, {d['train_images']:,} train / {d['test_images']:,} test images at 32 px, "
             f"{d['budget_minutes']:g} minutes of training each; `{d['preset']}`; python {d['python']}.", "",
             "| backbone | kNN@20 top-1 | kNN@20 pooled patches | linear top-1 | steps | train images/s |",
             "|---|---|---|---|---|---|"]
    for name, knn, pooled, linear, steps, ips in rows:
        lines.append(f"| {name} | {pct(knn)} | {pct(pooled)} | {pct(linear)} | {steps or '-'} | {ips or '-'} |")
    lines += ["", f"- SSL kNN / raw-pixel kNN: **{result['ratio']}** (target 1.0)."]
    if peer:
        ratio = speed_ratio(d.get("train_images_per_s"), peer.get("train_images_per_s"))
        speed = "-" if ratio is None else f"{ratio:.2f}"
        lines.append(f"- dino-ray minus LightlyTrain: {d['ours_minus_peer_knn_points']:+.1f} kNN points; training "
                     f"images/s, dino-ray over LightlyTrain: {speed} (target 1.5). Training wall-clock: dino-ray "
                     f"{d['pretrain_stage_s']:.0f} s for the whole stage, LightlyTrain {peer['train_wall_s']:.0f} s.")
    brk = d.get("stage_start_breakdown_s") or {}
    lines.append(f"- Stage start to first step: {d['stage_start_to_first_step_s']} s"
                 + (" (" + ", ".join(f"{k.replace('_', ' ')} {v} s" for k, v in brk.items()) + ")" if brk else "")
                 + f"; monitor kNN along the run (step, top-1): {d['monitor_knn_curve']}.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="training budget (default 30)")
    p.add_argument("--quick", action="store_true", help="10k train / 2k test images, 5 minutes")
    p.add_argument("--preset", default=str(REPO / "jobs" / "presets" / "cpu.yaml"))
    add_peer_args(p)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "dino-ray-quality"))
    p.add_argument("--save", metavar="JSON", help="also write the result to this file")
    p.add_argument("--update-readme", metavar="NAME",
                   help="put the result's table between the README's <!-- report:NAME --> markers")
    p.add_argument("--render", metavar="JSON", help="run nothing: render a saved result (with --update-readme)")
    args = p.parse_args()
    if args.render:
        publish(json.loads(Path(args.render).read_text()), args.update_readme)
        return
    minutes = 5.0 if args.quick and args.minutes == 30.0 else args.minutes
    per_class = (1000, 200) if args.quick else (5000, 1000)
    work = Path(args.work)
    data = extract_cifar(SHARED, work / "cifar10", *per_class)

    from dino_ray.config.loader import load_job
    from dino_ray.pipeline import Pipeline
    from dino_ray.ray_utils import init_ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # our Ray workers run OpenMP passive (ray_utils); the peer gets the same, so neither spins on shared cores
    from dino_ray.ray_utils import DEFAULT_OMP_WAIT_POLICY

    os.environ.setdefault("OMP_WAIT_POLICY", DEFAULT_OMP_WAIT_POLICY)
    train = f"{{uri: {data / 'train'}, labels_from_folders: true}}"
    test = f"{{uri: {data / 'test'}, labels_from_folders: true}}"
    base = load_job(args.preset, [f"pretrain.data.source={train}"])
    init_ray(base.ray.address, base.ray.num_cpus)
    step_s = calibrate_step_s(args.preset, train, work)
    steps = max(20, int(minutes * 60 / step_s))
    peer_dir = run_peer(args.peer_python, data / "train", base, minutes, work / "peer") if args.peer else None
    run_root = work / f"run-{int(time.time())}"
    backbones = ["pretrain"] + ([str(peer_dir)] if peer_dir else [])
    overrides = [
        f"output_root={run_root}", f"tracking.tracking_uri=sqlite:///{run_root}/mlflow.db", "stages=[pretrain, eval]",
        f"pretrain.data.source={train}", *scaled_schedule(base.pretrain.schedule, steps),
        # metrics reach MLflow when the checkpoint covering them commits: four checkpoints keep the curves live
        f"pretrain.train.checkpoint_every={max(1, steps // 4)}", f"pretrain.train.log_every={max(1, steps // 20)}",
        f"eval.backbones=[{', '.join(backbones)}]", "eval.baselines=[random, pixels]", "eval.knn.ks=[20]",
        f"eval.datasets=[{{name: cifar10, image_size: 32, train: {train}, test: {test}}}]",
        # the live monitor (docs/monitoring.md): kNN of the teacher on a CIFAR subset, six points over the run
        f"pretrain.monitor={{every: {max(1, steps // 6)}, pca_images: 4, "
        f"train: {{uri: {data / 'train'}, labels_from_folders: true, max_images: 2000}}, "
        f"test: {{uri: {data / 'test'}, labels_from_folders: true, max_images: 500}}}}",
    ]
    job = load_job(args.preset, overrides)
    start = time.time()
    manifests = Pipeline(job, ensure_ray=lambda: None).run()
    wall = time.time() - start
    rows = {r["backbone"]: r for r in json.loads(Path(manifests["eval"]["outputs"]["results"]).read_text())}
    ours, pixels, random = rows["pretrain"], rows["pixels"], rows["random"]
    pre = manifests["pretrain"]["summary"]

    def knn(row: dict, pooled: bool = False) -> float:
        return float(row.get("knn_avgpool_k20_top1" if pooled else "knn_k20_top1", 0.0))

    out = {
        "name": "quality_cifar10_knn_per_budget",
        "unit": "kNN@20 top-1",
        "ours": round(knn(ours), 4),
        "baseline": round(knn(pixels), 4),
        "ratio": round(knn(ours) / max(knn(pixels), 1e-9), 3),
        "details": {
            "ours_linear_top1": ours.get("linear_test_top1"),
            "ours_knn_pooled_patches": knn(ours, pooled=True),
            "pixels_linear_top1": pixels.get("linear_test_top1"),
            "random_init_knn_best_of_cls_and_pooled": max(knn(random), knn(random, pooled=True)),
            "random_init_linear_top1": random.get("linear_test_top1"),
            "steps": pre.get("steps"), "calibrated_step_s": round(step_s, 3), "budget_minutes": minutes,
            "train_images_per_s": pre.get("train_images_per_s"),
            "stage_start_to_first_step_s": pre.get("stage_start_to_first_step_s"),
            "stage_start_breakdown_s": {k.split("/", 1)[1]: v for k, v in pre.items() if k.startswith("startup/")},
            "monitor_share_of_training_time": pre.get("monitor_share"),
            "monitor_knn_curve": monitor_curve(job, manifests["pretrain"]),
            "collapse_alarms": pre.get("alarm_codes", ""),
            "pretrain_stage_s": manifests["pretrain"].get("seconds"), "eval_stage_s": manifests["eval"].get("seconds"),
            "pipeline_wall_s": round(wall, 1),
            "train_images": int(ours.get("train_images", 0)), "test_images": int(ours.get("test_images", 0)),
            "preset": os.path.relpath(args.preset, REPO), "output_root": str(run_root),
            "python": platform.python_version(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
    }
    if args.peer:
        if peer_dir is None:
            out["details"]["peer_lightly"] = "skipped: LightlyTrain is not installed (see stderr)"
        else:
            peer_row = rows[os.path.basename(str(peer_dir))]
            peer_result = json.loads((work / "peer" / "result.json").read_text())
            out["details"]["peer_lightly"] = {
                "knn_k20_top1": knn(peer_row), "knn_pooled_patches": knn(peer_row, pooled=True),
                "linear_top1": peer_row.get("linear_test_top1"), **peer_result}
            out["details"]["ours_minus_peer_knn_points"] = round(100 * (knn(ours) - knn(peer_row)), 2)
            ratio = speed_ratio(pre.get("train_images_per_s"), peer_result.get("train_images_per_s"))
            if ratio is not None:
                out["details"]["train_images_per_s_ours_over_peer"] = round(ratio, 3)
    finish(out, markdown, args.save, args.update_readme)


def finish(result: dict, render, save: str | None, readme_block: str | None) -> None:
    """A benchmark's ending: the JSON saved (``--save``), its table on stderr and, with ``--update-readme``,
    between the README's markers; the JSON as the last stdout line."""
    if save:
        Path(save).write_text(json.dumps(result, indent=1) + "\n")
    publish(result, readme_block, render)
    print(json.dumps(result))


def publish(result: dict, readme_block: str | None, render=None) -> None:
    text = (render or markdown)(result)
    print(text, file=sys.stderr)
    if readme_block:
        from dino_ray.run_report import update_readme

        update_readme(REPO / "README.md", readme_block, text)


if __name__ == "__main__":
    main()
