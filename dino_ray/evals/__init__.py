"""Frozen-feature evaluation core: feature extraction, kNN, the linear-probe grid, retrieval,
patch-PCA pictures and reports. Pure torch/numpy; the eval stage adds Ray Data caching and Tune.

Import from the submodules (``features``, ``knn``, ``linear``, ``retrieval``, ``pca``, ``report``,
``baselines``, ``config``): this package imports nothing, so ``dino_ray.evals.config``, which the job
config imports, stays free of torch.
"""
