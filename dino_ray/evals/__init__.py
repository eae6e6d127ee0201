"""Frozen-feature evaluation core: feature extraction, kNN, the linear-probe grid, retrieval,
patch-PCA pictures and reports. Pure torch/numpy; the eval stage adds Ray Data caching and Tune.

Names are resolved lazily (PEP 562) so that ``dino_ray.evals.config``, which the job config imports,
stays free of torch: importing this package costs nothing until a function is used.
"""

from __future__ import annotations

from dino_ray._lazy import lazy_exports

_EXPORTS = {
    "raw_pixel_features": "baselines",
    "LR_GRID_CODE": "config",
    "LinearGridConfig": "config",
    "extract_features": "features",
    "extract_patch_grid": "features",
    "feature_keys": "features",
    "linear_input": "features",
    "knn_classify": "knn",
    "GridResult": "linear",
    "HeadSpec": "linear",
    "LinearHead": "linear",
    "evaluate_head": "linear",
    "split_train_val": "linear",
    "train_linear_grid": "linear",
    "train_single_head": "linear",
    "patch_pca_rgb": "pca",
    "side_by_side": "pca",
    "to_uint8_images": "pca",
    "comparison_table": "report",
    "html_report": "report",
    "markdown_report": "report",
    "retrieval_metrics": "retrieval",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
