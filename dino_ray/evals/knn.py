"""Weighted k-nearest-neighbour classification on frozen features (DINOv2 protocol, paper §7).

Cosine similarity between L2-normalised features; each of the k nearest training samples votes for
its class with weight exp(s / T). DINOv2 normalises those weights with a softmax, which rescales all
votes of one test sample by the same positive factor and so never changes its ranking of classes;
we subtract the row maximum instead (same ranking, no overflow for small T).

Memory stays bounded: test samples are processed in chunks of ``batch_size`` and, for each chunk, the
training set in chunks of ``train_chunk`` with a running top-k merge, so the largest temporary is
``batch_size x train_chunk`` similarities whatever the dataset size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dino_ray.evals.features import ArrayLike, as_labels, as_matrix, infer_num_classes


def _running_topk(train: torch.Tensor, queries: torch.Tensor, k: int,
                  train_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k similarities and train indices for ``queries``, scanning the train set in chunks."""
    best_sims = queries.new_empty(queries.shape[0], 0)
    best_idx = torch.empty(queries.shape[0], 0, dtype=torch.long, device=queries.device)
    for start in range(0, train.shape[0], train_chunk):
        sims = queries @ train[start:start + train_chunk].T
        sims, idx = sims.topk(min(k, sims.shape[1]), dim=1)
        merged_sims = torch.cat([best_sims, sims], dim=1)
        merged_idx = torch.cat([best_idx, idx + start], dim=1)
        best_sims, order = merged_sims.topk(min(k, merged_sims.shape[1]), dim=1)
        best_idx = merged_idx.gather(1, order)
    return best_sims, best_idx


def vote(neighbour_sims: torch.Tensor, neighbour_labels: torch.Tensor, temperature: float,
         num_classes: int) -> torch.Tensor:
    """Class scores [B, C] from the k neighbours of each query: sum of exp(s/T) per class."""
    weights = ((neighbour_sims - neighbour_sims[:, :1]) / temperature).exp()
    scores = neighbour_sims.new_zeros(neighbour_sims.shape[0], num_classes)
    return scores.scatter_add_(1, neighbour_labels, weights)


def _topk_hits(scores: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[int, int]:
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


def knn_classify(train_x: ArrayLike, train_y: ArrayLike, test_x: ArrayLike, test_y: ArrayLike,
                 ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
                 num_classes: int | None = None, batch_size: int = 256, train_chunk: int = 65536,
                 device: str | torch.device = "cpu") -> dict:
    """Top-1 / top-5 accuracy (fractions in [0, 1]) of weighted kNN for every k in ``ks``.

    Returns ``{"metrics": {"k20_top1": ..., "k20_top5": ...}, "notes": [...]}``. Keys keep the
    requested k; when k exceeds the training-set size all training samples vote and a note says so.
    Top-5 becomes top-C when there are fewer than 5 classes."""
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if batch_size < 1 or train_chunk < 1:
        raise ValueError(f"batch_size and train_chunk must be >= 1, got {batch_size}, {train_chunk}")
    dev = torch.device(device)
    train = F.normalize(as_matrix(train_x, "train_x", dev), dim=1)
    test = F.normalize(as_matrix(test_x, "test_x", dev), dim=1)
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train_x has {train.shape[1]} dims but test_x has {test.shape[1]}")
    ytrain = as_labels(train_y, train.shape[0], "train_y", dev)
    ytest = as_labels(test_y, test.shape[0], "test_y", dev)
    n_cls = infer_num_classes(num_classes, ytrain, ytest)

    used = {int(k): min(int(k), train.shape[0]) for k in ks}
    notes = [f"k={k} exceeds the {train.shape[0]} training samples: all of them vote"
             for k, u in used.items() if u < k]
    top1 = dict.fromkeys(used, 0)
    top5 = dict.fromkeys(used, 0)
    for start in range(0, test.shape[0], batch_size):
        queries, labels = test[start:start + batch_size], ytest[start:start + batch_size]
        sims, idx = _running_topk(train, queries, max(used.values()), train_chunk)
        for k, k_used in used.items():
            scores = vote(sims[:, :k_used], ytrain[idx[:, :k_used]], temperature, n_cls)
            h1, h5 = _topk_hits(scores, labels, 5)
            top1[k] += h1
            top5[k] += h5
    n = test.shape[0]
    metrics: dict[str, float] = {}
    for k in used:
        metrics[f"k{k}_top1"] = top1[k] / n
        metrics[f"k{k}_top5"] = top5[k] / n
    return {"metrics": metrics, "notes": notes}
