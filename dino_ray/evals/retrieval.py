"""Instance/category retrieval metrics on frozen features: mean average precision and recall@k.

DINOv2 ranks a gallery by cosine similarity to each query (Oxford/Paris, Met, AmsterTime). We use
the class label as relevance, which turns any labelled split into a retrieval benchmark. A gallery
item is relevant to a query when it has the same label. Ties in similarity keep gallery order (a
stable sort), so results are reproducible.

- AP of a query: mean over its relevant items of the precision at that item's rank.
- recall@k: fraction of queries with at least one relevant item among the top k (the usual
  retrieval definition, not the fraction of relevant items retrieved).

Queries without any relevant item in the gallery have no defined AP; they are left out of both
metrics and counted in ``queries_without_positive``. Metric keys avoid '@' (``recall_at_5``) because
MLflow rejects it in metric names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dino_ray.evals.features import ArrayLike, as_labels, as_matrix


def _ranked_relevance(queries: torch.Tensor, qlabels: torch.Tensor, gallery: torch.Tensor,
                      glabels: torch.Tensor, self_offset: int | None) -> torch.Tensor:
    """Boolean [B, G'] relevance of the gallery sorted by decreasing similarity per query.

    With ``self_offset`` (the index of the first query inside the gallery), each query's own entry is
    pushed to the end and dropped, so G' = G - 1."""
    sims = queries @ gallery.T
    if self_offset is not None:
        rows = torch.arange(queries.shape[0], device=sims.device)
        sims[rows, rows + self_offset] = float("-inf")
    order = sims.argsort(dim=1, descending=True, stable=True)
    if self_offset is not None:
        order = order[:, :-1]
    return glabels[order] == qlabels[:, None]


def _average_precision(relevant: torch.Tensor) -> torch.Tensor:
    ranks = torch.arange(1, relevant.shape[1] + 1, device=relevant.device, dtype=torch.float32)
    hits = relevant.float().cumsum(dim=1)
    precision_at_hits = (hits / ranks) * relevant.float()
    return precision_at_hits.sum(dim=1) / relevant.sum(dim=1).clamp(min=1)


def retrieval_metrics(query_x: ArrayLike, query_y: ArrayLike, gallery_x: ArrayLike,
                      gallery_y: ArrayLike, ks: Sequence[int] = (1, 5, 10),
                      exclude_self: bool = False, batch_size: int = 256,
                      device: str | torch.device = "cpu") -> dict[str, float]:
    """``{"mAP", "recall_at_1", "recall_at_5", ..., "queries", "queries_without_positive"}``.

    ``exclude_self=True`` is for query set == gallery set (leave-one-out): query i never retrieves
    gallery item i. mAP and recalls are fractions in [0, 1]."""
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    dev = torch.device(device)
    queries = F.normalize(as_matrix(query_x, "query_x", dev), dim=1)
    gallery = F.normalize(as_matrix(gallery_x, "gallery_x", dev), dim=1)
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"query_x has {queries.shape[1]} dims but gallery_x has {gallery.shape[1]}")
    qlabels = as_labels(query_y, queries.shape[0], "query_y", dev)
    glabels = as_labels(gallery_y, gallery.shape[0], "gallery_y", dev)
    if exclude_self and queries.shape[0] != gallery.shape[0]:
        raise ValueError(f"exclude_self needs query set == gallery set, got {queries.shape[0]} "
                         f"queries and {gallery.shape[0]} gallery items")

    ap_sum, evaluated = 0.0, 0
    found = dict.fromkeys((int(k) for k in ks), 0)
    for start in range(0, queries.shape[0], batch_size):
        relevant = _ranked_relevance(queries[start:start + batch_size],
                                     qlabels[start:start + batch_size], gallery, glabels,
                                     start if exclude_self else None)
        has_positive = relevant.any(dim=1)
        relevant = relevant[has_positive]
        evaluated += int(has_positive.sum())
        ap_sum += float(_average_precision(relevant).sum())
        for k in found:
            found[k] += int(relevant[:, :k].any(dim=1).sum())
    n_queries = queries.shape[0]
    if evaluated == 0:
        raise ValueError("no query has a relevant gallery item (no shared labels); metrics undefined")
    metrics = {"mAP": ap_sum / evaluated}
    metrics.update({f"recall_at_{k}": hits / evaluated for k, hits in found.items()})
    metrics["queries"] = float(evaluated)
    metrics["queries_without_positive"] = float(n_queries - evaluated)
    return metrics
