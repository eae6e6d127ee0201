"""Lloyd's k-means as sums of per-shard partial sums: the one k-means that both curation paths run.

A Lloyd iteration only needs, per cluster, the sum and count of the points assigned to it (and the
objective). Those add up across any split of the points, so the in-memory path (one shard: the
whole array) and the distributed path (one Ray task per shard, the driver adding the partials) run
the same iterations on the same centroids. Sums are accumulated in float64, so the split changes the
centroids by far less than their float32 rounding: same seeds, same clusters.

Semantics follow faiss's `Clustering` (which this replaces): assignment by exact search (inner
product when spherical, else L2), centroid = mean, an empty cluster takes half of a big one (picked
with probability proportional to its size, centroid split by +-1/1024), spherical centroids are
re-normalised after every update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

_SPLIT_EPS = 1.0 / 1024.0  # faiss's perturbation when an empty cluster takes over half of another
_CHUNK_ROWS = 16_384  # rows converted to float64 at once when summing (16k x 256-d: 32 MB)


@dataclass
class Partial:
    """Per-cluster sums and counts of some points' assignment, and their summed distance."""

    sums: np.ndarray  # float64 [k, D]
    counts: np.ndarray  # int64 [k]
    inertia: float

    def __add__(self, other: Partial) -> Partial:
        return Partial(self.sums + other.sums, self.counts + other.counts, self.inertia + other.inertia)


def assign(x: np.ndarray, centroids: np.ndarray, spherical: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row of x and the distance to it: squared L2, or 1 - cosine when spherical."""
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(f"x has dimension {x.shape[1]}, centroids {centroids.shape[1]}")
    index = faiss.IndexFlatIP(x.shape[1]) if spherical else faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    score, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    distance = 1.0 - score[:, 0] if spherical else score[:, 0]
    return ids[:, 0].astype(np.int64), distance.astype(np.float32)


def partial_sums(x: np.ndarray, centroids: np.ndarray, spherical: bool) -> Partial:
    """Assign the rows of x and sum them per cluster (float64, chunk by chunk to bound memory)."""
    from scipy.sparse import csr_matrix

    k, d = centroids.shape
    sums = np.zeros((k, d), dtype=np.float64)
    counts = np.zeros(k, dtype=np.int64)
    inertia = 0.0
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        chunk = x[start:start + _CHUNK_ROWS]
        label, distance = assign(chunk, centroids, spherical)
        onehot = csr_matrix((np.ones(label.size), (label, np.arange(label.size))), shape=(k, label.size))
        sums += onehot @ chunk.astype(np.float64)
        counts += np.bincount(label, minlength=k)
        inertia += float(distance.astype(np.float64).sum())
    return Partial(sums, counts, inertia)


def next_centroids(partial: Partial, previous: np.ndarray, spherical: bool, rng: np.random.Generator) -> np.ndarray:
    """Means of the clusters; empty clusters split a populous one (faiss's rule), unit norm if spherical."""
    counts = partial.counts.copy()
    centroids = previous.astype(np.float64, copy=True)
    full = counts > 0
    centroids[full] = partial.sums[full] / counts[full, None]
    n = int(counts.sum())
    k = counts.size
    sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0) * _SPLIT_EPS
    for empty in np.flatnonzero(~full):
        weight = np.maximum(counts - 1, 0).astype(np.float64)
        if n <= k or weight.sum() <= 0:
            break
        donor = int(rng.choice(k, p=weight / weight.sum()))
        centroids[empty] = centroids[donor] * (1.0 + sign)
        centroids[donor] = centroids[donor] * (1.0 - sign)
        counts[empty] = counts[donor] // 2
        counts[donor] -= counts[empty]
    if spherical:
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(centroids, dtype=np.float32)


def lloyd(
    partial: Callable[[np.ndarray], Partial],
    init: np.ndarray,
    n_iter: int,
    spherical: bool,
    rng: np.random.Generator,
) -> tuple[np.ndarray, float]:
    """n_iter Lloyd updates from `init`; `partial(centroids)` assigns and sums the training points
    (one array, or every shard's partial added up). Returns the centroids and the last objective."""
    centroids = np.ascontiguousarray(init, dtype=np.float32)
    if spherical:
        centroids = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    inertia = float("nan")
    for _ in range(n_iter):
        step = partial(centroids)
        inertia = step.inertia
        centroids = next_centroids(step, centroids, spherical, rng)
    return centroids, inertia
