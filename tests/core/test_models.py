"""DINOv2 ViT backbone: checkpoint layout, shapes, packing, stochastic depth, pos-embed, HF interop."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from dino_ray.models import ARCHS, build_backbone, interpolate_pos_embed_state_dict
from dino_ray.models.layers import TokenGroups, kept_samples, subset_residual


PATCH = 8


def tiny(**overrides) -> nn.Module:
    opts = {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": PATCH}
    return build_backbone("vit_tiny", **{**opts, **overrides})


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights everywhere (LayerScale 1e-5 and a zero mask token would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def expected_keys(depth: int, dim: int, grid: int, registers: int, patch: int, hidden: int,
                  swiglu: bool) -> dict[str, tuple[int, ...]]:
    """The released DINOv2 checkpoint layout, written out from the published key list."""
    keys = {
        "cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim), "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,), "norm.bias": (dim,),
    }
    if registers:
        keys["register_tokens"] = (1, registers, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({
            b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
            b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
            b + "ls1.gamma": (dim,), b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
            b + "ls2.gamma": (dim,),
        })
        if swiglu:
            keys.update({b + "mlp.w12.weight": (2 * hidden, dim), b + "mlp.w12.bias": (2 * hidden,),
                         b + "mlp.w3.weight": (dim, hidden), b + "mlp.w3.bias": (dim,)})
        else:
            keys.update({b + "mlp.fc1.weight": (hidden, dim), b + "mlp.fc1.bias": (hidden,),
                         b + "mlp.fc2.weight": (dim, hidden), b + "mlp.fc2.bias": (dim,)})
    return keys


def test_vit_small_with_registers_matches_released_layout_and_loads_strict():
    expected = expected_keys(depth=12, dim=384, grid=37, registers=4, patch=14, hidden=1536, swiglu=False)
    model = build_backbone("vit_small", img_size=518, num_register_tokens=4)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    gen = torch.Generator().manual_seed(1)
    checkpoint = {k: torch.randn(shape, generator=gen) for k, shape in expected.items()}
    model.load_state_dict(checkpoint, strict=True)
    assert torch.equal(model.blocks[11].ls2.gamma, checkpoint["blocks.11.ls2.gamma"])


def test_giant2_swiglu_shapes_match_checkpoint():
    with torch.device("meta"):
        model = build_backbone("vit_giant2", img_size=518)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_keys(depth=40, dim=1536, grid=37, registers=0, patch=14, hidden=4096, swiglu=True)
    assert got["blocks.0.mlp.w12.weight"] == (8192, 1536) and got["blocks.0.mlp.w3.weight"] == (1536, 4096)


@pytest.mark.parametrize("arch,dim,depth,heads,params_m", [
    ("vit_tiny", 192, 12, 3, 5.5), ("vit_small", 384, 12, 6, 21.6), ("vit_base", 768, 12, 12, 85.7),
    ("vit_large", 1024, 24, 16, 303.2), ("vit_giant2", 1536, 40, 24, 1134.8),
])
def test_arch_constructors(arch, dim, depth, heads, params_m):
    with torch.device("meta"):
        model = build_backbone(arch)
        shallow = build_backbone(arch, depth=2)
        outs = shallow.forward_features([torch.empty(2, 3, 224, 224), torch.empty(3, 3, 98, 98)])
    cfg = model.config
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (dim, depth, heads, 14)
    assert model.embed_dim == dim and len(model.blocks) == depth
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.05)
    assert tuple(outs[0]["x_norm_patchtokens"].shape) == (2, 256, dim)
    assert tuple(outs[1]["x_norm_clstoken"].shape) == (3, dim)
    assert tuple(outs[1]["x_prenorm"].shape) == (3, 50, dim)


def test_overrides_and_unknown_arch():
    assert sorted(ARCHS) == ["vit_base", "vit_giant2", "vit_large", "vit_small", "vit_tiny"]
    model = build_backbone("vit_small", depth=3, embed_dim=96, num_heads=3, img_size=28)
    assert len(model.blocks) == 3 and model.pos_embed.shape == (1, 5, 96)
    with pytest.raises(ValueError, match=r"'vit_huge'.*vit_base.*vit_giant2.*vit_large.*vit_small.*vit_tiny"):
        build_backbone("vit_huge")
    with pytest.raises(TypeError):
        build_backbone("vit_small", not_an_option=1)
    with pytest.raises(ValueError, match="ffn_layer"):
        build_backbone("vit_small", ffn_layer="moe")
    with pytest.raises(ValueError, match="divisible"):
        build_backbone("vit_small", num_heads=5)


def test_forward_features_outputs_and_bad_inputs():
    model = randomise(tiny(num_register_tokens=3)).eval()
    x = torch.randn(2, 3, 32, 48)  # non-square: 4 x 6 patches
    out = model.forward_features(x)
    assert tuple(out["x_norm_clstoken"].shape) == (2, 64)
    assert tuple(out["x_norm_regtokens"].shape) == (2, 3, 64)
    assert tuple(out["x_norm_patchtokens"].shape) == (2, 24, 64)
    assert tuple(out["x_prenorm"].shape) == (2, 1 + 3 + 24, 64)
    assert out["masks"] is None
    torch.testing.assert_close(model(x), out["x_norm_clstoken"])
    torch.testing.assert_close(model.norm(out["x_prenorm"])[:, 0], out["x_norm_clstoken"])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.forward_features(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="masks must be a bool tensor"):
        model.forward_features(x, torch.zeros(2, 23, dtype=torch.bool))
    with pytest.raises(ValueError, match="list of 2"):
        model.forward_features([x, x], torch.zeros(2, 24, dtype=torch.bool))


def test_masks_replace_patch_tokens_before_pos_embed():
    model = randomise(tiny(num_register_tokens=2)).eval()
    x = torch.randn(3, 3, 32, 32)
    masks = torch.zeros(3, 16, dtype=torch.bool)
    masks[0, [1, 5, 6]] = True
    tokens = model.prepare_tokens(x, masks)
    clean = model.prepare_tokens(x)
    pos = model.pos_embed[0, 1:]
    patches = tokens[:, 3:]
    torch.testing.assert_close(patches[0, [1, 5, 6]], model.mask_token + pos[[1, 5, 6]])
    torch.testing.assert_close(patches[~masks], clean[:, 3:][~masks])
    # Fully masked images carry no trace of their pixels.
    full = torch.ones(2, 16, dtype=torch.bool)
    out = model.forward_features(torch.randn(2, 3, 32, 32), full)
    torch.testing.assert_close(out["x_prenorm"][0], out["x_prenorm"][1])
    assert out["masks"] is full


def test_packed_list_equals_separate_calls():
    model = randomise(tiny(num_register_tokens=1)).eval()
    big, small = torch.randn(3, 3, 32, 32), torch.randn(5, 3, 16, 24)
    masks = torch.rand(3, 16) < 0.4
    packed = model.forward_features([big, small], [masks, None])
    separate = [model.forward_features(big, masks), model.forward_features(small)]
    assert isinstance(packed, list) and len(packed) == 2
    for p, s in zip(packed, separate):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(p[key], s[key], rtol=1e-5, atol=1e-5)
    assert packed[0]["masks"] is masks and packed[1]["masks"] is None
    cls_list = model([big, small])
    torch.testing.assert_close(cls_list[1], separate[1]["x_norm_clstoken"], rtol=1e-5, atol=1e-5)


def test_subset_residual_is_unbiased_and_skips_dropped_samples():
    torch.manual_seed(0)
    groups = TokenGroups(((10, 3), (5, 4)))
    x = torch.randn(groups.total_rows, 8)
    weight = torch.randn(8, 8)
    seen = []

    def branch(t: torch.Tensor, g: TokenGroups) -> torch.Tensor:
        seen.append((t.shape[0], g.shapes))
        return torch.tanh(t @ weight)  # per-token nonlinear branch

    rate = 0.3
    assert (kept_samples(10, rate), kept_samples(5, rate)) == (7, 3)
    full = torch.tanh(x @ weight)
    draws = torch.stack([subset_residual(x, groups, branch, rate) for _ in range(500)])
    # Only the kept samples were computed.
    assert all(rows == 7 * 3 + 3 * 4 and shapes == ((7, 3), (3, 4)) for rows, shapes in seen)
    # Each draw: a sample is either untouched or updated with weight batch / kept.
    one = draws[0]
    samples = [(list(range(i * 3, i * 3 + 3)), 10 / 7) for i in range(10)] + \
              [(list(range(30 + i * 4, 30 + i * 4 + 4)), 5 / 3) for i in range(5)]
    n_updated = [0, 0]
    for k, (rows, scale) in enumerate(samples):
        untouched = torch.allclose(one[rows], x[rows])
        updated = torch.allclose(one[rows], x[rows] + scale * full[rows], atol=1e-6)
        assert untouched != updated
        n_updated[k >= 10] += updated
    assert n_updated == [7, 3]
    # Unbiased: the mean over draws converges to the deterministic residual (seeded; ~2.5 sigma).
    err = (draws.mean(0) - (x + full)).norm() / full.norm()
    assert err < 0.08, err


def test_stochastic_depth_train_vs_eval():
    model = randomise(tiny(drop_path_rate=0.5, depth=3))
    x = torch.randn(4, 3, 32, 32)
    reference = randomise(tiny(drop_path_rate=0.0, depth=3)).eval()
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)  # different subsets per call
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    torch.testing.assert_close(model(x), reference(x))
    ramp = tiny(drop_path_rate=0.4, depth=3, drop_path_uniform=False)
    assert [blk.drop_path for blk in ramp.blocks] == pytest.approx([0.0, 0.2, 0.4])


def test_stochastic_depth_gradients_flow_through_packed_path():
    model = randomise(tiny(drop_path_rate=0.4)).train()
    outs = model.forward_features([torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)])
    loss = sum(o["x_norm_clstoken"].square().sum() for o in outs)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for n, g in grads.items() if n != "mask_token")
    assert grads["blocks.1.mlp.fc2.weight"].abs().sum() > 0


def test_bf16_autocast_keeps_residual_stream_fp32():
    model = randomise(tiny(num_register_tokens=2, drop_path_rate=0.2)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = model([torch.randn(2, 3, 32, 32), torch.randn(4, 3, 16, 16)], is_training=True)
    assert outs[0]["x_prenorm"].dtype == torch.float32
    outs[1]["x_norm_clstoken"].float().square().sum().backward()
    assert model.cls_token.grad is not None and torch.isfinite(model.cls_token.grad).all()


def test_pos_embed_interpolation_state_dict():
    src = randomise(tiny())
    sd = src.state_dict()
    same = interpolate_pos_embed_state_dict(sd, 32, PATCH)
    torch.testing.assert_close(same["pos_embed"], sd["pos_embed"])
    bigger = interpolate_pos_embed_state_dict(sd, 56, PATCH)
    assert bigger["pos_embed"].shape == (1, 1 + 7 * 7, 64)
    torch.testing.assert_close(bigger["pos_embed"][:, 0], sd["pos_embed"][:, 0])
    assert bigger["blocks.0.attn.qkv.weight"] is sd["blocks.0.attn.qkv.weight"]
    dst = tiny(img_size=56)
    dst.load_state_dict(bigger, strict=True)
    # A smooth embedding stays smooth: upsampling a constant grid gives the same constant.
    const = dict(sd, pos_embed=torch.full_like(sd["pos_embed"], 0.3))
    torch.testing.assert_close(interpolate_pos_embed_state_dict(const, 56, PATCH)["pos_embed"],
                               torch.full((1, 50, 64), 0.3))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        interpolate_pos_embed_state_dict(sd, 50, PATCH)
    with pytest.raises(KeyError, match="pos_embed"):
        interpolate_pos_embed_state_dict({"cls_token": sd["cls_token"]}, 56, PATCH)


def test_pos_embed_resized_at_other_input_sizes():
    model = randomise(tiny()).eval()
    assert model.pos_embed_for(4, 4) is model.pos_embed
    assert model.pos_embed_for(3, 5).shape == (1, 16, 64)
    # With offset 0 the model's on-the-fly resize equals the checkpoint helper's.
    exact = randomise(tiny(interpolate_offset=0.0)).eval()
    resized = interpolate_pos_embed_state_dict(exact.state_dict(), 48, PATCH)["pos_embed"]
    torch.testing.assert_close(exact.pos_embed_for(6, 6), resized)


def test_get_intermediate_layers():
    model = randomise(tiny(depth=3, num_register_tokens=2)).eval()
    x = torch.randn(2, 3, 32, 40)
    last_two = model.get_intermediate_layers(x, n=2)
    assert len(last_two) == 2 and all(tuple(t.shape) == (2, 20, 64) for t in last_two)
    feats = model.forward_features(x)
    torch.testing.assert_close(last_two[-1], feats["x_norm_patchtokens"])
    raw = model.get_intermediate_layers(x, n=1, norm=False)[0]
    torch.testing.assert_close(raw, feats["x_prenorm"][:, 3:])
    maps = model.get_intermediate_layers(x, n=[0, 2], reshape=True, return_class_token=True)
    assert len(maps) == 2
    (m0, c0), (m2, c2) = maps
    assert tuple(m0.shape) == (2, 64, 4, 5) and tuple(c0.shape) == (2, 64)
    torch.testing.assert_close(m2.flatten(2).transpose(1, 2), feats["x_norm_patchtokens"])
    torch.testing.assert_close(c2, feats["x_norm_clstoken"])
    with pytest.raises(ValueError, match="n=4"):
        model.get_intermediate_layers(x, n=4)
    with pytest.raises(ValueError, match="block indices"):
        model.get_intermediate_layers(x, n=[0, 3])


@contextlib.contextmanager
def zero3_like_partitioning(model: nn.Module) -> Iterator[None]:
    """Mimic DeepSpeed ZeRO-3: each module's own parameters hold data only during its forward."""
    stash = {p: p.data for p in model.parameters()}
    empty = torch.empty(0)
    for p in stash:
        p.data = empty

    def gather(module, args):
        for p in module.parameters(recurse=False):
            p.data = stash[p]

    def release(module, args, output):
        for p in module.parameters(recurse=False):
            p.data = empty

    handles = [h for m in model.modules()
               for h in (m.register_forward_pre_hook(gather), m.register_forward_hook(release))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for p, data in stash.items():
            p.data = data


@pytest.mark.parametrize("train", [False, True])
def test_parameters_only_read_inside_owning_forward(train):
    model = randomise(tiny(num_register_tokens=2, drop_path_rate=0.3, ffn_layer="swiglu")).train(train)
    inputs = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 16)]
    masks = [torch.rand(2, 16) < 0.5, None]
    with torch.no_grad():
        torch.manual_seed(3)
        expected = model(inputs, masks, is_training=True)
        torch.manual_seed(3)
        with zero3_like_partitioning(model):
            got = model(inputs, masks, is_training=True)
            with pytest.raises(RuntimeError):  # the emulation does catch reads outside a forward
                model.blocks[0].attn.qkv.weight.view(64, 3, 64)
    for e, g in zip(expected, got):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(g[key], e[key])


def test_hf_conversion_without_layerscale_or_biases():
    from dino_ray.models.hf import from_hf_state_dict, to_hf_state_dict

    model = randomise(tiny(layerscale_init=None, proj_bias=False, ffn_bias=False, qkv_bias=False)).eval()
    sd = model.state_dict()
    assert not any("ls1" in k or k.endswith("attn.proj.bias") or k.endswith("qkv.bias") for k in sd)
    hf = to_hf_state_dict(sd)
    torch.testing.assert_close(hf["encoder.layer.1.layer_scale2.lambda1"], torch.ones(64))
    torch.testing.assert_close(hf["encoder.layer.0.attention.o_proj.bias"], torch.zeros(64))
    torch.testing.assert_close(hf["encoder.layer.0.mlp.fc1.bias"], torch.zeros(4 * 64))
    assert "encoder.layer.0.attention.q_proj.bias" not in hf
    back = from_hf_state_dict(hf)
    assert set(back) - set(sd) == {f"blocks.{i}.{n}" for i in range(2) for n in (
        "ls1.gamma", "ls2.gamma", "attn.proj.bias", "mlp.fc1.bias", "mlp.fc2.bias")}
    with_ls = tiny(layerscale_init=1.0, proj_bias=True, ffn_bias=True, qkv_bias=False).eval()
    with_ls.load_state_dict(back, strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(with_ls(x), model(x))


def test_hf_parity_and_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    from dino_ray.models.hf import export_to_hf, from_hf_state_dict, to_hf_state_dict

    cases = [(0, "mlp", transformers.Dinov2Model), (4, "swiglu", transformers.Dinov2WithRegistersModel)]
    for registers, ffn, hf_cls in cases:
        opts = dict(embed_dim=96, depth=2, num_heads=3, img_size=56, patch_size=14,
                    num_register_tokens=registers, ffn_layer=ffn)
        ours = randomise(build_backbone("vit_tiny", **opts), seed=registers).eval()
        out_dir = str(tmp_path / f"hf_{registers}")
        export_to_hf(ours, out_dir)
        hf = hf_cls.from_pretrained(out_dir).eval()
        x = torch.randn(2, 3, 56, 56)
        with torch.no_grad():
            feats = ours.forward_features(x)
            hidden = hf(pixel_values=x).last_hidden_state
        torch.testing.assert_close(hidden[:, 0], feats["x_norm_clstoken"], rtol=0, atol=1e-4)
        torch.testing.assert_close(hidden[:, 1 + registers:], feats["x_norm_patchtokens"], rtol=0, atol=1e-4)
        back = build_backbone("vit_tiny", **opts)
        back.load_state_dict(from_hf_state_dict(hf.state_dict()), strict=True)
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)
        # The on-disk (hub) layout converts both ways too.
        from safetensors.torch import load_file
        disk = load_file(f"{out_dir}/model.safetensors")
        hub = to_hf_state_dict(ours.state_dict(), registers, hub_layout=True)
        assert set(hub) == set(disk)
        back.load_state_dict(from_hf_state_dict(disk), strict=True)
    with pytest.raises(ValueError, match="num_register_tokens"):
        to_hf_state_dict(ours.state_dict(), 0)
