"""Forward throughput of our ViT-S/14 vs transformers' Dinov2Model (SDPA) on CPU, plus packed multi-crop.

Both models hold the same random weights and run interleaved in one process (the machine is shared,
so only same-process, alternating measurements are comparable). ``ours`` and ``baseline`` are median
images/s at 224 px under ``torch.inference_mode`` in fp32. Details add the packed multi-crop forward
(2x224 + 8x98 crops per image in one call) against one call per crop, and a matmul ceiling measured in
the same process. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dino_ray.models import build_backbone  # noqa: E402
from dino_ray.models.hf import to_hf_model  # noqa: E402


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(candidates: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call for each candidate, alternating the order every repetition."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else reversed(names):
            times[name].append(timed(candidates[name]))
    return times


def matmul_gflops(n: int = 2048, repeats: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def vit_gflops_per_image(dim: int, depth: int, tokens: int, mlp_hidden: int, patch_pixels: int) -> float:
    """Analytic forward FLOPs: patch conv, qkv/proj/MLP GEMMs and the two attention matmuls."""
    gemm = 2 * tokens * dim * (3 * dim + dim + 2 * mlp_hidden)
    attention = 2 * 2 * tokens * tokens * dim
    patch = 2 * (tokens - 1) * dim * 3 * patch_pixels
    return (depth * (gemm + attention) + patch) / 1e9


def timm_status() -> str:
    try:
        import timm  # noqa: F401
    except ImportError as err:
        return f"unavailable ({err})"
    return f"installed {timm.__version__} (not benchmarked: this script compares against transformers)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller multi-crop batch")
    parser.add_argument("--batch", type=int, default=16, help="images per forward at 224 px")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    repeats, warmup, crop_batch = (2, 1, 1) if args.quick else (6, 2, 2)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = build_backbone("vit_small").eval()
    theirs = to_hf_model(ours)
    theirs.set_attn_implementation("sdpa")
    theirs.eval()
    images = torch.randn(args.batch, 3, 224, 224)

    with torch.inference_mode():
        max_diff = (ours(images[:2]) - theirs(pixel_values=images[:2]).last_hidden_state[:, 0]).abs().max().item()
        ceiling = matmul_gflops()
        fwd = interleaved({"ours": lambda: ours(images), "hf": lambda: theirs(pixel_values=images)},
                          warmup, repeats)

        global_crops = torch.randn(2 * crop_batch, 3, 224, 224)
        local_crops = torch.randn(8 * crop_batch, 3, 98, 98)
        crops = list(global_crops.split(crop_batch)) + list(local_crops.split(crop_batch))
        packing = interleaved({
            "packed": lambda: ours.forward_features([global_crops, local_crops]),
            "per_resolution": lambda: [ours.forward_features(t) for t in (global_crops, local_crops)],
            "per_crop": lambda: [ours.forward_features(c) for c in crops],
        }, warmup, repeats)

    ips = {k: args.batch / statistics.median(v) for k, v in fwd.items()}
    best = {k: args.batch / min(v) for k, v in fwd.items()}
    n_crops = 10 * crop_batch
    crops_per_s = {k: round(n_crops / statistics.median(v), 2) for k, v in packing.items()}
    gflop = vit_gflops_per_image(384, 12, 257, 1536, 14 * 14)
    result = {
        "name": "vit_forward",
        "unit": "images/s",
        "ours": round(ips["ours"], 3),
        "baseline": round(ips["hf"], 3),
        "ratio": round(ips["ours"] / ips["hf"], 3),
        "details": {
            "model": "vit_small/14 (384x12, 6 heads), random init, fp32, inference_mode",
            "baseline_impl": "transformers.Dinov2Model, attn_implementation=sdpa, same weights",
            "batch": args.batch, "img_size": 224, "threads": args.threads,
            "repeats": repeats, "warmup": warmup, "quick": args.quick,
            "best_images_per_s": {k: round(v, 3) for k, v in best.items()},
            "ours_gflops_per_s_median": round(ips["ours"] * gflop, 1),
            "matmul_2048_fp32_gflops_per_s": round(ceiling, 1),
            "cls_max_abs_diff_vs_hf": max_diff,
            "multicrop": {
                "images": crop_batch, "crops": "2x224 + 8x98 per image",
                "crops_per_s_median": crops_per_s,
                "packed_over_per_crop": round(crops_per_s["packed"] / crops_per_s["per_crop"], 3),
                "packed_over_per_resolution": round(crops_per_s["packed"] / crops_per_s["per_resolution"], 3),
            },
            "timm": timm_status(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
