"""k-means over embedding shards: `kmeans.Points` implemented by per-shard tasks.

The driver holds centroids and row numbers of samples; every pass over the data is one round of
tasks, one per shard: gathering the rows of a sample (k-means++ seeding, resampling subsets), the
training rows of a Lloyd run (extracted once, kept in the object store, then one partial-sum round
per iteration) and the assignment of every row (kept per shard for sampling and the output, with
each cluster's closest points returned for resampling). So `kmeans.cluster_tree` runs unchanged on
it, drawing the same samples as on an in-memory array. Ray-free: a `Runner` (Ray tasks in
`distributed_plan`, a plain loop in tests) maps the task functions below over shards.

Points are the shard rows selected by a `keep` mask over pool indices (the clean pool), numbered in
pool order, the way `plan.curate_arrays` numbers `pool[clean_idx]`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from .kmeans import closest_per_cluster
from .lloyd import Partial, assign, partial_sums
from .shards import Shard, ShardStore, read_shard


class Runner(Protocol):
    """Runs a function once per argument tuple, in parallel; `kept` > 0 means the function returns
    (small result, *kept big objects): the big ones stay where they were made (the object store) and
    come back as handles, which later calls take as arguments."""

    def map(self, fn: Callable, args: Sequence[tuple], kept: int = 0) -> list: ...

    def put(self, value: Any) -> Any: ...


class ShardPoints:
    """`kmeans.Points` over the rows of a store selected by a pool-wide bool mask."""

    def __init__(self, store: ShardStore, keep: np.ndarray, runner: Runner):
        self.store, self.runner = store, runner
        self.keep = runner.put(keep)
        per_shard = [int(keep[s.first:s.first + s.n_valid].sum()) for s in store.shards]
        self.offsets = np.r_[0, np.cumsum(per_shard)].astype(np.int64)
        self.n = int(self.offsets[-1])
        self.assigned: list[Any] = []  # per shard: handle of (assignment int64, distance float32)
        self.counts = np.zeros(0, dtype=np.int64)
        self.inertia = 0.0

    def _split(self, rows: np.ndarray) -> list[np.ndarray]:
        bounds = np.searchsorted(rows, self.offsets)
        return [rows[bounds[i]:bounds[i + 1]] - self.offsets[i] for i in range(len(self.store.shards))]

    def _args(self, *extra: Any) -> list[tuple]:
        return [(s, self.store.center, self.keep) + extra for s in self.store.shards]

    def _row_args(self, rows: np.ndarray) -> list[tuple]:
        """Task arguments for the shards holding some of the sorted `rows`, each with its local rows."""
        parts = self._split(rows)
        return [(s, self.store.center, self.keep, p) for s, p in zip(self.store.shards, parts) if p.size]

    def take(self, rows: np.ndarray) -> np.ndarray:
        got = self.runner.map(take_rows, self._row_args(rows))
        return np.concatenate(got) if got else np.zeros((0, self.store.dim), dtype=np.float32)

    def trainer(self, rows: np.ndarray, spherical: bool) -> Callable[[np.ndarray], Partial]:
        blocks = [h for _, h in self.runner.map(training_block, self._row_args(rows), kept=1)]

        def partial(centroids: np.ndarray) -> Partial:
            c = self.runner.put(centroids)
            found = self.runner.map(block_partial, [(b, c, spherical) for b in blocks])
            return sum(found[1:], found[0])

        return partial

    def assign_all(self, centroids: np.ndarray, spherical: bool, closest: int) -> np.ndarray:
        out = self.runner.map(assign_shard, self._args(self.runner.put(centroids), spherical, closest), kept=1)
        self.assigned = [h for _, h in out]
        k = centroids.shape[0]
        self.counts = sum((r["counts"] for r, _ in out), np.zeros(k, dtype=np.int64))
        self.inertia = float(sum(r["inertia"] for r, _ in out))
        if closest <= 0:
            return np.zeros(0, dtype=np.int64)
        rows = np.concatenate([r["rows"] + off for (r, _), off in zip(out, self.offsets)])
        cluster = np.concatenate([r["cluster"] for r, _ in out])
        distance = np.concatenate([r["distance"] for r, _ in out])
        return rows[closest_per_cluster(cluster, distance, closest)]


def shard_points(shard: Shard, center: np.ndarray | None, keep: np.ndarray) -> np.ndarray:
    """The selected rows of a shard, in pool order."""
    x, _ = read_shard(shard, center)
    return x[keep[shard.first:shard.first + shard.n_valid]]


def take_rows(shard: Shard, center: np.ndarray | None, keep: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(shard_points(shard, center, keep)[rows])


def training_block(shard: Shard, center: np.ndarray | None, keep: np.ndarray, rows: np.ndarray
                   ) -> tuple[int, np.ndarray]:
    block = take_rows(shard, center, keep, rows)
    return block.shape[0], block


def block_partial(block: np.ndarray, centroids: np.ndarray, spherical: bool) -> Partial:
    return partial_sums(block, centroids, spherical)


def assign_shard(shard: Shard, center: np.ndarray | None, keep: np.ndarray, centroids: np.ndarray,
                 spherical: bool, closest: int) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """Assign a shard's points; return cluster counts, objective and each cluster's `closest` nearest
    points of this shard (a superset of the global ones that fall here), keep the assignment."""
    x = shard_points(shard, center, keep)
    if x.shape[0]:
        label, distance = assign(x, centroids, spherical)
    else:
        label, distance = np.zeros(0, np.int64), np.zeros(0, np.float32)
    small = {"counts": np.bincount(label, minlength=centroids.shape[0]),
             "inertia": float(distance.astype(np.float64).sum())}
    if closest > 0:
        rows = closest_per_cluster(label, distance, closest) if label.size else np.zeros(0, dtype=np.int64)
        small.update(rows=rows, cluster=label[rows], distance=distance[rows])
    return small, (label, distance)
