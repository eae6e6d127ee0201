"""Balanced sampling over a cluster tree by water-filling (Vo et al. 2024, Sec. 4.2).

A budget is split evenly across sibling clusters; a cluster smaller than its share gives all of
its points and the surplus flows to the larger siblings. Applied top-down, every top-level concept
gets the same weight however many images the web happens to hold for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_STRATEGIES = ("hierarchical", "flat")


@dataclass
class BalancedSample:
    indices: np.ndarray  # int64 [T], sorted point indices
    counts_before: list[np.ndarray]  # per level (finest first): points per cluster id
    counts_after: list[np.ndarray]  # per level: selected points per cluster id


def water_fill(sizes: np.ndarray, groups: np.ndarray, budgets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Allocation per item such that, within each group, the group's budget is spread evenly.

    Items are clusters of `sizes` points, grouped (children of one parent) by `groups`; every
    group g hands out exactly min(budgets[g], its total size). The largest cap c with
    sum(min(size, c)) <= budget is found per group from sorted sizes, and the few units left after
    capping go to randomly chosen uncapped items, one each.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    budgets = np.asarray(budgets, dtype=np.int64)
    if sizes.shape != groups.shape or sizes.ndim != 1:
        raise ValueError(f"sizes and groups must be 1-D and equally long, got {sizes.shape} and {groups.shape}")
    if sizes.size == 0:
        return sizes.copy()
    if sizes.min() < 0 or budgets.min(initial=0) < 0:
        raise ValueError("sizes and budgets must be non-negative")
    if groups.min() < 0 or groups.max() >= budgets.size:
        raise ValueError(f"group ids must lie in [0, {budgets.size}), got [{groups.min()}, {groups.max()}]")
    m = sizes.size
    order = np.lexsort((sizes, groups))
    s, g = sizes[order], groups[order]
    count = np.bincount(g, minlength=budgets.size)
    start = np.r_[0, np.cumsum(count)[:-1]]
    rank = np.arange(m) - start[g]
    before = np.cumsum(s) - s
    before -= before[start[g]]
    # Cost of capping every item of the group at this item's size; monotone inside a group.
    cost = before + (count[g] - rank) * s
    full = cost <= budgets[g]
    n_full = np.bincount(g, weights=full, minlength=budgets.size).astype(np.int64)
    full_sum = np.bincount(g, weights=s * full, minlength=budgets.size).astype(np.int64)
    rest = count - n_full
    cap = np.where(rest > 0, (budgets - full_sum) // np.maximum(rest, 1), 0)
    remainder = np.where(rest > 0, budgets - full_sum - cap * rest, 0)
    alloc_sorted = np.where(full, s, cap[g])
    # Hand the remainder to randomly ranked uncapped items (uncapped sort first in each group).
    lucky_order = np.lexsort((rng.random(m), full, g))
    lucky_rank = np.arange(m) - start[g[lucky_order]]
    gets_one = ~full[lucky_order] & (lucky_rank < remainder[g[lucky_order]])
    alloc_sorted[lucky_order[gets_one]] += 1
    alloc = np.empty(m, dtype=np.int64)
    alloc[order] = alloc_sorted
    return alloc


def balanced_sample(
    cluster_ids_per_level: np.ndarray,
    target_size: int,
    strategy: str = "hierarchical",
    seed: int = 0,
    priority: np.ndarray | None = None,
    row_ids: np.ndarray | None = None,
) -> BalancedSample:
    """Pick target_size points spread as evenly as possible over clusters.

    `cluster_ids_per_level` is [N, L] (finest level first, as `hierarchical_kmeans` returns) or
    [N] for one level. "hierarchical" water-fills the top level, then each cluster's share over
    its children, down to the finest level; "flat" water-fills the finest level alone. Inside a
    finest-level cluster, points with the lowest `priority` (e.g. distance to the centroid) go
    first; without it the order is `row_keys(row_ids, seed)` (row_ids default to 0..N-1), a random
    order that does not depend on how the rows are split into shards.
    """
    ids = np.asarray(cluster_ids_per_level)
    ids = ids[:, None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"cluster_ids_per_level must be an integer [N] or [N, L] array, got {ids.dtype} {ids.shape}")
    if ids.size and ids.min() < 0:
        raise ValueError("cluster_ids_per_level holds negative ids: pass only the clustered points")
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
    n = ids.shape[0]
    if not 0 <= target_size <= n:
        raise ValueError(f"target_size must be in [0, {n}] (number of points), got {target_size}")
    if n == 0:
        empty = [np.zeros(0, dtype=np.int64) for _ in range(ids.shape[1])]
        return BalancedSample(indices=np.zeros(0, dtype=np.int64), counts_before=empty, counts_after=empty)
    levels = ids if strategy == "hierarchical" else ids[:, :1]
    paths, path_of_point, counts = np.unique(levels, axis=0, return_inverse=True, return_counts=True)
    quota = path_quotas(paths, counts, target_size, seed)
    rows = np.arange(n, dtype=np.int64) if row_ids is None else np.asarray(row_ids, dtype=np.int64)
    key = row_keys(rows, seed) if priority is None else _check_priority(priority, n)
    chosen = take_per_group(path_of_point.reshape(-1), key, quota)
    counts_before = [np.bincount(ids[:, lv]) for lv in range(ids.shape[1])]
    counts_after = [np.bincount(ids[chosen, lv], minlength=c.size) for lv, c in enumerate(counts_before)]
    return BalancedSample(indices=chosen.astype(np.int64), counts_before=counts_before, counts_after=counts_after)


def path_quotas(paths: np.ndarray, counts: np.ndarray, target_size: int, seed: int) -> np.ndarray:
    """Points to take from each leaf, given the distinct root paths [P, L] (finest first, as np.unique
    sorts them) and their point counts: water-filling from the top level down. O(leaves): the
    distributed path computes it in the driver from per-shard counts."""
    rng = np.random.default_rng(seed)
    nodes = _tree_nodes(paths)
    # Top level: one group (the root) with the whole budget; then each parent's share downwards.
    alloc = water_fill(np.bincount(nodes[-1], weights=counts).astype(np.int64),
                       np.zeros(nodes[-1].max() + 1, dtype=np.int64), np.array([target_size]), rng)
    for level in range(len(nodes) - 2, -1, -1):
        child, parent = nodes[level], nodes[level + 1]
        parent_of_child = np.zeros(child.max() + 1, dtype=np.int64)
        parent_of_child[child] = parent
        alloc = water_fill(np.bincount(child, weights=counts).astype(np.int64), parent_of_child, alloc, rng)
    return alloc[nodes[0]]


def row_keys(rows: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) number per row id, a hash of (row, seed) (splitmix64): the random order of
    sampling and retrieval, the same whichever shard or process draws it."""
    mix = _splitmix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    z = _splitmix(np.asarray(rows, dtype=np.int64).astype(np.uint64) ^ mix)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _splitmix(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def take_per_group(groups: np.ndarray, key: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Sorted indices of the quota[g] items with the smallest key in every group g.

    Ties in key go to the smaller index, so the pick is reproducible.
    """
    groups = np.asarray(groups, dtype=np.int64)
    n = groups.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.arange(n), key, groups))
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    return np.sort(order[rank < quota[sorted_groups]]).astype(np.int64)


def _tree_nodes(levels: np.ndarray) -> list[np.ndarray]:
    """Dense node id of every row at every level, where a node is the path from the top.

    Defining nodes by their path makes the input a tree even if the same finest-level id were
    reused under two different parents.
    """
    n_levels = levels.shape[1]
    nodes = [np.empty(0, dtype=np.int64)] * n_levels
    nodes[-1] = np.unique(levels[:, -1], return_inverse=True)[1].astype(np.int64)
    for lv in range(n_levels - 2, -1, -1):
        width = int(levels[:, lv].max()) + 1
        path = nodes[lv + 1] * width + levels[:, lv]
        nodes[lv] = np.unique(path, return_inverse=True)[1].astype(np.int64)
    return nodes


def _check_priority(priority: np.ndarray, n: int) -> np.ndarray:
    priority = np.asarray(priority, dtype=np.float64)
    if priority.shape != (n,) or not np.isfinite(priority).all():
        raise ValueError(f"priority must hold {n} finite values, got shape {priority.shape}")
    return priority
