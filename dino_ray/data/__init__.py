"""Image data for SSL, pure Python (no Ray): import the submodule you need.

- ``sources``: SourceConfig, listing folders / ImageFolder trees / tar / parquet / manifests, row readers.
- ``decode``: robust bytes -> RGB uint8 decoding with a fixed skip-reason vocabulary and SkipReport.
- ``masking``: iBOT block masks, per sample, distributed like DINOv2's collate.
- ``multicrop`` (+ ``color``): DINOv2 multi-crop views and ``normalize_batch``.
- ``row_batches``, ``allocator``: helpers for the Ray Data path in ``dino_ray.ray_data``.

Nothing is re-exported here so that Ray Data workers which only read and decode never import torch.
"""
