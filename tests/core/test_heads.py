"""DINO/iBOT projection head: layout, weight normalisation without hooks, init, gradients."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from dino_ray.models.heads import DINOHead, WeightNormLinear


def test_keys_and_shapes_match_dinov2_heads():
    head = DINOHead(in_dim=48, out_dim=100, hidden_dim=64, bottleneck_dim=16)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (64, 48), "mlp.0.bias": (64,),
        "mlp.2.weight": (64, 64), "mlp.2.bias": (64,),
        "mlp.4.weight": (16, 64), "mlp.4.bias": (16,),
        "last_layer.weight_g": (100, 1), "last_layer.weight_v": (100, 16),
    }
    assert [n for n, _ in head.named_parameters() if n.startswith("last_layer.")] == \
        ["last_layer.weight_g", "last_layer.weight_v"]


def test_layer_count_bn_and_bias_options():
    one = DINOHead(8, 10, hidden_dim=32, bottleneck_dim=4, nlayers=1)
    assert list(one.state_dict()) == ["mlp.0.weight", "mlp.0.bias", "last_layer.weight_g", "last_layer.weight_v"]
    bn = DINOHead(8, 10, hidden_dim=32, bottleneck_dim=4, nlayers=2, use_bn=True, mlp_bias=False)
    kinds = [type(m).__name__ for m in bn.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear"]
    assert bn.mlp[0].bias is None and bn.mlp[3].bias is None
    assert bn(torch.randn(5, 8)).shape == (5, 10)
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(8, 10, nlayers=0)


def test_init():
    torch.manual_seed(0)
    head = DINOHead(256, 512, hidden_dim=512, bottleneck_dim=128)
    for i in (0, 2, 4):
        assert head.mlp[i].weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.count_nonzero(head.mlp[i].bias) == 0
    assert torch.equal(head.last_layer.weight_g, torch.ones(512, 1))


def test_forward_is_cosine_times_gain_and_scale_invariant_in_v():
    torch.manual_seed(1)
    head = DINOHead(32, 20, hidden_dim=64, bottleneck_dim=8)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    x = torch.randn(6, 32)
    logits = head(x)
    z = F.normalize(head.mlp(x), dim=-1)
    v, g = head.last_layer.weight_v, head.last_layer.weight_g
    torch.testing.assert_close(logits, z @ (g * F.normalize(v, dim=1)).T)
    assert (logits.abs() <= g.T + 1e-6).all()  # |cos| <= 1
    with torch.no_grad():
        head.last_layer.weight_v.mul_(7.0)
    torch.testing.assert_close(head(x), logits)


def test_no_weight_norm_hooks_and_gradients_reach_g_and_v():
    head = DINOHead(16, 12, hidden_dim=32, bottleneck_dim=8)
    assert all(not m._forward_pre_hooks for m in head.modules())
    assert not any(n.endswith("weight_orig") or n == "last_layer.weight" for n, _ in head.named_parameters())
    head(torch.randn(4, 16)).logsumexp(-1).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_weight_norm_linear_reads_params_only_in_its_forward():
    """ZeRO-3 gathers a module's parameters only around its own forward; emulate that."""
    layer = WeightNormLinear(8, 5)
    x = torch.randn(3, 8)
    expected = layer(x)
    stash = {p: p.data for p in layer.parameters()}
    for p in stash:
        p.data = torch.empty(0)

    def gather(module, args):
        for p in module.parameters():
            p.data = stash[p]

    handle = layer.register_forward_pre_hook(gather)
    try:
        torch.testing.assert_close(layer(x), expected)
    finally:
        handle.remove()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_normalisation_is_finite(dtype):
    """A zero bottleneck must not divide by an eps that underflows (1e-12 is 0 in fp16)."""
    head = DINOHead(16, 12, hidden_dim=32, bottleneck_dim=8).to(dtype)
    out = head(torch.zeros(2, 16, dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
