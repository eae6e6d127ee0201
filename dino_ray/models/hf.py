"""Conversion between our (official DINOv2) weights and Hugging Face ``transformers`` DINOv2 models.

Two HF key layouts exist and both are handled:
- the *hub* layout, stored in every published ``facebook/dinov2-*`` checkpoint and used by the modules
  of transformers 4.x (``attention.attention.query``, ``attention.output.dense``, ``mlp.weights_in``);
- the *module* layout of transformers >= 5 (``attention.q_proj`` ... ``mlp.gate_proj``), which that
  version converts to and from the hub layout inside ``from_pretrained`` / ``save_pretrained``.

``transformers`` is imported lazily so the backbone never depends on it.

Resolution caveat: HF resizes position embeddings with an explicit output size (antialiased for the
register model), while DINOv2's non-register models use the ``interpolate_offset`` kludge. Outputs
agree exactly at the model's ``img_size``; at other sizes only with ``interpolate_offset=0`` and the
matching ``interpolate_antialias``.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dino_ray import storage
from dino_ray.models.vit import DinoVisionTransformer

_TOP_LEVEL = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
# Per-block keys whose tensors are renamed without reshaping: ours -> (module layout, hub layout).
_BLOCK_RENAMES = {
    "norm1.weight": ("norm1.weight", "norm1.weight"),
    "norm1.bias": ("norm1.bias", "norm1.bias"),
    "norm2.weight": ("norm2.weight", "norm2.weight"),
    "norm2.bias": ("norm2.bias", "norm2.bias"),
    "attn.proj.weight": ("attention.o_proj.weight", "attention.output.dense.weight"),
    "attn.proj.bias": ("attention.o_proj.bias", "attention.output.dense.bias"),
    "ls1.gamma": ("layer_scale1.lambda1", "layer_scale1.lambda1"),
    "ls2.gamma": ("layer_scale2.lambda1", "layer_scale2.lambda1"),
    "mlp.fc1.weight": ("mlp.fc1.weight", "mlp.fc1.weight"),
    "mlp.fc1.bias": ("mlp.fc1.bias", "mlp.fc1.bias"),
    "mlp.fc2.weight": ("mlp.fc2.weight", "mlp.fc2.weight"),
    "mlp.fc2.bias": ("mlp.fc2.bias", "mlp.fc2.bias"),
    "mlp.w3.weight": ("mlp.down_proj.weight", "mlp.weights_out.weight"),
    "mlp.w3.bias": ("mlp.down_proj.bias", "mlp.weights_out.bias"),
}
_QKV_NAMES = (("attention.q_proj", "attention.k_proj", "attention.v_proj"),
              ("attention.attention.query", "attention.attention.key", "attention.attention.value"))
_SWIGLU_IN = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.weights_in",))
_HF_PREFIXES = ("dinov2_with_registers.", "dinov2.")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _num_blocks(keys: list[str], pattern: str) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if ids != set(range(len(ids))):
        raise ValueError(f"block indices are not contiguous from 0: {sorted(ids)}")
    return len(ids)


def _block_to_hf(sd: Mapping[str, Tensor], i: int, hub_layout: bool) -> dict[str, Tensor]:
    src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
    col = 1 if hub_layout else 0
    dim = sd[src + "norm1.weight"].shape[0]
    out: dict[str, Tensor] = {}
    for ours, names in _BLOCK_RENAMES.items():
        if src + ours in sd:
            out[dst + names[col]] = sd[src + ours]
    for gamma, lam in (("ls1.gamma", "layer_scale1.lambda1"), ("ls2.gamma", "layer_scale2.lambda1")):
        if src + gamma not in sd:  # LayerScale disabled: HF always scales, so scale by one
            out[dst + lam] = torch.ones(dim, dtype=sd[src + "norm1.weight"].dtype)
    for suffix in ("weight", "bias"):
        qkv = sd.get(f"{src}attn.qkv.{suffix}")
        if qkv is not None:
            for name, part in zip(_QKV_NAMES[col], qkv.chunk(3, dim=0)):
                out[f"{dst}{name}.{suffix}"] = part.clone()
        w12 = sd.get(f"{src}mlp.w12.{suffix}")
        if w12 is not None:
            parts = w12.chunk(2, dim=0) if not hub_layout else (w12,)
            for name, part in zip(_SWIGLU_IN[col], parts):
                out[f"{dst}{name}.{suffix}"] = part.clone()
    _fill_missing_biases(out, dst, sd[src + "norm1.weight"])
    return out


def _fill_missing_biases(out: dict[str, Tensor], prefix: str, like: Tensor) -> None:
    """HF always has output-projection and FFN biases; a bias-free layer equals a zero bias."""
    weights = [k for k in out if k.startswith(prefix) and k.endswith(".weight")
               and ("o_proj" in k or "output.dense" in k or ".mlp." in k)]
    for w in weights:
        b = w[: -len("weight")] + "bias"
        if b not in out:
            out[b] = torch.zeros(out[w].shape[0], dtype=like.dtype)


def to_hf_state_dict(sd: Mapping[str, Tensor], num_register_tokens: int = 0, *,
                     hub_layout: bool = False) -> dict[str, Tensor]:
    """Our state dict -> a ``Dinov2Model`` (R = 0) or ``Dinov2WithRegistersModel`` (R > 0) state dict.

    ``hub_layout=False`` gives the module layout of the installed transformers >= 5 (loadable with
    ``load_state_dict(strict=True)``); ``True`` gives the layout of published HF checkpoints."""
    has_registers = "register_tokens" in sd
    if has_registers != (num_register_tokens > 0) or (
            has_registers and sd["register_tokens"].shape[1] != num_register_tokens):
        found = sd["register_tokens"].shape[1] if has_registers else 0
        raise ValueError(f"num_register_tokens={num_register_tokens} but the state dict holds {found}")
    unknown = [k for k in sd if k not in _TOP_LEVEL and not _BLOCK_KEY.match(k)]
    if unknown:
        raise KeyError(f"keys not in the DINOv2 backbone layout: {unknown[:8]}")
    out = {hf: sd[ours] for ours, hf in _TOP_LEVEL.items() if ours in sd}
    for i in range(_num_blocks(list(sd), r"^blocks\.(\d+)\.")):
        out.update(_block_to_hf(sd, i, hub_layout))
    return out


def _strip_hf_prefix(hf_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _HF_PREFIXES:
        if any(k.startswith(prefix) for k in hf_sd):
            return {k[len(prefix):]: v for k, v in hf_sd.items() if k.startswith(prefix)}
    return dict(hf_sd)


def _block_from_hf(hf_sd: Mapping[str, Tensor], i: int) -> dict[str, Tensor]:
    src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
    hub = f"{src}attention.attention.query.weight" in hf_sd
    col = 1 if hub else 0
    out = {dst + ours: hf_sd[src + names[col]]
           for ours, names in _BLOCK_RENAMES.items() if src + names[col] in hf_sd}
    for suffix in ("weight", "bias"):
        q_k_v = [hf_sd.get(f"{src}{name}.{suffix}") for name in _QKV_NAMES[col]]
        if all(t is not None for t in q_k_v):
            out[f"{dst}attn.qkv.{suffix}"] = torch.cat(q_k_v, dim=0)
        swiglu = [hf_sd.get(f"{src}{name}.{suffix}") for name in _SWIGLU_IN[col]]
        if all(t is not None for t in swiglu):
            out[f"{dst}mlp.w12.{suffix}"] = torch.cat(swiglu, dim=0)
    if f"{dst}attn.qkv.weight" not in out:
        raise KeyError(f"no attention weights found for layer {i} (looked for {_QKV_NAMES[col][0]})")
    return out


def from_hf_state_dict(hf_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An HF DINOv2 state dict (hub or module layout, with or without the ``dinov2.`` prefix of the
    task models) -> our layout, loadable strictly into a matching :class:`DinoVisionTransformer`."""
    hf = _strip_hf_prefix(hf_sd)
    reverse = {v: k for k, v in _TOP_LEVEL.items()}
    missing = [k for k in ("embeddings.cls_token", "embeddings.position_embeddings", "layernorm.weight")
               if k not in hf]
    if missing:
        raise KeyError(f"not a DINOv2 backbone state dict: missing {missing}")
    out = {reverse[k]: v for k, v in hf.items() if k in reverse}
    for i in range(_num_blocks(list(hf), r"^encoder\.layer\.(\d+)\.")):
        out.update(_block_from_hf(hf, i))
    return out


def hf_config(model: DinoVisionTransformer) -> Any:
    """The ``transformers`` config describing the same network (registers select the registers model)."""
    import transformers

    cfg = model.config
    if float(cfg.mlp_ratio) != int(cfg.mlp_ratio):
        raise ValueError(f"transformers' DINOv2 config only takes an integer mlp_ratio, got {cfg.mlp_ratio}")
    common: dict[str, Any] = {
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "mlp_ratio": int(cfg.mlp_ratio),
        "use_swiglu_ffn": cfg.ffn_layer != "mlp",
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "layerscale_value": cfg.layerscale_init if cfg.layerscale_init is not None else 1.0,
        "layer_norm_eps": 1e-6,
        "qkv_bias": cfg.qkv_bias,
        "hidden_act": "gelu",
        "drop_path_rate": 0.0,
    }
    if cfg.num_register_tokens:
        return transformers.Dinov2WithRegistersConfig(num_register_tokens=cfg.num_register_tokens, **common)
    return transformers.Dinov2Config(**common)


def to_hf_model(model: DinoVisionTransformer) -> Any:
    """A ``transformers`` model holding a copy of ``model``'s weights (loaded strictly)."""
    import transformers

    config = hf_config(model)
    model_cls = (transformers.Dinov2WithRegistersModel if model.config.num_register_tokens
                 else transformers.Dinov2Model)
    hf_model = model_cls(config)
    hub = "encoder.layer.0.attention.attention.query.weight" in hf_model.state_dict()
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    hf_model.load_state_dict(to_hf_state_dict(sd, model.config.num_register_tokens, hub_layout=hub),
                             strict=True)
    return hf_model.eval()


def export_to_hf(model: DinoVisionTransformer, out_dir: str) -> str:
    """Save ``model`` as a ``transformers`` checkpoint (config + safetensors) to a local or s3:// dir.

    The result loads offline with ``Dinov2Model.from_pretrained(out_dir)`` (or the registers model)."""
    hf_model = to_hf_model(model)
    if not storage.is_remote(out_dir):
        os.makedirs(out_dir, exist_ok=True)
        hf_model.save_pretrained(out_dir)
        return out_dir
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        storage.upload_dir(tmp, out_dir)
    return out_dir
