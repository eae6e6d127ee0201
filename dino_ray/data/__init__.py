"""Image data for SSL, pure Python (no Ray): import the submodule you need.

- ``sources`` (+ ``source_config``, ``archives``): SourceConfig; listing folders / ImageFolder trees / tar /
  parquet / manifests as image refs, and ``read_image_bytes`` for any ref's URI (a file, tar member or parquet row).
- ``decode``: robust bytes -> RGB uint8 decoding with a fixed skip-reason vocabulary.
- ``masking``: iBOT block masks, per sample, distributed like DINOv2's collate.
- ``multicrop`` (+ ``color``, ``crop_config``): DINOv2 multi-crop views and ``normalize_batch``.
- ``ssl_stream`` (+ ``allocator``): the training stream, the one module here with a Ray Data pipeline (imported
  lazily, inside its functions).

Nothing is re-exported here so that Ray Data workers which only read and decode never import torch.
"""
