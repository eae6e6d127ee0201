"""LightlyTrain's DINOv2 on the same ViT, crops, batch and recipe as a dino-ray preset, for a wall-clock budget.

Runs in the peer's own venv (LightlyTrain pins its own torch / torchvision / Lightning stack), e.g.

    python -m venv peer && peer/bin/pip install torch==2.13.0 lightly-train==0.18.0 torchvision==0.28.0
    peer/bin/python benchmarks/peers/lightly_dinov2.py SPEC.json

SPEC.json is written by ``benchmarks/quality.py`` (the preset's ViT config, crops, loss, schedule,
batch, budget, data folder, out folder). Fair by construction: its own steps/s is measured with a
short run first, so its schedules (warm-ups, cosine) span the steps that fit the budget, as ours do;
Lightning's ``max_time`` stops it at the budget regardless. The exported backbone (official DINOv2 key
layout) goes to ``out/exported_models/exported_last.pt``; ``out/result.json`` says where and how fast.

With a ``max_steps`` key (``benchmarks/train_step.py``) it skips the probe and the budget and trains
exactly that many steps to time them: a batch time logged every step, and the data loaded in the
training process (``num_workers=0``), so its augmentation does not share the cores with a step being
timed (our side times crops made up front). LightlyTrain logs the step (``profiling/batch_time``: from
its batch-start to batch-end hook, which covers forward, backward, optimizer step and EMA update)
apart from the wait for data (``profiling/data_time``), so the speed is the batch over the median
batch time after the first ``warmup_steps``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import partial
from pathlib import Path


def install_torchvision_cpu_shim() -> None:
    """PyPI's torchvision is a CUDA build; beside the CPU torch its ops library fails to load and
    ``import torchvision`` dies registering fake kernels for ``nms``. Define the two ops it needs."""
    import torch

    try:
        torch.ops.torchvision.nms
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    install_torchvision_cpu_shim.lib = lib  # keep the Library alive


def build_vit(vit: dict):
    """LightlyTrain's vendored DINOv2 ViT (recognised by method="dinov2") with our architecture."""
    from lightly_train._models.dinov2_vit.dinov2_vit_src.layers import MemEffAttention, NestedTensorBlock
    from lightly_train._models.dinov2_vit.dinov2_vit_src.models.vision_transformer import DinoVisionTransformer

    return DinoVisionTransformer(
        img_size=vit["img_size"], patch_size=vit["patch_size"], embed_dim=vit["embed_dim"], depth=vit["depth"],
        num_heads=vit["num_heads"], mlp_ratio=vit["mlp_ratio"], qkv_bias=vit["qkv_bias"],
        ffn_bias=vit["ffn_bias"], proj_bias=vit["proj_bias"], drop_path_rate=vit["drop_path_rate"],
        drop_path_uniform=vit["drop_path_uniform"], init_values=vit["layerscale_init"],
        ffn_layer=vit["ffn_layer"], block_chunks=0, num_register_tokens=vit["num_register_tokens"],
        interpolate_antialias=vit["interpolate_antialias"], interpolate_offset=vit["interpolate_offset"],
        block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention))


def pretrain(spec: dict, out: Path, steps: int, max_minutes: float | None, log_every: int | None = None,
             num_workers: int = 1) -> float:
    """One LightlyTrain run; returns its wall-clock seconds."""
    import lightly_train

    crops, loss, sched = spec["crops"], spec["loss"], spec["schedule"]
    total = spec["schedule"]["total_iters"]

    def scaled(n: int) -> int:  # the preset's warm-ups, scaled from its length to these steps
        return max(0, min(steps - 1, round(n * steps / total)))

    trainer_args = {"max_steps": steps}
    if max_minutes:
        trainer_args["max_time"] = {"minutes": max_minutes}
    if log_every:  # LightlyTrain logs every min(50, batches per epoch) steps unless told
        trainer_args["log_every_n_steps"] = log_every
    start = time.time()
    lightly_train.pretrain(
        out=str(out), data=spec["data"], model=build_vit(spec["vit"]), method="dinov2",
        batch_size=spec["batch"], num_workers=num_workers, accelerator="cpu", devices=1, precision="32-true",
        seed=spec["seed"], trainer_args=trainer_args, optim="adamw",
        optim_args={"lr": sched["base_lr"], "weight_decay": sched["weight_decay"]},
        method_args={
            "output_dim": loss["dino_out_dim"], "hidden_dim": loss["head_hidden_dim"],
            "dino_bottleneck_dim": loss["dino_bottleneck_dim"], "ibot_bottleneck_dim": loss["ibot_bottleneck_dim"],
            "ibot_separate_head": not loss["share_heads"], "center_method": loss["centering"],
            "dino_loss_weight": loss["dino_loss_weight"], "ibot_loss_weight": loss["ibot_loss_weight"],
            "koleo_loss_weight": loss["koleo_loss_weight"], "student_temp": loss["student_temp"],
            "reference_batch_size": spec["batch"], "warmup_steps": max(1, scaled(sched["warmup_iters"])),
            "min_lr": sched["min_lr"], "momentum_start": sched["momentum_teacher"],
            "momentum_end": sched["final_momentum_teacher"], "teacher_temp_start": sched["warmup_teacher_temp"],
            "teacher_temp_end": sched["teacher_temp"],
            "teacher_temp_warmup_steps": scaled(sched["warmup_teacher_temp_iters"]),
            "student_freeze_last_layer_steps": scaled(sched["freeze_last_layer_iters"]),
            "layerwise_decay": sched["layerwise_decay"], "patch_embed_lr_multiplier": sched["patch_embed_lr_mult"],
            "weight_decay_end": sched["weight_decay_end"], "gradient_clip_val": sched["clip_grad"],
        },
        transform_args={
            "image_size": (crops["global_crops_size"], crops["global_crops_size"]),
            "random_resize": {"min_scale": crops["global_crops_scale"][0], "max_scale": crops["global_crops_scale"][1]},
            "local_view": {"num_views": crops["local_crops_number"],
                           "view_size": (crops["local_crops_size"], crops["local_crops_size"]),
                           "random_resize": {"min_scale": crops["local_crops_scale"][0],
                                             "max_scale": crops["local_crops_scale"][1]}},
        },
        loggers={"tensorboard": None}, overwrite=True)
    return time.time() - start


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    os.environ.setdefault("LIGHTLY_TRAIN_EVENTS_DISABLED", "1")  # no telemetry
    os.environ.setdefault("LIGHTLY_TRAIN_CACHE_DIR", str(out / "cache"))
    install_torchvision_cpu_shim()
    import torch

    torch.set_num_threads(spec.get("threads", 2))
    if spec.get("max_steps"):
        timed_steps(spec, out)
        return
    probe_steps = 20
    probe_s = pretrain(spec, out / "probe", probe_steps, None)  # includes its start-up, so a lower bound
    budget_s = spec["minutes"] * 60
    steps = max(probe_steps, int(budget_s / (probe_s / probe_steps)))
    wall = pretrain(spec, out / "run", steps, spec["minutes"])
    weights = out / "run" / "exported_models" / "exported_last.pt"
    done, batch_s, _ = steps_done(out / "run")
    (out / "result.json").write_text(json.dumps({
        "weights": str(weights), "vit": spec["vit"], "planned_steps": steps, "steps": done,
        "probe_s_per_step": probe_s / probe_steps, "train_wall_s": round(wall, 1),
        "images_per_s_incl_startup": round(done * spec["batch"] / wall, 2),
        # its steady speed: the batch times Lightning logs every 50 steps (median)
        "train_images_per_s": round(spec["batch"] / batch_s, 2) if batch_s else None,
        "lightly_train": __import__("lightly_train").__version__, "torch": torch.__version__}))


def timed_steps(spec: dict, out: Path) -> None:
    """``max_steps`` mode: exactly that many steps, timed from LightlyTrain's own per-step log."""
    import torch

    steps, warmup = spec["max_steps"], spec.get("warmup_steps", 5)
    wall = pretrain(spec, out / "run", steps, None, log_every=1, num_workers=0)
    done, batch_s, data_s = steps_done(out / "run", skip=warmup)
    (out / "result.json").write_text(json.dumps({
        "steps": done, "timed_steps": max(0, done - warmup), "train_wall_s": round(wall, 1),
        "train_images_per_s": round(spec["batch"] / batch_s, 2) if batch_s else None,
        "steps_per_s": round(1 / batch_s, 3) if batch_s else None,
        "batch_time_s": batch_s, "data_time_s": data_s,
        "timing": f"median profiling/batch_time after {warmup} warm-up steps; the data wait (profiling/data_time, "
                  "num_workers=0) is logged apart and not in it",
        "lightly_train": __import__("lightly_train").__version__, "torch": torch.__version__}))


def steps_done(run: Path, skip: int = 0) -> tuple[int, float | None, float | None]:
    """Optimizer steps the run made (``max_time`` may stop it before the planned steps) and the medians
    of the logged batch and data times after the first ``skip`` logged ones, from ``metrics.jsonl``."""
    import statistics

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [int(r["step"]) + 1 for r in rows if "step" in r]
    ckpts = [int(p.stem.rsplit("step=", 1)[1]) for p in (run / "checkpoints").glob("*step=*.ckpt")]

    def median(key: str) -> float | None:
        times = [float(r[key]) for r in rows if key in r][skip:]
        return statistics.median(times) if times else None

    return max(steps + ckpts + [0]), median("profiling/batch_time"), median("profiling/data_time")


if __name__ == "__main__":
    main()
