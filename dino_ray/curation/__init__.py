"""Embedding-space data curation (DINOv2 LVD-142M recipe + Vo et al. 2024 balancing).

Pure numpy/faiss on L2-normalised float32 embeddings; no Ray and no I/O. faiss uses the thread
count its caller set (`faiss.omp_set_num_threads`); nothing here changes global state.
"""

from .config import (
    ClusteringConfig,
    CurationConfig,
    DecontaminationConfig,
    DedupConfig,
    IndexConfig,
    RetrievalConfig,
    SamplingConfig,
)
from .dedup import (
    DecontaminationResult,
    DedupResult,
    connected_components,
    decontaminate,
    self_dedup,
    union_find_components,
)
from .index import as_embeddings, build_index, index_kind, measure_recall, search
from .kmeans import (
    HierarchicalKMeansResult,
    KMeansResult,
    assign,
    hierarchical_kmeans,
    kmeans,
    kmeans_plus_plus,
    kmeans_with_config,
    resampled_kmeans,
)
from .knn_graph import KnnEdges, KnnGraph, graph_recall, knn_edges, knn_graph
from .plan import REASONS, CurationResult, curate_arrays
from .retrieval import RetrievalResult, retrieve_by_cluster, retrieve_nearest
from .sampling import BalancedSample, balanced_sample, water_fill

__all__ = [
    "REASONS",
    "BalancedSample",
    "ClusteringConfig",
    "CurationConfig",
    "CurationResult",
    "DecontaminationConfig",
    "DecontaminationResult",
    "DedupConfig",
    "DedupResult",
    "HierarchicalKMeansResult",
    "IndexConfig",
    "KMeansResult",
    "KnnEdges",
    "KnnGraph",
    "RetrievalConfig",
    "RetrievalResult",
    "SamplingConfig",
    "as_embeddings",
    "assign",
    "balanced_sample",
    "build_index",
    "connected_components",
    "curate_arrays",
    "decontaminate",
    "hierarchical_kmeans",
    "index_kind",
    "kmeans",
    "kmeans_plus_plus",
    "kmeans_with_config",
    "graph_recall",
    "knn_edges",
    "knn_graph",
    "measure_recall",
    "resampled_kmeans",
    "retrieve_by_cluster",
    "retrieve_nearest",
    "search",
    "self_dedup",
    "union_find_components",
    "water_fill",
]
