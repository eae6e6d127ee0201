"""DINOv2 ViT backbones, their projection heads, and the architecture registry.

``build_backbone("vit_small", img_size=224, drop_path_rate=0.1)`` is the entry point other stages use;
every constructor takes the :class:`ViTConfig` fields as keyword overrides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dino_ray.models.heads import DINOHead, WeightNormLinear
from dino_ray.models.vit import DinoVisionTransformer, ViTConfig, interpolate_pos_embed_state_dict


def _make(defaults: dict[str, Any], overrides: dict[str, Any]) -> DinoVisionTransformer:
    return DinoVisionTransformer(ViTConfig(**{**defaults, **overrides}))


def vit_tiny(**overrides: Any) -> DinoVisionTransformer:
    """DeiT-Ti sized (192 wide, 12 blocks, 3 heads); meant for tests and smoke runs."""
    return _make({"embed_dim": 192, "depth": 12, "num_heads": 3}, overrides)


def vit_small(**overrides: Any) -> DinoVisionTransformer:
    """ViT-S/14: 384 wide, 12 blocks, 6 heads (21M parameters)."""
    return _make({"embed_dim": 384, "depth": 12, "num_heads": 6}, overrides)


def vit_base(**overrides: Any) -> DinoVisionTransformer:
    """ViT-B/14: 768 wide, 12 blocks (the code's depth; the paper's table says 18), 12 heads."""
    return _make({"embed_dim": 768, "depth": 12, "num_heads": 12}, overrides)


def vit_large(**overrides: Any) -> DinoVisionTransformer:
    """ViT-L/14: 1024 wide, 24 blocks, 16 heads (300M parameters)."""
    return _make({"embed_dim": 1024, "depth": 24, "num_heads": 16}, overrides)


def vit_giant2(**overrides: Any) -> DinoVisionTransformer:
    """ViT-g/14 as DINOv2 redefined it: 1536 wide, 40 blocks, 24 heads of 64, SwiGLU FFN (hidden 4096)."""
    return _make({"embed_dim": 1536, "depth": 40, "num_heads": 24, "ffn_layer": "swiglu"}, overrides)


ARCHS: dict[str, Callable[..., DinoVisionTransformer]] = {
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "vit_base": vit_base,
    "vit_large": vit_large,
    "vit_giant2": vit_giant2,
}


def build_backbone(arch: str, **overrides: Any) -> DinoVisionTransformer:
    """Construct a registered architecture, with :class:`ViTConfig` fields as overrides."""
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone arch {arch!r}; valid archs: {', '.join(sorted(ARCHS))}")
    return ARCHS[arch](**overrides)


__all__ = [
    "ARCHS", "DINOHead", "DinoVisionTransformer", "ViTConfig", "WeightNormLinear", "build_backbone",
    "interpolate_pos_embed_state_dict", "vit_base", "vit_giant2", "vit_large", "vit_small", "vit_tiny",
]
