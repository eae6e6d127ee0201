"""Linear-probe grid: our stacked 52-head pass vs DINOv2's own one-pass loop, on the same cached features.

Ours = ``train_linear_grid`` with the DINOv2 grid (13 learning rates x last 1/4 blocks x avgpool
yes/no = 52 heads): one minibatch gather per step feeds every head, the heads of one input layout
share one matmul, one fused momentum-SGD op per layout. Baseline = the official protocol's loop
(``dinov2/eval/linear.py``: ``AllClassifiers``), rebuilt here: the same 52 heads as separate
``nn.Linear`` modules trained in the same single pass over the data, each building its input by
concatenating its blocks' tokens (``create_linear_input``), the 52 losses summed into one backward,
one ``torch.optim.SGD`` with a param group per head and a cosine schedule. Both see the same minibatches,
epochs and batch size. Detail: one head at a time (what a sweep with one trial per configuration pays
per head), for scale. Throughput unit: heads trained per second; ratio = ours / official one-pass.

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


def official_one_pass(train: dict, y_train: np.ndarray, cfg: LinearGridConfig, seed: int) -> float:
    """DINOv2's linear-eval loop on cached features (see module docstring); returns the last loss."""
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    feats = {k: torch.from_numpy(v) for k, v in train.items()}
    y = torch.from_numpy(y_train).long()
    heads = []
    for n_blocks, pool in LAYOUTS:
        d_in = feats["cls_1"].shape[1] * (n_blocks + pool)
        for lr in cfg.learning_rates:
            linear = nn.Linear(d_in, int(y.max()) + 1)
            nn.init.normal_(linear.weight, std=cfg.init_std)
            nn.init.zeros_(linear.bias)
            heads.append((n_blocks, pool, lr, linear))
    optimizer = torch.optim.SGD([{"params": h[3].parameters(), "lr": cfg.scaled_lr(h[2])} for h in heads],
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(y) // cfg.batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs * steps_per_epoch, eta_min=0)
    loss = torch.zeros(())
    for _ in range(cfg.epochs):
        order = torch.randperm(len(y), generator=gen)
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            tokens = {k: v[idx] for k, v in feats.items()}  # the backbone's outputs for this batch
            losses = []
            for n_blocks, pool, _, linear in heads:
                parts = [tokens[f"cls_{i}"] for i in range(n_blocks, 0, -1)] + ([tokens["avgpool_1"]] if pool else [])
                losses.append(nn.functional.cross_entropy(linear(torch.cat(parts, dim=-1)), y[idx]))
            loss = sum(losses)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return float(loss)


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

    official_one_pass(train, y_train, LinearGridConfig(epochs=1, batch_size=n_train // 2), 0)  # warm-up
    grid_times, official_times, single_times, best_val = [], [], [], 0.0
    for r in range(rounds):
        t_grid, result = timed(lambda: train_linear_grid(train, y_train, val, y_val, cfg, seed=r))
        grid_times.append(t_grid)
        best_val = result.best_val_top1
        official_times.append(timed(lambda: official_one_pass(train, y_train, cfg, seed=r))[0])
        per_layout = [timed(lambda: train_single_head(train, y_train, val, y_val, cfg,
                                                      SINGLE_HEAD_LR, n, pool, seed=r))[0]
                      for n, pool in LAYOUTS]
        single_times.append(statistics.mean(per_layout))
        print(f"round {r}: grid {t_grid:.2f}s for {len(result.val_top1)} heads, official one-pass loop "
              f"{official_times[-1]:.2f}s, single head {single_times[-1]:.3f}s (mean of 4 layouts)", flush=True)

    n_heads = len(cfg.learning_rates) * len(LAYOUTS)
    t_grid, t_single = statistics.median(grid_times), statistics.median(single_times)
    t_official = statistics.median(official_times)
    ours, baseline = n_heads / t_grid, n_heads / t_official
    print(json.dumps({
        "name": "eval_sweep_linear_grid_vs_official_one_pass",
        "unit": "heads/s",
        "headline": "52 linear heads on cached features: our stacked grid vs DINOv2's one-pass loop "
                    "(52 nn.Linear, one SGD), same data pass",
        "ours": round(ours, 3),
        "baseline": round(baseline, 3),
        "ratio": round(ours / baseline, 3),
        "details": {
            "heads": n_heads,
            "official_one_pass_seconds_median": round(t_official, 4),
            "one_at_a_time_heads_per_s": round(1.0 / t_single, 3),
            "ratio_vs_one_at_a_time": round(ours * t_single, 3),
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
