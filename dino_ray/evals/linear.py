"""Linear probe on frozen features: the whole DINOv2 head grid trained in one pass.

DINOv2 trains 52 linear heads (13 learning rates x last 1 or 4 blocks x with/without average-pooled
patch tokens) side by side on features computed once per iteration, and reports the best one. We
keep that protocol on cached features and make the sharing explicit:

- every step gathers ONE minibatch of the widest input (CLS of the last 4 blocks + avgpool); each
  smaller input layout is a contiguous column slice of it (see ``features.linear_input``);
- the heads of one layout (all learning rates) are stacked into one [L, C, D] weight, so their
  logits come from one matrix multiply, and one momentum-SGD op updates them all with a per-head
  learning-rate tensor under the shared cosine schedule (equivalent to one torch param group per
  head, which we measured to be ~2x slower overall; see ``linear_heads.StackedSGD``);
- the loss is the sum of the per-head mean cross-entropies, so each head's gradient is exactly the
  one it would get alone.

The grid and its knobs are :class:`dino_ray.evals.config.LinearGridConfig` (torch-free, so the job
config can hold it); that module also documents the learning-rate grid, code vs paper.

Model selection differs on purpose: DINOv2 picks the head on ImageNet val, which is also the reported
test set. Here the best head is picked on a validation split held out from train
(:func:`split_train_val`) and the test set is touched once, by :func:`evaluate_head`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dino_ray.evals.config import LR_GRID_CODE, LinearGridConfig
from dino_ray.evals.features import ArrayLike, as_labels, infer_num_classes, linear_input
from dino_ray.evals.linear_heads import HeadSpec, LayoutHeads, LinearHead, StackedSGD, cosine_factor, init_weight

__all__ = ["LR_GRID_CODE", "GridResult", "HeadSpec", "LinearGridConfig", "LinearHead", "evaluate_head",
           "gather_rows", "split_train_val", "train_linear_grid", "train_single_head"]


@dataclass
class GridResult:
    val_top1: dict[HeadSpec, float]  # every head's top-1 on the validation split
    best: LinearHead  # the head with the highest val top-1 (first in grid order on ties)
    batches_fetched: int  # feature minibatches gathered in total (one per step for the grid)

    @property
    def best_val_top1(self) -> float:
        return self.val_top1[self.best.spec]

    def metrics(self) -> dict[str, float]:
        """Flat MLflow/Tune metrics: one val top-1 per head plus the best."""
        out = {f"val_top1/{spec.name}": acc for spec, acc in self.val_top1.items()}
        out["val_top1/best"] = self.best_val_top1
        return out


def split_train_val(labels: ArrayLike, val_fraction: float = 0.1,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified hold-out: ``(train_idx, val_idx)``, sorted.

    Each class gives round(val_fraction * count) samples to val, at least one when it has two or
    more, and always keeps at least one for training, so selection never sees a class it cannot
    learn."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {y.shape}")
    rng = np.random.default_rng(seed)
    val_parts = []
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        n_val = min(max(round(val_fraction * members.size), 1), members.size - 1)
        val_parts.append(rng.permutation(members)[:n_val])
    val_idx = np.sort(np.concatenate(val_parts))
    train_idx = np.setdiff1d(np.arange(y.size), val_idx)
    return train_idx, val_idx


def gather_rows(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Fetch one minibatch of cached features (the per-step cost the grid shares across heads)."""
    return features.index_select(0, idx)


def _generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """Independent streams for head init and data order: a head's init and its minibatches then do
    not depend on how many other heads share the run, so a grid head reproduces its solo run."""
    init_seed, order_seed = np.random.SeedSequence(seed).generate_state(2)
    return (torch.Generator().manual_seed(int(init_seed)),
            torch.Generator().manual_seed(int(order_seed)))


def _batch_plan(n: int, cfg: LinearGridConfig) -> tuple[int, int]:
    """(batch size, steps per epoch). The ragged last batch of an epoch is dropped: the official
    probe only sees full batches, and reshuffling every epoch still covers every sample."""
    batch = min(cfg.batch_size, n)
    return batch, n // batch


def _fit(x: torch.Tensor, y: torch.Tensor,
         loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
         update: Callable[[torch.Tensor, int], None], cfg: LinearGridConfig,
         generator: torch.Generator) -> int:
    """``cfg.epochs`` reshuffled passes; ``update(loss, step)`` does backward + optimiser step.
    Returns the number of minibatches fetched."""
    device = torch.device(cfg.device)
    batch, steps_per_epoch = _batch_plan(x.shape[0], cfg)
    fetched = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for step in range(steps_per_epoch):
            idx = order[step * batch:(step + 1) * batch]
            xb = gather_rows(x, idx).to(device, non_blocking=True)
            update(loss_fn(xb, y[idx].to(device, non_blocking=True)), fetched)
            fetched += 1
    return fetched


@torch.no_grad()
def _correct_counts(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                    y: torch.Tensor, cfg: LinearGridConfig, topk: int = 1) -> torch.Tensor:
    """Per-head count of samples whose label is in the top-k logits; ``logits_fn`` -> [B, L, C]."""
    device = torch.device(cfg.device)
    counts = None
    for start in range(0, x.shape[0], cfg.eval_batch_size):
        logits = logits_fn(x[start:start + cfg.eval_batch_size].to(device))
        labels = y[start:start + cfg.eval_batch_size].to(device)
        top = logits.topk(min(topk, logits.shape[-1]), dim=-1).indices
        hits = (top == labels[:, None, None]).any(dim=-1).sum(dim=0)
        counts = hits if counts is None else counts + hits
    return counts.cpu()


def _layout_columns(d: int, max_blocks: int, n_blocks: int, avgpool: bool) -> slice:
    """Columns of layout (n_blocks, avgpool) inside [cls_max .. cls_1, avgpool_1] (each d wide)."""
    return slice((max_blocks - n_blocks) * d, max_blocks * d + (d if avgpool else 0))


def _block_width(feats: Mapping[str, ArrayLike], max_blocks: int, avgpool: bool) -> int:
    """The per-block feature width; layouts are slices only if every block has the same width."""
    keys = [f"cls_{i}" for i in range(1, max_blocks + 1)] + (["avgpool_1"] if avgpool else [])
    widths = {key: np.shape(feats[key])[-1] for key in keys}
    if len(set(widths.values())) != 1:
        raise ValueError(f"feature widths differ across blocks: {widths}")
    return next(iter(widths.values()))


def _labels(y: ArrayLike, n: int, name: str) -> torch.Tensor:
    return as_labels(y, n, name, torch.device("cpu"))


def _build_layouts(lrs: Sequence[float], d: int, num_classes: int, cfg: LinearGridConfig,
                   generator: torch.Generator) -> list[LayoutHeads]:
    """One stack of heads per (n_blocks, avgpool) input layout, in a fixed order."""
    max_blocks = max(cfg.n_last_blocks)
    layouts = []
    for n_blocks in sorted(set(cfg.n_last_blocks)):
        for pool in sorted(set(cfg.avgpool)):
            cols = _layout_columns(d, max_blocks, n_blocks, pool)
            specs = [HeadSpec(n_blocks, pool, float(lr)) for lr in lrs]
            layouts.append(LayoutHeads(specs, cols, cols.stop - cols.start, num_classes, cfg,
                                        generator))
    return layouts


def _select_on_val(layouts: list[LayoutHeads], x_val: torch.Tensor, y_val: torch.Tensor,
                   cfg: LinearGridConfig) -> tuple[dict[HeadSpec, float], LinearHead]:
    """Every head's val top-1 and a copy of the best head (the first one on ties)."""
    val_top1: dict[HeadSpec, float] = {}
    best, best_acc = None, -1.0
    for layout in layouts:
        accs = _correct_counts(layout.logits, x_val, y_val, cfg).double() / x_val.shape[0]
        for i, spec in enumerate(layout.specs):
            val_top1[spec] = float(accs[i])
            if val_top1[spec] > best_acc:
                best, best_acc = layout.head(i), val_top1[spec]
    return val_top1, best


def train_linear_grid(train_feats: Mapping[str, ArrayLike], train_y: ArrayLike,
                      val_feats: Mapping[str, ArrayLike], val_y: ArrayLike,
                      cfg: LinearGridConfig = LinearGridConfig(),
                      lrs: Sequence[float] | None = None, seed: int = 0) -> GridResult:
    """Train every (lr x n_last_blocks x avgpool) head together; pick the best on ``val`` only.

    ``train_feats``/``val_feats`` are feature dicts as produced by ``features.extract_features``
    (keys ``cls_1``..``cls_4``, ``avgpool_1``). ``lrs`` overrides ``cfg.learning_rates`` so a sweep
    can split the grid across trials."""
    grid_lrs = tuple(lrs) if lrs is not None else cfg.learning_rates
    if not grid_lrs or any(lr <= 0 for lr in grid_lrs):
        raise ValueError(f"learning rates must be positive, got {grid_lrs}")
    max_blocks, any_pool = max(cfg.n_last_blocks), any(cfg.avgpool)
    x_train = torch.from_numpy(linear_input(train_feats, max_blocks, any_pool))
    x_val = torch.from_numpy(linear_input(val_feats, max_blocks, any_pool))
    if x_train.shape[1] != x_val.shape[1]:
        raise ValueError(f"train features are {x_train.shape[1]} wide, val {x_val.shape[1]}")
    y_train = _labels(train_y, x_train.shape[0], "train_y")
    y_val = _labels(val_y, x_val.shape[0], "val_y")
    num_classes = infer_num_classes(cfg.num_classes, y_train, y_val)
    d = _block_width(train_feats, max_blocks, any_pool)

    init_gen, order_gen = _generators(seed)
    layouts = _build_layouts(grid_lrs, d, num_classes, cfg, init_gen)

    def grid_loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return sum(layout.loss(xb, yb) for layout in layouts)

    total_steps = cfg.epochs * _batch_plan(x_train.shape[0], cfg)[1]
    optimizer = StackedSGD([pl for layout in layouts for pl in layout.params_with_lrs], cfg,
                            total_steps)
    fetched = _fit(x_train, y_train, grid_loss, optimizer, cfg, order_gen)
    val_top1, best = _select_on_val(layouts, x_val, y_val, cfg)
    return GridResult(val_top1=val_top1, best=best, batches_fetched=fetched)


def train_single_head(train_feats: Mapping[str, ArrayLike], train_y: ArrayLike,
                      val_feats: Mapping[str, ArrayLike], val_y: ArrayLike,
                      cfg: LinearGridConfig, lr: float, n_blocks: int, avgpool: bool,
                      seed: int = 0) -> GridResult:
    """One head trained on its own (its own minibatch gathers, a plain linear layer).

    Same optimiser, schedule and init as the grid: it is the one-configuration-per-job baseline the
    grid is measured against, and a way to retrain a chosen head in isolation."""
    x_train = torch.from_numpy(linear_input(train_feats, n_blocks, avgpool))
    x_val = torch.from_numpy(linear_input(val_feats, n_blocks, avgpool))
    y_train = _labels(train_y, x_train.shape[0], "train_y")
    y_val = _labels(val_y, x_val.shape[0], "val_y")
    num_classes = infer_num_classes(cfg.num_classes, y_train, y_val)
    init_gen, order_gen = _generators(seed)
    device = torch.device(cfg.device)
    weight = nn.Parameter(init_weight(x_train.shape[1], num_classes, cfg.init_std,
                                       init_gen).to(device))
    bias = nn.Parameter(torch.zeros(num_classes, device=device))
    optimizer = torch.optim.SGD([weight, bias], lr=cfg.scaled_lr(lr), momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * _batch_plan(x_train.shape[0], cfg)[1]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_factor(total_steps))

    def loss_fn(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(xb, weight, bias), yb)

    def update(loss: torch.Tensor, step: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

    fetched = _fit(x_train, y_train, loss_fn, update, cfg, order_gen)
    spec = HeadSpec(n_blocks, avgpool, float(lr))
    correct = _correct_counts(lambda xb: F.linear(xb, weight, bias)[:, None, :], x_val, y_val, cfg)
    head = LinearHead(spec, weight.detach().cpu().numpy().copy(), bias.detach().cpu().numpy().copy())
    return GridResult(val_top1={spec: float(correct[0]) / x_val.shape[0]}, best=head,
                      batches_fetched=fetched)


def evaluate_head(head: LinearHead, test_feats: Mapping[str, ArrayLike], test_y: ArrayLike,
                  cfg: LinearGridConfig = LinearGridConfig()) -> dict[str, float]:
    """Test top-1 / top-5 (fractions) of a selected head; the only place the test split is used."""
    x = torch.from_numpy(linear_input(test_feats, head.spec.n_blocks, head.spec.avgpool))
    if x.shape[1] != head.weight.shape[1]:
        raise ValueError(f"head {head.spec.name} expects {head.weight.shape[1]} input dims, test "
                         f"features give {x.shape[1]}")
    y = _labels(test_y, x.shape[0], "test_y")
    if int(y.max()) >= head.weight.shape[0]:
        raise ValueError(f"test_y has class {int(y.max())} but the head has "
                         f"{head.weight.shape[0]} classes")
    device = torch.device(cfg.device)
    weight = torch.from_numpy(head.weight).to(device)
    bias = torch.from_numpy(head.bias).to(device)

    def logits(xb: torch.Tensor) -> torch.Tensor:
        return F.linear(xb, weight, bias)[:, None, :]

    top1 = _correct_counts(logits, x, y, cfg, topk=1)
    top5 = _correct_counts(logits, x, y, cfg, topk=5)
    return {"top1": float(top1[0]) / x.shape[0], "top5": float(top5[0]) / x.shape[0]}
