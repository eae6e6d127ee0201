"""One full DINOv2 SSL step on this machine: images/s and achieved FLOP/s vs the measured matmul peak.

The step is what a training worker runs (without DeepSpeed's communication, which is a no-op on one
process): teacher forward on the global crops, packed student forward on all crops, DINO + iBOT +
KoLeo losses, backward, AdamW, EMA update. FLOPs are counted analytically for the backbone (the heads
are a few percent): per token and block 24*D^2 (qkv, proj, 4x MLP) + 4*N*D (attention), x3 for the
student (forward + backward) and x1 for the teacher. The baseline is a large fp32 matmul timed in the
same run, interleaved with the steps, so ratio = fraction of the machine's peak the step achieves.

    python benchmarks/train_step.py [--quick] [--arch vit_small] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def backbone_flops(dim: int, depth: int, tokens: int, images: int) -> float:
    """Forward FLOPs (2 per multiply-add) of the transformer blocks for ``images`` sequences."""
    per_token_block = 24 * dim * dim + 4 * tokens * dim
    return float(per_token_block * tokens * depth * images)


def matmul_flops_per_s(n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from dino_ray.models import build_backbone
    from dino_ray.train.ema import ema_update_, matching_parameters
    from dino_ray.train.ssl_arch import LossConfig, SSLModel, SSLObjective

    batch = args.batch or (4 if args.quick else 8)
    g, l, n_g, n_l = 224, 98, 2, 8
    if args.quick:
        g, l = 112, 56
    loss_cfg = LossConfig(dino_out_dim=4096, ibot_out_dim=4096)
    torch.manual_seed(0)
    student = SSLModel.build(build_backbone(args.arch, img_size=g, drop_path_rate=0.1), loss_cfg)
    teacher = SSLModel.build(build_backbone(args.arch, img_size=g), loss_cfg)
    teacher.load_state_dict(student.state_dict())
    teacher.eval().requires_grad_(False)
    t_params, s_params = matching_parameters(teacher, student)
    objective = SSLObjective(loss_cfg)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    globals_ = torch.randn(n_g * batch, 3, g, g)
    locals_ = torch.randn(n_l * batch, 3, l, l)
    patches = (g // 14) ** 2
    masks = torch.rand(n_g * batch, patches) < 0.3

    def step() -> None:
        with torch.no_grad():
            targets = objective.teacher_targets(teacher(globals_, None, masks, apply_masks=False), 0.07, n_g)
        out = student(globals_, locals_, masks, apply_masks=True)
        loss, _ = objective(out, targets, masks, n_g, n_l)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update_(t_params, s_params, 0.996)

    bb = student.backbone
    d, depth = bb.embed_dim, len(bb.blocks)
    tg, tl = 1 + patches, 1 + (l // 14) ** 2
    flops = 3 * (backbone_flops(d, depth, tg, n_g * batch) + backbone_flops(d, depth, tl, n_l * batch)) \
        + backbone_flops(d, depth, tg, n_g * batch)
    step()  # warm-up
    rounds = 2 if args.quick else 4
    step_times, peaks = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - t)
        peaks.append(matmul_flops_per_s())
    step_s = sorted(step_times)[len(step_times) // 2]
    peak = sorted(peaks)[len(peaks) // 2]
    achieved = flops / step_s
    print(json.dumps({
        "name": "train_step_flops_vs_matmul_peak", "unit": "FLOP/s", "ours": achieved, "baseline": peak,
        "ratio": achieved / peak, "images_per_s": batch / step_s, "step_s": step_s, "arch": args.arch,
        "batch": batch, "crops": f"{n_g}x{g} + {n_l}x{l}", "threads": torch.get_num_threads(),
        "flops_per_step": flops, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
