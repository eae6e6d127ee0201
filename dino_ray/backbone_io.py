"""Exported backbones: a plain state dict in the official DINOv2 key layout plus a small JSON.

``<dir>/backbone.pth`` loads with ``strict=True`` into :class:`~dino_ray.models.DinoVisionTransformer`
(and into the official code), so it is world-size independent and tool independent. ``<dir>/backbone.json``
records the architecture so that :func:`load_backbone` can rebuild the module without a config.
Official DINOv2 ``.pth`` files load too, given the arch (``load_backbone(uri, arch=..., **kwargs)``).
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import torch

from dino_ray import storage

WEIGHTS = "backbone.pth"
META = "backbone.json"


def save_backbone(model: torch.nn.Module, out_dir: str, extra: dict[str, Any] | None = None) -> str:
    """Write ``backbone.pth`` + ``backbone.json`` under ``out_dir`` (local or s3); returns the dir."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save_state_dict(state, dataclasses.asdict(model.config), out_dir, extra)


def save_state_dict(state: dict[str, torch.Tensor], vit_config: dict[str, Any], out_dir: str,
                    extra: dict[str, Any] | None = None) -> str:
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(storage.join(out_dir, WEIGHTS), buf.getvalue())
    storage.write_json(storage.join(out_dir, META), {"format": "dino_ray.backbone/1", "vit": vit_config,
                                                     **(extra or {})})
    return out_dir


def weights_info(uri: str):
    """The ``pyarrow.fs.FileInfo`` of the exported weights under ``uri``, or None when there are none."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(storage.join(uri, WEIGHTS))
    info = fs.get_file_info(path)
    return info if info.type == pafs.FileType.File else None


def weights_key(uri: str) -> str:
    """A short fingerprint of the exported weights at ``uri`` (path, size, mtime), so caches of what a
    backbone computed are dropped when the file is replaced."""
    import hashlib

    info = weights_info(uri)
    if info is None:
        raise FileNotFoundError(f"no backbone weights at {uri}")
    return hashlib.sha256(f"{uri}|{info.size}|{info.mtime_ns}".encode()).hexdigest()[:12]


def read_meta(uri: str) -> dict[str, Any]:
    return storage.read_json(storage.join(uri, META))


def load_backbone(uri: str, arch: str | None = None, map_location: str = "cpu", **overrides: Any):
    """Rebuild a backbone from an exported dir, or from a bare ``.pth`` given ``arch`` (+ overrides)."""
    from dino_ray.models import DinoVisionTransformer, ViTConfig, build_backbone

    if uri.endswith((".pth", ".pt")):
        if arch is None:
            meta_uri = storage.join(os.path.dirname(uri) if not storage.is_remote(uri) else uri.rsplit("/", 1)[0], META)
            if not storage.exists(meta_uri):
                raise ValueError(f"{uri}: a bare checkpoint needs the arch name (no {META} beside it)")
            model = DinoVisionTransformer(ViTConfig(**{**storage.read_json(meta_uri)["vit"], **overrides}))
        else:
            model = build_backbone(arch, **overrides)
        weights_uri = uri
    else:
        if not storage.exists(storage.join(uri, META)):
            raise FileNotFoundError(f"no exported backbone at {uri} (expected {WEIGHTS} and {META})")
        model = DinoVisionTransformer(ViTConfig(**{**read_meta(uri)["vit"], **overrides}))
        weights_uri = storage.join(uri, WEIGHTS)
    state = torch.load(io.BytesIO(storage.read_bytes(weights_uri)), map_location=map_location, weights_only=True)
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        from dino_ray.models import interpolate_pos_embed_state_dict

        state = interpolate_pos_embed_state_dict(state, model.config.img_size, model.config.patch_size)
    model.load_state_dict(state, strict=True)
    return model


def describe(uri: str) -> str:
    """The exported ViT's shape as a short JSON string (a registry tag, readable in the MLflow UI)."""
    import json

    vit = read_meta(uri)["vit"]
    return json.dumps({k: vit[k] for k in ("embed_dim", "depth", "num_heads", "patch_size", "img_size")})
