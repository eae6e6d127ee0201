"""Embedding-space data curation (DINOv2 LVD-142M recipe + Vo et al. 2024 balancing).

Pure numpy/faiss on L2-normalised float32 embeddings; no Ray and no I/O. faiss uses the thread
count its caller set (`faiss.omp_set_num_threads`); nothing here changes global state.

Import from the submodules (``config``, ``index``, ``knn_graph``, ``dedup``, ``kmeans``, ``sampling``,
``retrieval``, ``plan``): this package imports nothing, so ``dino_ray.curation.config`` needs no faiss.
"""
