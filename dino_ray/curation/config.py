"""Configuration of the embedding-based curation pipeline (DINOv2 App. A.3/A.4, Vo et al. 2024).

Defaults follow the papers where they give a number; where they do not (or where the number only
makes sense at billion-image scale) the comment says where our value comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dino_ray.config.fields import Checked, bounded

COSINE = dict(ge=-1.0, le=1.0, hint="a cosine similarity is in [-1, 1]")


@dataclass
class IndexConfig(Checked):
    """How the pool is indexed for k-NN search (dedup graph, decontamination, retrieval)."""

    # Pools with fewer rows use exact IndexFlatIP: exact 200k x 200k k-NN costs ~4-5 min on two
    # cores (notes/curation.md Sec. 6), above that IVF is ~8-10x cheaper.
    exact_threshold: int = bounded(200_000, gt=0)
    # IVF lists; None means round(4 * sqrt(N)), the usual faiss rule of thumb.
    nlist: int | None = bounded(None, gt=0)
    # Lists visited per query; 16 gave recall@4 = 0.95 on clustered 384-d data (notes Sec. 6).
    nprobe: int = bounded(16, gt=0)
    # Rows sampled per list to train the coarse quantizer: just above the 39 below which faiss
    # warns; training costs nlist^2 times this, the largest item of the index at 1M rows.
    train_points_per_list: int = bounded(40, gt=0)
    # Lloyd iterations of the coarse quantizer (faiss default for IVF training).
    train_iters: int = bounded(10, gt=0)
    # Queries used to measure the recall of an IVF index against exact search.
    recall_queries: int = bounded(1000, gt=0)
    # Query batch size for graph construction: bounds the [batch, k] result buffers.
    search_batch_size: int = bounded(65_536, gt=0)


@dataclass
class DedupConfig(Checked):
    """Copy-detection self-dedup: k-NN graph, threshold, connected components, keep one each."""

    enabled: bool = True
    # Neighbours per image in the k-NN graph (DINOv2 App. A.3). The same graph feeds the
    # component propagation of decontamination.
    k: int = bounded(64, gt=0)
    # Cosine above which two images are copies (DINOv2 App. A.3 with SSCD descriptors).
    threshold: float = bounded(0.6, **COSINE)


@dataclass
class DecontaminationConfig(Checked):
    """Removal of pool images near any evaluation image (train and test splits alike)."""

    enabled: bool = True
    # Pool neighbours retrieved per evaluation image.
    k: int = bounded(64, gt=0)
    # Stricter than self-dedup: cosine > 0.45 to an eval image marks a pool image (App. A.3).
    threshold: float = bounded(0.45, **COSINE)
    # Drop the whole pool component (pool-pool edges above `threshold`) that touches an eval
    # image, as DINOv2 does, instead of only the direct neighbours.
    propagate: bool = True


@dataclass
class ClusteringConfig(Checked):
    """Hierarchical k-means with resampling (Vo et al. 2024), finest level first."""

    enabled: bool = True
    # Clusters per level, bottom-up; level t clusters the centroids of level t-1. Vo et al. use
    # 10M/500k/50k/10k for 743M images; ours keep a similar fan-out for 1e5-1e7-image pools.
    n_clusters: tuple[int, ...] = bounded((1000, 100, 10), gt=0)
    # Resampling-clustering steps after the initial k-means of each level (0 = plain k-means).
    # Vo et al. skip them at the first level only because it is 10M clusters of 743M images; at
    # our scale they are cheap (k-means on k * sample_size points + one re-assignment each). On
    # benchmarks/curate.py's 100k Zipf data, 3 steps cut the share of the 10% most populous
    # concepts in a 10% hierarchical sample from 0.67 to 0.39 (pool: 0.72).
    n_resampling_steps: tuple[int, ...] = bounded((3, 10, 10), ge=0)
    # Points closest to each centroid kept for the next resampling step. Vo et al.: "roughly half
    # the average cluster size" above the first level; at the first level that would be as costly
    # as the plain k-means, so 10.  A value <= 1 disables resampling at that level.
    sample_size: tuple[int, ...] = (10, 5, 5)
    # Lloyd iterations per k-means run: Vo et al. run 50 (float64, GPUs); 25, faiss's default,
    # after k-means++ seeding halves the cost on CPU.
    n_iter: int = bounded(25, gt=0)
    # Cosine (spherical) k-means instead of Vo et al.'s L2. Upper levels cluster centroids, whose
    # norms shrink when a cluster mixes concepts; under L2 those low-norm centroids collapse into
    # one top cluster that then gets a single share of the budget. Unit centroids avoid that
    # (same benchmark: head-concept share 0.51 with L2 vs 0.39 spherical).
    spherical: bool = True
    # faiss trains each k-means on at most this many points per centroid (its default, 256),
    # which keeps the first level affordable; assignment always covers every point.
    max_points_per_centroid: int = bounded(256, gt=0)
    # Seeding: "kmeans++" (D^2 sampling, as Vo et al.) covers sparse regions; "random" is faiss's.
    init: Literal["kmeans++", "random"] = "kmeans++"
    # k-means++ seeds from this many random points (at least 2 per centroid): D^2 sampling is
    # sequential in k, costing k * init_sample_size * D * log(k) multiply-adds.
    init_sample_size: int = bounded(8192, gt=0)

    def validate(self) -> None:
        n = len(self.n_clusters)
        if n == 0:
            raise ValueError("ClusteringConfig.n_clusters must list at least one level")
        for name in ("n_resampling_steps", "sample_size"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"ClusteringConfig.{name} has {len(getattr(self, name))} entries, "
                    f"n_clusters has {n}: give one per level"
                )
        if any(b > a for a, b in zip(self.n_clusters, self.n_clusters[1:])):
            raise ValueError(f"ClusteringConfig.n_clusters must not grow with the level: {self.n_clusters}")


@dataclass
class SamplingConfig(Checked):
    """Balanced sampling of the clustered pool (Vo et al. 2024, water-filling down the tree)."""

    enabled: bool = True
    # "hierarchical": equal shares per top-level cluster, recursively; "flat": finest level only.
    strategy: Literal["hierarchical", "flat"] = "hierarchical"
    # Absolute number of images to sample; overrides target_fraction when set.
    target_size: int | None = bounded(None, ge=0)
    # Fraction of the cleaned pool to keep: DINOv3's LVD-1689M is ~10% of its ~17B pool.
    target_fraction: float = bounded(0.1, gt=0.0, le=1.0)
    # Which images a leaf cluster gives up first: "random" (Vo et al.'s code default) or "closest"
    # to its centroid (their web-image config); closest-first favours the leaf's dominant concept
    # and covered ~40% fewer distinct concepts on the synthetic benchmark.
    within_cluster: Literal["random", "closest"] = "random"


@dataclass
class RetrievalConfig(Checked):
    """Retrieval of pool images that resemble a curated seed set (DINOv2 App. A.4)."""

    enabled: bool = True
    # "auto" = DINOv2's rule: sample-based for seed sets of at least `auto_sample_min_seeds`
    # images, cluster-based below; "sample", "cluster" or "both" force a choice.
    mode: Literal["auto", "sample", "cluster", "both"] = "auto"
    auto_sample_min_seeds: int = bounded(1_000_000, gt=0)
    # Nearest pool images per seed image: 4 for ImageNet-22k / GLDv2 (32 for ImageNet-1k).
    n_per_seed: int = bounded(4, gt=0)
    # Images taken from each pool cluster that holds enough seed images (10,000 in DINOv2).
    per_cluster: int = bounded(10_000, gt=0)
    # A cluster qualifies when it holds at least this many seed images ("more than 3").
    min_seed_in_cluster: int = bounded(4, gt=0)
    # Cap on images retrieved for one seed set (1M per dataset in DINOv2).
    max_total: int = bounded(1_000_000, gt=0)
    # Pool clusters for cluster-based retrieval: None reuses the finest level of the pool
    # clustering; a number runs a separate flat k-means (DINOv2 used 100,000).
    n_clusters: int | None = bounded(None, gt=0)


@dataclass
class ExecutionConfig(Checked):
    """Where curation runs: in one process on arrays (`plan.curate_arrays`) or as Ray tasks over
    embedding shards (`distributed_plan.curate_shards`), whose driver holds O(clusters x dim), not
    O(images x dim). Both paths share the decision logic and give the same result on the same data
    with an exact index (docs/curation.md says where they can differ above `index.exact_threshold`)."""

    # "auto": local below `distributed_above` embeddings, distributed from there on.
    mode: Literal["auto", "local", "distributed"] = "auto"
    # In one process the pool, a faiss index over it and a [N, 64] graph are ~3 x N x D x 4 bytes:
    # 5.8 GB at 2M x 256-d, about what a 24 GB worker can hold next to Ray and the embedder.
    distributed_above: int = bounded(2_000_000, gt=0)
    # Rows per shard (a task's unit of work; also the target size of a dedup bucket): a 200k x 256-d
    # shard is 200 MB, and a bucket's k-NN graph over it stays ~2 GB in one task.
    shard_rows: int = bounded(200_000, gt=0)
    # Ray tasks in flight at once (each runs faiss on one thread); how it runs, not what it computes.
    workers: int = bounded(2, gt=0, operational=True)


@dataclass
class CurationConfig(Checked):
    """All curation steps, run in this order by `plan.curate_arrays`; each can be switched off."""

    index: IndexConfig = field(default_factory=IndexConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontamination: DecontaminationConfig = field(default_factory=DecontaminationConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    # What of the cleaned pool enters the output besides retrieved images: "balanced" (the
    # balanced sample; needs clustering and sampling), "all", or "none" (DINOv2's LVD-142M is
    # retrieval only).
    pool_selection: Literal["balanced", "all", "none"] = "balanced"

    def validate(self) -> None:
        if self.pool_selection == "balanced" and not (self.clustering.enabled and self.sampling.enabled):
            raise ValueError(
                "CurationConfig.pool_selection='balanced' needs clustering.enabled and sampling.enabled; "
                "use pool_selection='all' or 'none' otherwise"
            )

    def distributed(self, n_pool: int) -> bool:
        """Whether a pool of n_pool embeddings is curated by Ray tasks over shards."""
        e = self.execution
        return e.mode == "distributed" or (e.mode == "auto" and n_pool >= e.distributed_above)
