"""Retrieval of pool images resembling a curated seed set (DINOv2 Sec. 3 and App. A.4).

Sample-based retrieval takes the nearest pool images of every seed image and suits large seed
sets; cluster-based retrieval takes whole regions of the pool (clusters holding several seed
images) and suits small seed sets, which would otherwise pull in too few images.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from .index import as_embeddings, search
from .kmeans import assign
from .sampling import row_keys, take_per_group, water_fill


@dataclass
class RetrievalResult:
    indices: np.ndarray  # int64, sorted unique pool indices
    n_candidates: int  # retrieved before merging images picked more than once
    clusters_hit: np.ndarray  # int64 ids of pool clusters that qualified (empty for sample-based)

    @property
    def n_collisions(self) -> int:
        """Images retrieved by more than one seed, counted once per extra retrieval."""
        return self.n_candidates - int(self.indices.size)


def retrieve_nearest(
    index: faiss.Index,
    seeds: np.ndarray,
    n_per_seed: int,
    allowed: np.ndarray | None = None,
) -> RetrievalResult:
    """The n_per_seed nearest pool images (cosine) of every seed image, restricted to `allowed`."""
    _, ids = search(index, seeds, n_per_seed, allowed)
    found = ids[ids >= 0].astype(np.int64)
    return RetrievalResult(indices=np.unique(found), n_candidates=int(found.size),
                           clusters_hit=np.zeros(0, dtype=np.int64))


def retrieve_by_cluster(
    pool_assignment: np.ndarray,
    centroids: np.ndarray,
    seeds: np.ndarray,
    per_cluster: int,
    min_seed_in_cluster: int,
    max_total: int,
    seed: int,
    spherical: bool = False,
) -> RetrievalResult:
    """Up to per_cluster random pool images from every cluster holding >= min_seed_in_cluster seeds.

    Seed images are assigned to the nearest pool centroid. Pool images with assignment -1 (removed
    earlier) are never picked. When the qualifying clusters offer more than max_total images,
    the cap is water-filled across them so that each keeps an equal share.
    """
    pool_assignment = np.asarray(pool_assignment, dtype=np.int64)
    if pool_assignment.ndim != 1:
        raise ValueError(f"pool_assignment must be 1-D, got shape {pool_assignment.shape}")
    centroids = as_embeddings(centroids, "centroids", unit_norm=False)
    k = centroids.shape[0]
    if pool_assignment.size and (pool_assignment.min() < -1 or pool_assignment.max() >= k):
        raise ValueError(f"pool_assignment must hold cluster ids in [0, {k}) or -1")
    for name, value in (("per_cluster", per_cluster), ("min_seed_in_cluster", min_seed_in_cluster),
                        ("max_total", max_total)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    take, hit = cluster_quota(np.bincount(pool_assignment[pool_assignment >= 0], minlength=k), centroids, seeds,
                              per_cluster, min_seed_in_cluster, max_total, seed, spherical)
    valid = np.flatnonzero(pool_assignment >= 0)
    chosen = valid[take_per_group(pool_assignment[valid], row_keys(valid, seed), take)]
    return RetrievalResult(indices=chosen, n_candidates=int(chosen.size), clusters_hit=hit)


def cluster_quota(
    pool_sizes: np.ndarray,
    centroids: np.ndarray,
    seeds: np.ndarray,
    per_cluster: int,
    min_seed_in_cluster: int,
    max_total: int,
    seed: int,
    spherical: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(images to take from every pool cluster, the clusters that qualified), from cluster sizes alone,
    so the distributed path decides in its driver and picks per shard (by `row_keys`, smallest first)."""
    k = centroids.shape[0]
    seed_cluster, _ = assign(as_embeddings(seeds, "seeds"), centroids, spherical)
    hit = np.flatnonzero(np.bincount(seed_cluster, minlength=k) >= min_seed_in_cluster)
    offer = np.minimum(np.asarray(pool_sizes, dtype=np.int64)[hit], per_cluster)
    rng = np.random.default_rng(seed)
    take = np.zeros(k, dtype=np.int64)
    take[hit] = water_fill(offer, np.zeros(hit.size, dtype=np.int64), np.array([min(max_total, int(offer.sum()))]), rng)
    return take, hit.astype(np.int64)
