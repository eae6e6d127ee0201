"""Flat k-means and hierarchical k-means with resampling (Vo et al. 2024, Sec. 4).

Resampling pushes centroids from the data density toward a uniform cover of the data support:
after an initial k-means, each step keeps only the points closest to every centroid, re-runs a
fresh k-means on that thinned set and re-assigns all inputs. Level t clusters the centroids of
level t-1, so the tree's upper levels see concepts, not images.

The finest level is written against `Points`, what k-means needs of its input: rows by index, Lloyd
partial sums over training rows, and a full assignment pass. `ArrayPoints` is an in-memory array;
the distributed path implements the same protocol over shards (`distributed_kmeans.ShardPoints`), so
both draw the same samples from the same generator and run the same iterations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .config import ClusteringConfig
from .index import as_embeddings, single_threaded_blas
from .lloyd import Partial, lloyd, partial_sums
from .lloyd import assign as _assign
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


@dataclass
class ClusterTree:
    """The tree without per-point arrays: centroids per level and, for level t >= 1, the level-t
    cluster of every level t-1 centroid (what the driver of the distributed path holds)."""

    centroids: list[np.ndarray]
    parents: list[np.ndarray]  # [L - 1] arrays, parents[t - 1][c] = level-t cluster of level t-1 cluster c
    inertia: float  # level-0 objective of the final assignment (sum of point distances)

    def path_of_finest(self) -> np.ndarray:
        """int64 [k_0, L]: the cluster id at every level of each finest-level cluster."""
        ids = [np.arange(self.centroids[0].shape[0], dtype=np.int64)]
        for parent in self.parents:
            ids.append(parent[ids[-1]])
        return np.stack(ids, axis=1)


class Points(Protocol):
    """What k-means reads of its input; rows are indices 0..n-1."""

    n: int
    inertia: float  # the objective of the last `assign_all` (sum of point distances)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 vectors of the given sorted rows."""

    def trainer(self, rows: np.ndarray, spherical: bool) -> Callable[[np.ndarray], Partial]:
        """A function of centroids giving the Lloyd partial sums over the given training rows."""

    def assign_all(self, centroids: np.ndarray, spherical: bool, closest: int) -> np.ndarray:
        """Assign every row (kept as the current assignment); return the sorted rows of the `closest`
        points nearest their centroid in every cluster (empty when closest <= 0)."""


class ArrayPoints:
    """`Points` over an in-memory [N, D] array; keeps the last assignment pass."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.n = x.shape[0]
        self.assignment = np.zeros(0, dtype=np.int64)
        self.distance = np.zeros(0, dtype=np.float32)
        self.inertia = 0.0

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.x[rows])

    def trainer(self, rows: np.ndarray, spherical: bool) -> Callable[[np.ndarray], Partial]:
        train = self.x if rows.size == self.n else self.x[rows]
        return lambda centroids: partial_sums(train, centroids, spherical)

    def assign_all(self, centroids: np.ndarray, spherical: bool, closest: int) -> np.ndarray:
        self.assignment, self.distance = _assign(self.x, centroids, spherical)
        self.inertia = float(self.distance.astype(np.float64).sum())
        if closest <= 0:
            return np.zeros(0, dtype=np.int64)
        return closest_per_cluster(self.assignment, self.distance, closest)


def assign(x: np.ndarray, centroids: np.ndarray, spherical: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row of x and the distance to it (metric as in `KMeansResult`)."""
    x = as_embeddings(x, "x", unit_norm=False)
    centroids = as_embeddings(centroids, "centroids", unit_norm=False)
    return _assign(x, centroids, spherical)


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


def fit_centroids(
    points: Points,
    k: int,
    n_iter: int = 25,
    seed: int = 0,
    spherical: bool = False,
    max_points_per_centroid: int = 256,
    init: str = "kmeans++",
    init_sample_size: int = 8192,
) -> tuple[np.ndarray, float]:
    """Lloyd k-means centroids of `points` (and the last iteration's objective on the training rows).

    Training uses at most max_points_per_centroid * k random rows, as faiss does. init "kmeans++"
    seeds from max(init_sample_size, 2k) random rows (the sequential D^2 sampling over all rows
    would cost more than the Lloyd iterations); "random" takes k random rows.
    """
    n = points.n
    if not 0 < k <= n:
        raise ValueError(f"k-means needs 0 < k <= number of points, got k={k} for {n} points")
    if n_iter <= 0:
        raise ValueError(f"n_iter must be positive, got {n_iter}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    rng = np.random.default_rng(seed)
    if init == "kmeans++":
        rows = np.sort(rng.choice(n, size=min(n, max(init_sample_size, 2 * k)), replace=False))
        with single_threaded_blas():  # skinny products: threads only add spin-waits
            init_centroids = kmeans_plus_plus(points.take(rows), k, rng)
    else:
        init_centroids = points.take(np.sort(rng.choice(n, size=k, replace=False)))
    n_train = min(n, max_points_per_centroid * k)
    train_rows = np.arange(n) if n_train == n else np.sort(rng.choice(n, size=n_train, replace=False))
    return lloyd(points.trainer(train_rows, spherical), init_centroids, n_iter, spherical, rng)


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
    """`fit_centroids` on an array, then every row assigned."""
    x = as_embeddings(x, "x", unit_norm=False)
    centroids, _ = fit_centroids(ArrayPoints(x), k, n_iter, seed, spherical, max_points_per_centroid, init,
                                 init_sample_size)
    assignment, distance = _assign(x, centroids, spherical)
    return KMeansResult(centroids=centroids, assignment=assignment, distance=distance)


def closest_per_cluster(assignment: np.ndarray, distance: np.ndarray, per_cluster: int) -> np.ndarray:
    """Indices of the `per_cluster` points nearest to their centroid in every cluster, sorted."""
    quota = np.full(int(assignment.max()) + 1, per_cluster, dtype=np.int64)
    return take_per_group(assignment, distance, quota)


def kmeans_with_config(x: np.ndarray, k: int, cfg: ClusteringConfig, seed: int) -> KMeansResult:
    """`kmeans` with the iteration, metric, subsampling and seeding knobs of a ClusteringConfig."""
    return kmeans(x, k, cfg.n_iter, seed, cfg.spherical, cfg.max_points_per_centroid, cfg.init,
                  cfg.init_sample_size)


def resampled_level(points: Points, k: int, n_resampling_steps: int, sample_size: int, cfg: ClusteringConfig,
                    rng: np.random.Generator) -> np.ndarray:
    """One level of Vo et al.'s resampling-clustering on any `Points`; plain k-means when sample_size <= 1.

    Each step runs a fresh (re-seeded, not warm-started) k-means on the points closest to the
    current centroids (few: k * sample_size, so in memory), then re-assigns every input to the new
    centroids. Leaves `points` assigned to the returned centroids.
    """
    centroids, _ = _fit(points, k, cfg, _draw_seed(rng))
    steps = n_resampling_steps if sample_size > 1 else 0
    for _ in range(steps):
        subset = points.assign_all(centroids, cfg.spherical, sample_size)
        if subset.size < k:
            # Empty clusters can leave fewer points than centroids: top up with random others.
            others = np.setdiff1d(np.arange(points.n), subset)
            extra = rng.choice(others, size=min(k - subset.size, others.size), replace=False)
            subset = np.sort(np.concatenate([subset, extra]))
        centroids, _ = _fit(ArrayPoints(points.take(subset)), k, cfg, _draw_seed(rng))
    points.assign_all(centroids, cfg.spherical, 0)
    return centroids


def resampled_kmeans(
    x: np.ndarray,
    k: int,
    n_resampling_steps: int,
    sample_size: int,
    cfg: ClusteringConfig,
    rng: np.random.Generator,
) -> KMeansResult:
    """`resampled_level` on an in-memory array, with its assignment."""
    points = ArrayPoints(as_embeddings(x, "x", unit_norm=False))
    centroids = resampled_level(points, k, n_resampling_steps, sample_size, cfg, rng)
    return KMeansResult(centroids=centroids, assignment=points.assignment, distance=points.distance)


def cluster_tree(points: Points, cfg: ClusteringConfig, seed: int) -> ClusterTree:
    """Bottom-up tree: level 0 clusters `points` (left assigned to it), level t the centroids of t-1."""
    rng = np.random.default_rng(seed)
    centroids: list[np.ndarray] = []
    parents: list[np.ndarray] = []
    inputs: Points = points
    for level, (k, steps, sample) in enumerate(zip(cfg.n_clusters, cfg.n_resampling_steps, cfg.sample_size)):
        if k > inputs.n:
            raise ValueError(
                f"clustering level {level} asks for {k} clusters but has only {inputs.n} inputs "
                f"({'points' if level == 0 else 'centroids of the level below'}); lower ClusteringConfig.n_clusters"
            )
        found = resampled_level(inputs, k, steps, sample, cfg, rng)
        if level > 0:
            parents.append(inputs.assignment)
        centroids.append(found)
        inputs = ArrayPoints(found)
    return ClusterTree(centroids=centroids, parents=parents, inertia=points.inertia)


def hierarchical_kmeans(x: np.ndarray, cfg: ClusteringConfig, seed: int) -> HierarchicalKMeansResult:
    """Bottom-up tree of clusters: level 0 clusters x, level t clusters level t-1's centroids.

    The returned assignments compose the levels, so row i gives point i's cluster at each level.
    """
    points = ArrayPoints(as_embeddings(x, "x", unit_norm=False))
    tree = cluster_tree(points, cfg, seed)
    ids = tree.path_of_finest()[points.assignment]
    return HierarchicalKMeansResult(assignments=ids, centroids=tree.centroids, distance=points.distance)


def _fit(points: Points, k: int, cfg: ClusteringConfig, seed: int) -> tuple[np.ndarray, float]:
    return fit_centroids(points, k, cfg.n_iter, seed, cfg.spherical, cfg.max_points_per_centroid, cfg.init,
                         cfg.init_sample_size)


def _draw_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(_MAX_FAISS_SEED))
