"""Flat k-means (faiss) and hierarchical k-means with resampling (Vo et al. 2024, Sec. 4).

Resampling pushes centroids from the data density toward a uniform cover of the data support:
after an initial k-means, each step keeps only the points closest to every centroid, re-runs a
fresh k-means on that thinned set and re-assigns all inputs. Level t clusters the centroids of
level t-1, so the tree's upper levels see concepts, not images.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from .config import ClusteringConfig
from .index import as_embeddings, single_threaded_blas
from .sampling import take_per_group

_MAX_FAISS_SEED = 2**31 - 1
_INITS = ("kmeans++", "random")


@dataclass
class KMeansResult:
    centroids: np.ndarray  # float32 [k, D]
    assignment: np.ndarray  # int64 [N]: nearest centroid
    distance: np.ndarray  # float32 [N]: squared L2 to it, or 1 - cosine when spherical


@dataclass
class HierarchicalKMeansResult:
    assignments: np.ndarray  # int64 [N, L]: cluster id of every point at every level, finest first
    centroids: list[np.ndarray]  # per level, float32 [k_l, D]
    distance: np.ndarray  # float32 [N]: distance of every point to its finest-level centroid


def assign(x: np.ndarray, centroids: np.ndarray, spherical: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row of x and the distance to it (metric as in `KMeansResult`)."""
    x = as_embeddings(x, "x", unit_norm=False)
    centroids = as_embeddings(centroids, "centroids", unit_norm=False)
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(f"x has dimension {x.shape[1]}, centroids {centroids.shape[1]}")
    index = faiss.IndexFlatIP(x.shape[1]) if spherical else faiss.IndexFlatL2(x.shape[1])
    index.add(centroids)
    score, ids = index.search(x, 1)
    distance = 1.0 - score[:, 0] if spherical else score[:, 0]
    return ids[:, 0].astype(np.int64), distance.astype(np.float32)


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding: k rows of x spread over the data's support.

    Random seeding draws most centroids from the densest regions, which is exactly the bias
    Vo et al. fight. Each round draws 2 + ln(k) candidates by D^2 sampling and keeps the one that
    lowers the potential most: in high dimension plain D^2 sampling still lands often in big
    clusters, where a second centroid barely helps.
    """
    n = x.shape[0]
    n_trials = 2 + int(np.log(k))
    sq_norms = np.einsum("ij,ij->i", x, x)

    def sq_dist(rows: np.ndarray) -> np.ndarray:
        return np.maximum(sq_norms[:, None] - 2.0 * (x @ x[rows].T) + sq_norms[rows][None, :], 0.0)

    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(n)
    nearest = sq_dist(chosen[:1])[:, 0]
    for i in range(1, k):
        cumulative = np.cumsum(nearest, dtype=np.float64)
        if cumulative[-1] <= 0.0:  # fewer distinct points than k: fill with unused rows
            chosen[i:] = rng.choice(np.setdiff1d(np.arange(n), chosen[:i]), size=k - i, replace=False)
            break
        draws = np.searchsorted(cumulative, rng.random(n_trials) * cumulative[-1], side="right")
        candidates = np.minimum(draws, n - 1)
        updated = np.minimum(nearest[:, None], sq_dist(candidates))
        best = int(updated.sum(axis=0).argmin())
        chosen[i] = candidates[best]
        nearest = updated[:, best]
    return np.ascontiguousarray(x[chosen])


def kmeans(
    x: np.ndarray,
    k: int,
    n_iter: int = 25,
    seed: int = 0,
    spherical: bool = False,
    max_points_per_centroid: int = 256,
    init: str = "kmeans++",
    init_sample_size: int = 8192,
) -> KMeansResult:
    """Lloyd k-means with faiss; training subsamples to max_points_per_centroid * k points.

    init "kmeans++" seeds from max(init_sample_size, 2k) random rows (the sequential D^2
    sampling over all rows would cost more than the Lloyd iterations); "random" is faiss's own
    seeding.
    """
    x = as_embeddings(x, "x", unit_norm=False)
    if not 0 < k <= x.shape[0]:
        raise ValueError(f"k-means needs 0 < k <= number of points, got k={k} for {x.shape[0]} points")
    if n_iter <= 0:
        raise ValueError(f"n_iter must be positive, got {n_iter}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=n_iter,
        seed=int(seed) % _MAX_FAISS_SEED,
        spherical=spherical,
        max_points_per_centroid=max_points_per_centroid,
        # Resampling deliberately clusters few points per centroid: no faiss warning for that.
        min_points_per_centroid=1,
        verbose=False,
    )
    init_centroids = None
    if init == "kmeans++":
        rng = np.random.default_rng(seed)
        n_init = min(x.shape[0], max(init_sample_size, 2 * k))
        rows = np.sort(rng.choice(x.shape[0], size=n_init, replace=False))
        with single_threaded_blas():  # skinny products: threads only add spin-waits
            init_centroids = kmeans_plus_plus(x[rows], k, rng)
    km.train(x, init_centroids=init_centroids)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    assignment, distance = assign(x, centroids, spherical)
    return KMeansResult(centroids=centroids, assignment=assignment, distance=distance)


def closest_per_cluster(assignment: np.ndarray, distance: np.ndarray, per_cluster: int) -> np.ndarray:
    """Indices of the `per_cluster` points nearest to their centroid in every cluster, sorted."""
    quota = np.full(int(assignment.max()) + 1, per_cluster, dtype=np.int64)
    return take_per_group(assignment, distance, quota)


def kmeans_with_config(x: np.ndarray, k: int, cfg: ClusteringConfig, seed: int) -> KMeansResult:
    """`kmeans` with the iteration, metric, subsampling and seeding knobs of a ClusteringConfig."""
    return kmeans(x, k, cfg.n_iter, seed, cfg.spherical, cfg.max_points_per_centroid, cfg.init,
                  cfg.init_sample_size)


def resampled_kmeans(
    x: np.ndarray,
    k: int,
    n_resampling_steps: int,
    sample_size: int,
    cfg: ClusteringConfig,
    rng: np.random.Generator,
) -> KMeansResult:
    """One level of Vo et al.'s resampling-clustering; plain k-means when sample_size <= 1.

    Each step runs a fresh (re-seeded, not warm-started) k-means on the points closest to the
    current centroids, then re-assigns every input to the new centroids.
    """
    x = as_embeddings(x, "x", unit_norm=False)
    result = kmeans_with_config(x, k, cfg, _draw_seed(rng))
    if sample_size <= 1:
        return result
    for _ in range(n_resampling_steps):
        subset = closest_per_cluster(result.assignment, result.distance, sample_size)
        if subset.size < k:
            # Empty clusters can leave fewer points than centroids: top up with random others.
            others = np.setdiff1d(np.arange(x.shape[0]), subset)
            extra = rng.choice(others, size=min(k - subset.size, others.size), replace=False)
            subset = np.sort(np.concatenate([subset, extra]))
        fresh = kmeans_with_config(x[subset], k, cfg, _draw_seed(rng))
        assignment, distance = assign(x, fresh.centroids, cfg.spherical)
        result = KMeansResult(centroids=fresh.centroids, assignment=assignment, distance=distance)
    return result


def hierarchical_kmeans(x: np.ndarray, cfg: ClusteringConfig, seed: int) -> HierarchicalKMeansResult:
    """Bottom-up tree of clusters: level 0 clusters x, level t clusters level t-1's centroids.

    The returned assignments compose the levels, so row i gives point i's cluster at each level.
    """
    x = as_embeddings(x, "x", unit_norm=False)
    rng = np.random.default_rng(seed)
    inputs = x
    point_ids = np.empty((x.shape[0], len(cfg.n_clusters)), dtype=np.int64)
    centroids: list[np.ndarray] = []
    distance = np.zeros(0, dtype=np.float32)
    for level, (k, steps, sample) in enumerate(zip(cfg.n_clusters, cfg.n_resampling_steps, cfg.sample_size)):
        if k > inputs.shape[0]:
            raise ValueError(
                f"clustering level {level} asks for {k} clusters but has only {inputs.shape[0]} inputs "
                f"({'points' if level == 0 else 'centroids of the level below'}); lower ClusteringConfig.n_clusters"
            )
        result = resampled_kmeans(inputs, k, steps, sample, cfg, rng)
        if level == 0:
            point_ids[:, 0] = result.assignment
            distance = result.distance
        else:
            point_ids[:, level] = result.assignment[point_ids[:, level - 1]]
        centroids.append(result.centroids)
        inputs = result.centroids
    return HierarchicalKMeansResult(assignments=point_ids, centroids=centroids, distance=distance)


def _draw_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(_MAX_FAISS_SEED))
