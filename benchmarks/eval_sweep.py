"""Linear-probe grid: all 52 heads in one pass vs one head at a time, on the same cached features.

Ours = ``train_linear_grid`` with the DINOv2 grid (13 learning rates x last 1/4 blocks x avgpool
yes/no = 52 heads): one minibatch gather per step feeds every head, the heads of one input layout
share one matmul. Baseline = ``train_single_head``: the same optimiser, schedule, epochs and batch
size for ONE head, i.e. what one-trial-per-configuration sweeps pay for each of the 52 heads. Each
round times the grid once and one single head per input layout (the 52 heads are 13 of each
layout, so the mean over the four layouts is the per-head cost); rounds are interleaved and the
medians are reported. Throughput unit: heads trained per second; ratio = speedup of training the
grid together over training it head by head.

Features are synthetic, shaped like a frozen ViT's cached eval features (``features.extract_features``
layout: ``cls_1..cls_4`` and ``avgpool_1``), class-structured so the heads learn something real.
Default threads = 1: the per-step matmuls are small, and on a shared 2-core box OpenMP barriers
then cost more than the arithmetic (``--threads`` to change it).

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_ray.evals.features import feature_keys  # noqa: E402
from dino_ray.evals.linear import LinearGridConfig, train_linear_grid, train_single_head  # noqa: E402

LAYOUTS = ((1, False), (1, True), (4, False), (4, True))
SINGLE_HEAD_LR = 1e-3  # any grid value: the cost of a step does not depend on it


def synthetic_features(n: int, dim: int, num_classes: int, seed: int):
    """Later blocks carry more class signal, the avgpool token a weaker copy of it (as in ViTs)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32)
    labels = rng.integers(0, num_classes, n)
    feats = {}
    for key in feature_keys(4):
        block = int(key.rsplit("_", 1)[1])
        signal = (0.1 if key.startswith("avgpool") else 0.2) / block
        noise = rng.standard_normal((n, dim), dtype=np.float32)
        feats[key] = (signal * centres[labels] + noise).astype(np.float32)
    return feats, labels


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dim", type=int, default=192, help="feature width per block (ViT-Ti)")
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    n_train, n_val, epochs, rounds = (2000, 500, 1, 2) if args.quick else (10000, 2000, 3, 5)
    cfg = LinearGridConfig(epochs=epochs, batch_size=128)
    feats, labels = synthetic_features(n_train + n_val, args.dim, args.classes, seed=0)
    train, y_train = {k: v[:n_train] for k, v in feats.items()}, labels[:n_train]
    val, y_val = {k: v[n_train:] for k, v in feats.items()}, labels[n_train:]
    # Warm-up: the first optimiser construction imports torch._dynamo (seconds), untimed.
    train_single_head(train, y_train, val, y_val, LinearGridConfig(epochs=1, batch_size=n_train),
                      SINGLE_HEAD_LR, 1, False)

    grid_times, single_times, best_val = [], [], 0.0
    for r in range(rounds):
        t_grid, result = timed(lambda: train_linear_grid(train, y_train, val, y_val, cfg, seed=r))
        grid_times.append(t_grid)
        best_val = result.best_val_top1
        per_layout = [timed(lambda: train_single_head(train, y_train, val, y_val, cfg,
                                                      SINGLE_HEAD_LR, n, pool, seed=r))[0]
                      for n, pool in LAYOUTS]
        single_times.append(statistics.mean(per_layout))
        print(f"round {r}: grid {t_grid:.2f}s for {len(result.val_top1)} heads, "
              f"single head {single_times[-1]:.3f}s (mean of 4 layouts)", flush=True)

    n_heads = len(cfg.learning_rates) * len(LAYOUTS)
    t_grid, t_single = statistics.median(grid_times), statistics.median(single_times)
    ours, baseline = n_heads / t_grid, 1.0 / t_single
    print(json.dumps({
        "name": "eval_sweep_linear_grid",
        "unit": "heads/s",
        "ours": round(ours, 3),
        "baseline": round(baseline, 3),
        "ratio": round(ours / baseline, 3),
        "details": {
            "heads": n_heads,
            "grid_seconds_median": round(t_grid, 4),
            "single_head_seconds_median": round(t_single, 4),
            "grid_seconds": [round(t, 4) for t in grid_times],
            "single_head_seconds": [round(t, 4) for t in single_times],
            "one_at_a_time_seconds_for_grid": round(n_heads * t_single, 3),
            "best_val_top1": round(best_val, 4),
            "n_train": n_train, "n_val": n_val, "dim_per_block": args.dim,
            "widest_input": 5 * args.dim, "classes": args.classes, "epochs": epochs,
            "batch_size": cfg.batch_size, "rounds": rounds, "threads": torch.get_num_threads(),
            "quick": args.quick, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }))


if __name__ == "__main__":
    main()
