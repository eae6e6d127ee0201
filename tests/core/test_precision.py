"""Mixed precision: what `precision: auto|bf16|fp32` runs on each device, and that bf16 really runs."""

from __future__ import annotations

import torch

from dino_ray.train import precision


def test_flags_decide_auto_on_cpu(tmp_path, monkeypatch):
    with_bf16 = tmp_path / "zen4"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
    without = tmp_path / "zen3"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert precision.cpu_bf16_flags(str(with_bf16)) == {"avx512_bf16"}
    assert precision.cpu_bf16_flags(str(without)) == frozenset()
    assert precision.cpu_bf16_flags(str(tmp_path / "missing")) is None

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: frozenset({"avx512_bf16"}))
    chosen = precision.resolve("auto", cpu)
    assert chosen.name == "bf16" and "avx512_bf16" in chosen.reason
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: frozenset())
    chosen = precision.resolve("auto", cpu)
    assert chosen.name == "fp32" and "no native bf16" in chosen.reason
    # no flags readable: a timing decides
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: None)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 2.3)
    assert precision.resolve("auto", cpu).name == "bf16"
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 0.1)
    assert precision.resolve("auto", cpu).name == "fp32"
    # explicit settings win
    assert precision.resolve("fp32", cpu).name == "fp32"
    assert precision.resolve("bf16", cpu).name == "bf16"


def test_bf16_autocast_runs_the_forward_in_bf16_and_fp32_does_not():
    cpu = torch.device("cpu")
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with precision.autocast(precision.resolve("bf16", cpu), cpu):
        assert layer(x).dtype == torch.bfloat16
    with precision.autocast(precision.resolve("fp32", cpu), cpu):
        assert layer(x).dtype == torch.float32
    assert layer.weight.dtype == torch.float32  # master weights stay fp32


def test_unknown_setting_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="fp16"):
        precision.resolve("fp16", torch.device("cpu"))
