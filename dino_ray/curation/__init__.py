"""Embedding-space data curation (DINOv2 LVD-142M recipe + Vo et al. 2024 balancing).

Pure numpy/faiss on L2-normalised float32 embeddings; no Ray and no I/O. faiss uses the thread
count its caller set (`faiss.omp_set_num_threads`); nothing here changes global state.

Exports resolve lazily, so ``dino_ray.curation.config`` (read by the job config) needs no faiss.
"""

from __future__ import annotations

from dino_ray._lazy import lazy_exports

_EXPORTS = {
    "BalancedSample": "sampling",
    "ClusteringConfig": "config",
    "CurationConfig": "config",
    "CurationResult": "plan",
    "DecontaminationConfig": "config",
    "DecontaminationResult": "dedup",
    "DedupConfig": "config",
    "DedupResult": "dedup",
    "HierarchicalKMeansResult": "kmeans",
    "IndexConfig": "config",
    "KMeansResult": "kmeans",
    "KnnEdges": "knn_graph",
    "KnnGraph": "knn_graph",
    "REASONS": "plan",
    "RetrievalConfig": "config",
    "RetrievalResult": "retrieval",
    "SamplingConfig": "config",
    "as_embeddings": "index",
    "assign": "kmeans",
    "balanced_sample": "sampling",
    "build_index": "index",
    "connected_components": "dedup",
    "curate_arrays": "plan",
    "decontaminate": "dedup",
    "graph_recall": "knn_graph",
    "hierarchical_kmeans": "kmeans",
    "index_kind": "index",
    "kmeans_plus_plus": "kmeans",
    "kmeans_with_config": "kmeans",
    "knn_edges": "knn_graph",
    "measure_recall": "index",
    "resampled_kmeans": "kmeans",
    "retrieve_by_cluster": "retrieval",
    "retrieve_nearest": "retrieval",
    "search": "index",
    "self_dedup": "dedup",
    "water_fill": "sampling",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
