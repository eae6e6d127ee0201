"""Building blocks of the DINOv2 ViT, one concept per module."""

from dino_ray.models.layers.attention import Attention
from dino_ray.models.layers.block import Block, build_ffn
from dino_ray.models.layers.drop_path import kept_samples, subset_residual
from dino_ray.models.layers.layer_scale import LayerScale
from dino_ray.models.layers.mlp import Mlp
from dino_ray.models.layers.packing import TokenGroups
from dino_ray.models.layers.patch_embed import PatchEmbed
from dino_ray.models.layers.swiglu import SwiGLUFFN, swiglu_hidden_dim

__all__ = [
    "Attention", "Block", "LayerScale", "Mlp", "PatchEmbed", "SwiGLUFFN", "TokenGroups",
    "build_ffn", "kept_samples", "subset_residual", "swiglu_hidden_dim",
]
