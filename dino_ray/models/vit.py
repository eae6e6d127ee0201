"""The DINOv2 Vision Transformer backbone, with packed multi-resolution input.

State-dict keys and shapes are those of the released DINOv2 checkpoints (``block_chunks=0``), so
official weights load with ``strict=True`` and our checkpoints load into the official code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dino_ray.models.layers import Block, PatchEmbed, TokenGroups
from dino_ray.models.layers.block import FFN_LAYERS

MaskArg = Tensor | None | Sequence[Tensor | None]


@dataclass
class ViTConfig:
    """Architecture of a :class:`DinoVisionTransformer`; defaults are DINOv2's."""

    embed_dim: int  # token width D (384 for ViT-S, 1536 for ViT-g)
    depth: int  # number of transformer blocks
    num_heads: int  # attention heads; DINOv2 keeps 64 channels per head
    img_size: int = 224  # side of the square image the position embedding is sized for (518 for released weights)
    patch_size: int = 14  # pixels per patch side; inputs must be a multiple of it
    in_chans: int = 3  # input image channels
    mlp_ratio: float = 4.0  # FFN hidden width / D (SwiGLU then keeps 2/3 of it, rounded up to 8)
    qkv_bias: bool = True  # bias in the fused q/k/v projection
    ffn_bias: bool = True  # biases in the FFN linears
    proj_bias: bool = True  # bias in the attention output projection
    drop_path_rate: float = 0.0  # stochastic-depth rate (0.3-0.4 for large DINOv2 students, 0 for teachers)
    drop_path_uniform: bool = True  # same rate in every block (DINOv2) instead of a linear 0 -> rate ramp
    layerscale_init: float | None = 1e-5  # LayerScale gamma init; None removes LayerScale
    ffn_layer: str = "mlp"  # "mlp" (GELU MLP) or "swiglu" (ViT-g); "swiglufused" is an alias of "swiglu"
    num_register_tokens: int = 0  # extra learned tokens after CLS that soak up global info (4 in *_reg models)
    interpolate_antialias: bool = False  # antialias when resizing pos-embed (True for *_reg models)
    interpolate_offset: float = 0.1  # DINOv1 scale-factor kludge for pos-embed resizing (0 for *_reg models)

    def __post_init__(self) -> None:
        if self.embed_dim < 1 or self.depth < 1 or self.num_heads < 1:
            raise ValueError(f"embed_dim, depth and num_heads must be >= 1, got "
                             f"{self.embed_dim}, {self.depth}, {self.num_heads}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.ffn_layer not in FFN_LAYERS:
            raise ValueError(f"unknown ffn_layer {self.ffn_layer!r}; expected one of {FFN_LAYERS}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {self.num_register_tokens}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    def block_drop_rates(self) -> list[float]:
        if self.drop_path_uniform:
            return [self.drop_path_rate] * self.depth
        return torch.linspace(0.0, self.drop_path_rate, self.depth).tolist()


def resize_patch_pos_embed(patch_pos: Tensor, rows: int, cols: int, offset: float = 0.0,
                           antialias: bool = False) -> Tensor:
    """Bicubically resize a square grid of patch position embeddings [1, M*M, D] to [1, rows*cols, D].

    Computed in fp32 (bicubic in half precision visibly shifts the embeddings). With ``offset > 0``
    the target is given as scale factors ``(n + offset) / M``, the DINOv1 trick kept by DINOv2 for
    compatibility with its released non-register models; the output size is still exactly rows x cols."""
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"pos_embed holds {n} patch positions, which is not a square grid")
    grid = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset:
        size_or_scale: dict[str, Any] = {"scale_factor": ((rows + offset) / side, (cols + offset) / side)}
    else:
        size_or_scale = {"size": (rows, cols)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, align_corners=False, **size_or_scale)
    if grid.shape[-2:] != (rows, cols):
        raise RuntimeError(f"pos-embed resize produced {tuple(grid.shape[-2:])}, wanted {(rows, cols)}")
    return grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(patch_pos.dtype)


def interpolate_pos_embed_state_dict(state_dict: Mapping[str, Tensor], new_img_size: int, patch_size: int,
                                     key: str = "pos_embed", antialias: bool = False) -> dict[str, Tensor]:
    """A copy of ``state_dict`` whose ``pos_embed`` is bicubically resized for ``new_img_size``.

    Used when a stage changes the training resolution (224 -> 518 for DINOv2's high-res phase): the
    new model is built with the new ``img_size`` and loads the resized checkpoint strictly. The CLS
    position is kept as is; only the patch grid is resampled."""
    if key not in state_dict:
        raise KeyError(f"state dict has no {key!r} entry (keys start with {sorted(state_dict)[:5]})")
    if new_img_size % patch_size:
        raise ValueError(f"new_img_size {new_img_size} is not a multiple of patch_size {patch_size}")
    pos = state_dict[key]
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise ValueError(f"{key!r} must have shape [1, 1+N, D], got {tuple(pos.shape)}")
    side = new_img_size // patch_size
    patch_pos = resize_patch_pos_embed(pos[:, 1:], side, side, antialias=antialias)
    out = dict(state_dict)
    out[key] = torch.cat([pos[:, :1], patch_pos], dim=1)
    return out


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT: patch embedding, [CLS, registers, patches] tokens, pre-norm blocks, final norm.

    Build with keyword options (the fields of :class:`ViTConfig`) or a ready ``ViTConfig``.
    ``forward_features`` also accepts a list of image batches of different resolutions: their tokens
    share every token-wise GEMM and attention stays within each image (see ``layers.packing``).

    ZeRO-3: submodule parameters are only touched inside their own modules' forwards; this module
    reads only the parameters it owns (cls_token, pos_embed, register_tokens, mask_token)."""

    def __init__(self, config: ViTConfig | None = None, **options: Any) -> None:
        super().__init__()
        if config is not None and options:
            raise TypeError(f"pass either a ViTConfig or keyword options, not both (got {sorted(options)})")
        cfg = config if config is not None else ViTConfig(**options)
        self.config = cfg
        self.embed_dim = cfg.embed_dim
        self.num_features = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.num_register_tokens = cfg.num_register_tokens
        self.n_blocks = cfg.depth

        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid_size ** 2, d))
        if cfg.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d))
        else:
            self.register_tokens = None
        self.blocks = nn.ModuleList([
            Block(d, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, proj_bias=cfg.proj_bias,
                  ffn_bias=cfg.ffn_bias, drop_path=rate, layerscale_init=cfg.layerscale_init,
                  ffn_layer=cfg.ffn_layer)
            for rate in cfg.block_drop_rates()
        ])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.grad_checkpointing = False
        self.init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of keeping them (training memory
        of one block instead of all, for one more forward). Stochastic depth draws the same subsets in
        the recompute: the checkpoint restores the RNG state."""
        self.grad_checkpointing = bool(enable)

    # ----------------------------------------------------------------------------------- init
    def init_weights(self) -> None:
        """DINOv2 init: trunc-normal(0.02) pos-embed and linears, N(0, 1e-6) CLS/registers, zero mask token."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------------------- embedding
    def pos_embed_for(self, rows: int, cols: int) -> Tensor:
        """Position embedding [1, 1+rows*cols, D] for a rows x cols patch grid."""
        grid = self.config.grid_size
        if rows == cols == grid:
            return self.pos_embed
        patch_pos = resize_patch_pos_embed(self.pos_embed[:, 1:], rows, cols,
                                           offset=self.config.interpolate_offset,
                                           antialias=self.config.interpolate_antialias)
        return torch.cat([self.pos_embed[:, :1], patch_pos], dim=1)

    def prepare_tokens(self, images: Tensor, masks: Tensor | None = None) -> Tensor:
        """[B, C, H, W] -> [B, 1+R+N, D]: patches (masked ones replaced by the mask token), CLS, pos-embed,
        then registers, which get no position embedding."""
        rows, cols = self.patch_embed.grid(images.shape[-2], images.shape[-1])
        tokens = self.patch_embed(images)
        b, n, _ = tokens.shape
        if masks is not None:
            if masks.shape != (b, n) or masks.dtype != torch.bool:
                raise ValueError(f"masks must be a bool tensor of shape {(b, n)}, got "
                                 f"{masks.dtype} {tuple(masks.shape)}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        # Under autocast with fp32 weights, cat promotes the bf16 patches to the fp32 of cls/pos-embed and the
        # residual stream stays fp32. With bf16 weights (DeepSpeed bf16 under ZeRO-3 on GPU, like FSDP's bf16
        # param_dtype in the official code) it is bf16.
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = tokens + self.pos_embed_for(rows, cols)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(b, -1, -1)
            tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
        return tokens

    # ------------------------------------------------------------------------------- forward
    def forward_features(self, x: Tensor | Sequence[Tensor], masks: MaskArg = None
                         ) -> dict[str, Tensor | None] | list[dict[str, Tensor | None]]:
        """Normalised CLS / register / patch tokens and pre-norm tokens.

        ``x`` is one [B, C, H, W] batch (returns a dict) or a list of batches of different sizes
        (returns a list of dicts, computed in one packed pass); ``masks`` is None, a bool [B, N] tensor,
        or a list matching ``x`` whose entries are tensors or None."""
        if isinstance(x, Tensor):
            if masks is not None and not isinstance(masks, Tensor):
                raise ValueError(f"a single image tensor takes a single mask tensor, got {type(masks).__name__}")
            return self._forward_packed([x], [masks])[0]
        images = list(x)
        if not images:
            raise ValueError("forward_features got an empty list of image batches")
        if masks is None:
            mask_list: list[Tensor | None] = [None] * len(images)
        elif isinstance(masks, Tensor) or len(masks) != len(images):
            raise ValueError(f"for a list of {len(images)} image batches, masks must be None or a list of "
                             f"{len(images)} entries, got {type(masks).__name__}")
        else:
            mask_list = list(masks)
        return self._forward_packed(images, mask_list)

    def forward(self, x: Tensor | Sequence[Tensor], masks: MaskArg = None, is_training: bool = False
                ) -> Tensor | list[Tensor] | dict[str, Tensor | None] | list[dict[str, Tensor | None]]:
        """The normalised CLS token(s), the frozen-feature output used by kNN and linear probes; with
        ``is_training=True`` the full ``forward_features`` output instead.

        Training code should call the module (``backbone(crops, masks, is_training=True)``) rather than
        ``forward_features``: under ZeRO-3 only a module call gathers this module's own parameters."""
        out = self.forward_features(x, masks)
        if is_training:
            return out
        if isinstance(out, dict):
            return out["x_norm_clstoken"]
        return [o["x_norm_clstoken"] for o in out]

    def _forward_packed(self, images: list[Tensor], masks: list[Tensor | None]) -> list[dict[str, Tensor | None]]:
        token_groups = [self.prepare_tokens(img, m) for img, m in zip(images, masks)]
        groups = TokenGroups.of(token_groups)
        x = TokenGroups.pack(token_groups)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, groups, use_reentrant=False)
            else:
                x = block(x, groups)
        normed = groups.split(self.norm(x))
        prenorm = groups.split(x)
        r = self.num_register_tokens
        return [
            {
                "x_norm_clstoken": xn[:, 0],
                "x_norm_regtokens": xn[:, 1:1 + r],
                "x_norm_patchtokens": xn[:, 1 + r:],
                "x_prenorm": xp,
                "masks": m,
            }
            for xn, xp, m in zip(normed, prenorm, masks)
        ]

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True
                                ) -> tuple[Tensor, ...] | tuple[tuple[Tensor, Tensor], ...]:
        """Patch tokens (registers dropped) of selected blocks, in block order (oldest first).

        ``n`` is either a count (the last n blocks) or explicit block indices. ``norm`` applies the final
        LayerNorm (as the linear-probe protocol does), ``reshape`` returns [B, D, h, w] maps, and
        ``return_class_token`` pairs each output with that block's CLS token."""
        if not isinstance(x, Tensor):
            raise TypeError(f"get_intermediate_layers takes one image tensor, got {type(x).__name__}")
        wanted = self._block_indices(n)
        rows, cols = self.patch_embed.grid(x.shape[-2], x.shape[-1])
        tokens = self.prepare_tokens(x)
        groups = TokenGroups.of([tokens])
        flat = TokenGroups.pack([tokens])
        outputs = []
        for i, block in enumerate(self.blocks):
            flat = block(flat, groups)
            if i in wanted:
                outputs.append(groups.split(self.norm(flat) if norm else flat)[0])
        r = self.num_register_tokens
        patches = [o[:, 1 + r:] for o in outputs]
        if reshape:
            b = x.shape[0]
            patches = [p.reshape(b, rows, cols, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, [o[:, 0] for o in outputs]))
        return tuple(patches)

    def _block_indices(self, n: int | Sequence[int]) -> set[int]:
        depth = len(self.blocks)
        if isinstance(n, int):
            if not 1 <= n <= depth:
                raise ValueError(f"n={n} blocks requested but the model has {depth}")
            return set(range(depth - n, depth))
        indices = [int(i) for i in n]
        bad = [i for i in indices if not 0 <= i < depth]
        if bad or not indices:
            raise ValueError(f"block indices {indices} must be non-empty and within [0, {depth})")
        return set(indices)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())
