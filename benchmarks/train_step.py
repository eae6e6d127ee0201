"""Our training step on a preset's model: images/s against LightlyTrain's and FLOP/s against the matmul peaks.

What one step of the product costs on this machine, put two ways: against the peer framework training
the same ViT on the same crops, batch and loss (``--peer lightly``: is our step fast?), and against
what this CPU's matrix units can do at all (how much is left?).

Our step is the pretrain stage's own step (``dino_ray/train/step.py``, which ``train/loop.py`` runs) on
the DeepSpeed engine the stage builds for one worker at the preset's ZeRO stage, without Ray: the
preset's model (student with drop path, EMA teacher), parameter groups and AdamW, schedules, teacher
forward on the global crops, packed student forward on all crops with iBOT masks, DINO + iBOT + KoLeo
losses, backward, per-part gradient clipping (``train/clipping.py``), the engine's optimizer step, EMA
update. Precision is what the stage chooses (``dino_ray/train/precision.py``: bf16 autocast only where
the CPU multiplies bf16 natively). Its input is real MultiCrop crops of CIFAR-10 JPEGs
(``../shared/data``), made up front so the timing is the step alone; the speed is the median over the
timed steps. FLOPs count the tokens actually computed (the model traced on the meta device, as
``dino-ray plan`` does: stochastic depth runs each residual branch on the kept samples only), x3 for
the student (forward + backward), x1 for the teacher. The fp32 and bf16 matmul peaks are timed
in the same run, interleaved with the steps, since the machine is shared.

    python benchmarks/train_step.py [--quick] [--preset jobs/presets/demo.yaml]
        [--peer lightly --peer-python PEER/bin/python]

Last stdout line: JSON with ours = our images/s, baseline = LightlyTrain's (null without the peer: a
missing peer Python or a failing ``import lightly_train`` is one line on stderr, not an error).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quality import REPO, SHARED, add_peer_args, extract_cifar, peer_available, run_peer_script, speed_ratio


def image_folder(work: Path, per_class: int) -> tuple[Path, str]:
    """A folder of real images for both frameworks: CIFAR-10 train JPEGs, else (said on stderr) noise JPEGs."""
    if SHARED.is_file():
        return extract_cifar(SHARED, work / "cifar10", per_class, 0) / "train", f"CIFAR-10 train JPEGs ({SHARED})"
    import numpy as np
    from PIL import Image

    print(f"[train_step] CIFAR-10 not found at {SHARED}: timing on random-noise 32x32 JPEGs instead "
          "(the step costs the same; the crops are not real photos)", file=sys.stderr)
    folder = work / "noise" / "train"
    (folder / "noise").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(10 * per_class):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "noise" / f"{i:04d}.jpg")
    return folder, "random-noise JPEGs (CIFAR-10 not found)"


def crop_batches(folder: Path, job, n_batches: int) -> list[dict]:
    """``n_batches`` collated batches of the preset's MultiCrop crops and masks, as the data actors ship them."""
    import torch

    from dino_ray.data.decode import decode_image
    from dino_ray.data.multicrop import MultiCrop

    cfg, b = job.pretrain, job.pretrain.train.batch_size_per_worker
    files = sorted(folder.rglob("*.jpg"), key=lambda f: (f.stem, f.parent.name))[:n_batches * b]  # classes mixed
    crop = MultiCrop(cfg.data.crops, cfg.data.masking, seed=job.seed)
    items = [crop(decode_image(f.read_bytes()), i) for i, f in enumerate(files)]
    return [torch.utils.data.default_collate(items[i:i + b]) for i in range(0, len(items), b)]


def step_flops(job, batch: int, dtype: str) -> float:
    """FLOPs of one step, counted on the tokens actually computed: the stage's model traced on the meta
    device (``dino_ray/plan/trace.py``: batch-subset stochastic depth runs its branches on the kept samples
    only, the iBOT head on the expected masked patches), 3x the student's forward (forward + backward) and
    the teacher's forward on the global crops."""
    from dino_ray.plan.trace import trace_step

    cfg = job.pretrain
    t = trace_step(cfg.model, cfg.loss, cfg.data.crops, cfg.data.masking, batch, dtype)
    return 3 * t.student_flops + t.teacher_flops


def our_step(job, precision):
    """The pretrain stage's step (``dino_ray/train/step.py``, as ``train/loop.py`` runs it) on a DeepSpeed
    engine built as the stage builds it for one worker; returns ``step(batch, i)``."""
    import socket
    from types import SimpleNamespace

    import deepspeed
    import torch

    from dino_ray.data.multicrop import normalize_batch
    from dino_ray.train import precision as mixed
    from dino_ray.train.engines import build_member, build_ssl_model, disable_jit_ops
    from dino_ray.train.schedules import TrainSchedules
    from dino_ray.train.ssl_arch import SSLObjective
    from dino_ray.train.step import student_loss, teacher_output, update

    cfg, sch = job.pretrain, job.pretrain.schedule
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    disable_jit_ops()
    deepspeed.init_distributed(dist_backend="gloo")
    spec = SimpleNamespace(train=cfg.train, schedule=sch)  # what the engines read of the stage's LoopSpec
    torch.manual_seed(job.seed)
    student = build_ssl_model(cfg.model, cfg.loss, drop_path=True)
    member = build_member("student", student, spec, 1, torch.device("cpu"), False)
    objective, schedules = SSLObjective(cfg.loss), TrainSchedules.from_config(sch, cfg.train.batch_size_per_worker)
    n_g, n_l = cfg.data.crops.global_crops_number, cfg.data.crops.local_crops_number
    autocast = mixed.autocast(precision, torch.device("cpu"))

    def step(batch: dict, i: int) -> None:
        crops, values = normalize_batch(batch, cfg.data.crops), schedules.values(i)
        masks = crops["masks"]
        t_out = teacher_output(member.ema, crops, masks, autocast)
        _, _, loss, _ = student_loss(member, objective, t_out, crops, masks, values, True, n_g, n_l, autocast)
        update(member, loss, values["mom"])

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer timed steps (and peer steps)")
    p.add_argument("--preset", default=str(REPO / "jobs" / "presets" / "demo.yaml"))
    p.add_argument("--threads", type=int, default=None, help="default: the preset's CPUs per worker")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "dino-ray-train-step"))
    add_peer_args(p)
    args = p.parse_args()
    # OpenMP threads that spin-wait crawl when another process holds a core (10x slower steps here on a
    # shared machine, nearly nothing gained on a quiet one); set before torch loads, inherited by the peer
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from dino_ray.config.loader import load_job
    from dino_ray.train import precision as mixed

    job = load_job(args.preset, check_inputs=False)  # the recipe only: no data path is read
    cfg = job.pretrain
    batch, crops = cfg.train.batch_size_per_worker, cfg.data.crops
    threads = args.threads or int(cfg.train.threads_per_worker or cfg.train.scaling.cpus_per_worker)
    torch.set_num_threads(threads)
    warmup, timed, peer_steps = (3, 15, 30) if args.quick else (5, 50, 60)
    work = Path(args.work)
    folder, images = image_folder(work, per_class=100)
    batches = crop_batches(folder, job, n_batches=4)
    precision = mixed.resolve(cfg.train.precision, torch.device("cpu"))
    flags = mixed.cpu_bf16_flags()
    step = our_step(job, precision)
    flops = step_flops(job, batch, precision.name)
    # an emulated bf16 matmul runs ~1 GFLOP/s: a small one says as much as a large one, in 1/64 of the time
    sizes = {torch.float32: 1024, torch.bfloat16: 1024 if flags else 256}
    peaks: dict = {dt: [] for dt in sizes}
    times = []
    for i in range(warmup + timed):
        t = time.perf_counter()
        step(batches[i % len(batches)], i)
        times.append(time.perf_counter() - t)
        if i >= warmup and (i - warmup) % max(1, timed // 5) == 0:  # interleaved: the same machine state
            for dt, n in sizes.items():
                peaks[dt].append(2 * n ** 3 / mixed._time_matmul(dt, n, reps=3))
    step_s = statistics.median(times[warmup:])
    fp32, bf16 = (statistics.median(peaks[dt]) for dt in sizes)
    ours = batch / step_s

    peer = None
    if args.peer and peer_available(args.peer_python, "train_step"):
        try:
            peer = run_peer_script(args.peer_python, job, folder, work / "peer", max_steps=peer_steps,
                                   warmup_steps=5, threads=threads)
        except subprocess.CalledProcessError as e:
            print(f"[train_step] peer lightly failed (exit {e.returncode}): no peer row", file=sys.stderr)
    baseline = peer.get("train_images_per_s") if peer else None
    ratio = speed_ratio(ours, baseline)
    from dino_ray.models import build_backbone

    vit = build_backbone(cfg.model.arch, **cfg.model.backbone_kwargs()).config
    print(json.dumps({
        "name": "train_step_images_per_s_vs_lightly_train", "unit": "images/s", "ours": round(ours, 2),
        "headline": "training images/s of the product's step (DeepSpeed engine, param groups, per-part clipping, "
                    "EMA) vs LightlyTrain's DINOv2 on the same ViT, crops and batch",
        "baseline": baseline, "ratio": None if ratio is None else round(ratio, 3),
        "details": {
            "steps_per_s": round(1 / step_s, 3), "step_s_median": round(step_s, 4), "warmup_steps": warmup,
            "timed_steps": timed, "flops_per_step": flops, "achieved_flop_per_s": flops / step_s,
            "fp32_matmul_peak_flop_per_s": fp32, "bf16_matmul_peak_flop_per_s": bf16,
            "fraction_of_fp32_peak": round(flops / step_s / fp32, 3),
            "fraction_of_bf16_peak": round(flops / step_s / bf16, 3),
            "matmul_sizes": {str(dt).split(".")[1]: n for dt, n in sizes.items()},
            "native_bf16": None if flags is None else bool(flags), "bf16_flags": sorted(flags or []),
            "precision": precision.name, "precision_reason": precision.reason,
            "batch": batch, "crops": f"{crops.global_crops_number}x{crops.global_crops_size} + "
                                     f"{crops.local_crops_number}x{crops.local_crops_size}",
            "model": f"ViT D={vit.embed_dim} depth={vit.depth} heads={vit.num_heads} patch={vit.patch_size} "
                     f"img={vit.img_size} ffn={vit.ffn_layer}; heads {cfg.loss.dino_out_dim}/{cfg.loss.ibot_out_dim}",
            "preset": os.path.relpath(args.preset, REPO), "images": images, "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            **({"peer_lightly": peer} if peer else {}),
        },
    }))


if __name__ == "__main__":
    main()
