"""Evaluation core: kNN, linear-probe grid, retrieval, patch PCA, reports, raw-pixel baseline."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino_ray.evals import linear as linear_mod
from dino_ray.evals.baselines import raw_pixel_features
from dino_ray.evals.features import extract_features, extract_patch_grid, feature_keys, linear_input
from dino_ray.evals.knn import knn_classify
from dino_ray.evals.linear import (
    LR_GRID_CODE,
    LinearGridConfig,
    evaluate_head,
    split_train_val,
    train_linear_grid,
    train_single_head,
)
from dino_ray.evals.pca import patch_pca_rgb, side_by_side, to_uint8_images
from dino_ray.evals.report import comparison_table, html_report, markdown_report
from dino_ray.evals.retrieval import retrieval_metrics


def clusters(n: int, num_classes: int, dim: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * 3.0
    y = rng.integers(0, num_classes, n)
    return (centres[y] + spread * rng.normal(size=(n, dim))).astype(np.float32), y


def feature_dict(signal: dict[str, np.ndarray], n: int, dim: int, rng) -> dict[str, np.ndarray]:
    """A 4-block feature dict: given keys carry signal, the rest are small noise."""
    feats = {k: (0.1 * rng.normal(size=(n, dim))).astype(np.float32) for k in feature_keys(4)}
    for key, value in signal.items():
        feats[key] = (value + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    return feats


def one_hot(y: np.ndarray, dim: int, scale: float) -> np.ndarray:
    out = np.zeros((y.size, dim), dtype=np.float32)
    out[np.arange(y.size), y] = scale
    return out


def labelled_features(y: np.ndarray, scales: dict[str, float], dim: int, rng):
    """Feature dict whose keys in ``scales`` encode the label as a scaled one-hot (+ noise)."""
    return feature_dict({k: one_hot(y, dim, scale) for k, scale in scales.items()}, y.size, dim, rng)


# ----------------------------------------------------------------------------------------- kNN


def test_knn_separable_clusters_near_perfect():
    x, y = clusters(1200, 10, 32, spread=0.5, seed=0)
    result = knn_classify(x[:1000], y[:1000], x[1000:], y[1000:], ks=(10, 20), batch_size=64)
    assert result["metrics"]["k20_top1"] > 0.98
    assert result["metrics"]["k10_top5"] == 1.0
    assert result["notes"] == []


def test_knn_random_labels_near_chance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2500, 16)).astype(np.float32)
    y = rng.integers(0, 10, 2500)
    top1 = knn_classify(x[:2000], y[:2000], x[2000:], y[2000:], ks=(20,))["metrics"]["k20_top1"]
    assert 0.03 < top1 < 0.2


def test_knn_hand_computed_vote_depends_on_temperature():
    # Query (1, 0). Neighbours: one class-0 at cos 1, two class-1 at cos 0 (k = 3, all of them).
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    labels = np.array([0, 1, 1])
    query, truth = np.array([[2.0, 0.0]], dtype=np.float32), np.array([0])
    # T = 0.5: class 0 gets e^(1/0.5) = 7.39 > class 1 gets 2 * e^0 = 2 -> correct.
    sharp = knn_classify(train, labels, query, truth, ks=(3,), temperature=0.5)
    # T = 10: class 0 gets e^0.1 = 1.105 < 2 -> majority wins -> wrong.
    flat = knn_classify(train, labels, query, truth, ks=(3,), temperature=10.0)
    # k = 1: only the nearest votes.
    nearest = knn_classify(train, labels, query, truth, ks=(1,), temperature=10.0)
    assert sharp["metrics"]["k3_top1"] == 1.0
    assert flat["metrics"]["k3_top1"] == 0.0
    assert nearest["metrics"]["k1_top1"] == 1.0


def test_knn_chunking_is_exact_and_k_is_capped_with_note():
    x, y = clusters(300, 5, 8, spread=3.0, seed=2)
    whole = knn_classify(x[:250], y[:250], x[250:], y[250:], ks=(5, 20, 400))
    chunked = knn_classify(x[:250], y[:250], x[250:], y[250:], ks=(5, 20, 400), batch_size=7,
                           train_chunk=13)
    assert whole["metrics"] == chunked["metrics"]
    assert any("k=400" in note and "250" in note for note in whole["notes"])


def test_knn_rejects_bad_input():
    x, y = clusters(20, 2, 4, 1.0, 0)
    with pytest.raises(ValueError, match="test_x"):
        knn_classify(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="train_y"):
        knn_classify(x, y[:5], x, y)
    with pytest.raises(ValueError, match="integer"):
        knn_classify(x, y.astype(np.float32), x, y)


# ----------------------------------------------------------------------------------- retrieval


def test_retrieval_hand_example():
    # Gallery ranked by cosine to query (1, 0): g0 (cos 1), g1 (0.8), g2 (0.6), g3 (0).
    gallery = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    gallery_y = np.array([0, 1, 0, 1])
    # Query A (label 0): relevant at ranks 1 and 3 -> AP = (1/1 + 2/3) / 2 = 5/6.
    # Query B (label 1): relevant at ranks 2 and 4 -> AP = (1/2 + 2/4) / 2 = 1/2.
    queries = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    m = retrieval_metrics(queries, np.array([0, 1]), gallery, gallery_y, ks=(1, 2, 3))
    assert m["mAP"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert m["recall_at_1"] == pytest.approx(0.5)  # only A has a hit at rank 1
    assert m["recall_at_2"] == pytest.approx(1.0)
    assert m["queries"] == 2 and m["queries_without_positive"] == 0


def test_retrieval_exclude_self_and_missing_positives():
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)
    y = np.array([0, 0, 1])
    # Without exclusion each query finds itself first: perfect recall@1.
    assert retrieval_metrics(x, y, x, y, ks=(1,))["recall_at_1"] == 1.0
    # Leave-one-out: items 0 and 1 find each other first (AP 1); item 2 has no other label-1 item.
    m = retrieval_metrics(x, y, x, y, ks=(1,), exclude_self=True)
    assert m["mAP"] == 1.0 and m["recall_at_1"] == 1.0
    assert m["queries"] == 2 and m["queries_without_positive"] == 1
    with pytest.raises(ValueError, match="exclude_self"):
        retrieval_metrics(x[:2], y[:2], x, y, exclude_self=True)


# ------------------------------------------------------------------------------------- linear


def test_linear_input_layout_is_oldest_cls_first_then_avgpool():
    feats = {f"cls_{i}": np.full((2, 3), float(i), np.float32) for i in range(1, 5)}
    feats["avgpool_1"] = np.full((2, 3), 9.0, np.float32)
    x = linear_input(feats, 4, avgpool=True)
    assert x.shape == (2, 15)
    assert x[0].tolist() == [4.0] * 3 + [3.0] * 3 + [2.0] * 3 + [1.0] * 3 + [9.0] * 3
    assert linear_input(feats, 1, avgpool=False)[0].tolist() == [1.0] * 3
    with pytest.raises(KeyError, match="avgpool_1"):
        linear_input({k: v for k, v in feats.items() if k != "avgpool_1"}, 1, avgpool=True)


def test_split_train_val_is_stratified_and_deterministic():
    labels = np.repeat(np.arange(4), [10, 20, 30, 2])
    train_idx, val_idx = split_train_val(labels, 0.2, seed=3)
    again = split_train_val(labels, 0.2, seed=3)
    assert np.array_equal(val_idx, again[1])
    assert not np.array_equal(val_idx, split_train_val(labels, 0.2, seed=4)[1])
    assert np.intersect1d(train_idx, val_idx).size == 0
    assert train_idx.size + val_idx.size == labels.size
    assert np.bincount(labels[val_idx]).tolist() == [2, 4, 6, 1]


def test_linear_grid_learns_separable_data():
    rng = np.random.default_rng(0)
    y_tr, y_va, y_te = (rng.integers(0, 10, n) for n in (1500, 300, 300))
    scales = {"cls_1": 2.0, "avgpool_1": 1.0}
    train, val, test = (labelled_features(y, scales, 16, rng) for y in (y_tr, y_va, y_te))
    cfg = LinearGridConfig(epochs=4, batch_size=64)
    result = train_linear_grid(train, y_tr, val, y_va, cfg)
    assert len(result.val_top1) == len(LR_GRID_CODE) * 4
    assert result.best_val_top1 > 0.95
    assert evaluate_head(result.best, test, y_te)["top1"] > 0.95
    assert result.metrics()["val_top1/best"] == result.best_val_top1


def test_linear_grid_selects_on_val_not_test():
    """Val rewards the CLS-only heads, test rewards the avgpool heads: the choice must follow val."""
    rng = np.random.default_rng(1)
    c, dim = 4, 8
    y_tr, y_va, y_te = (rng.integers(0, c, n) for n in (800, 400, 400))
    train = feature_dict({"cls_1": one_hot(y_tr, dim, 3.0), "avgpool_1": one_hot(y_tr, dim, 3.0)},
                         y_tr.size, dim, rng)
    # Val: avgpool points to the wrong class, strongly; CLS is right.
    val = feature_dict({"cls_1": one_hot(y_va, dim, 3.0),
                        "avgpool_1": one_hot((y_va + 1) % c, dim, 8.0)}, y_va.size, dim, rng)
    # Test: CLS carries nothing; avgpool is right.
    test = feature_dict({"avgpool_1": one_hot(y_te, dim, 3.0)}, y_te.size, dim, rng)
    cfg = LinearGridConfig(epochs=3, batch_size=64, n_last_blocks=(1,))
    result = train_linear_grid(train, y_tr, val, y_va, cfg, lrs=(0.05, 0.5))
    assert result.best.spec.avgpool is False
    assert result.best_val_top1 == max(result.val_top1.values()) > 0.95
    assert evaluate_head(result.best, test, y_te)["top1"] < 0.5
    pooled = train_single_head(train, y_tr, val, y_va, cfg, lr=0.5, n_blocks=1, avgpool=True)
    assert evaluate_head(pooled.best, test, y_te)["top1"] > 0.9  # the test-best head was passed over


def test_linear_grid_trains_all_heads_in_one_pass(monkeypatch):
    fetches = []
    real_gather = linear_mod.gather_rows

    def counting_gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        fetches.append(idx.numel())
        return real_gather(x, idx)

    monkeypatch.setattr(linear_mod, "gather_rows", counting_gather)
    rng = np.random.default_rng(2)
    y_tr, y_va = rng.integers(0, 5, 1000), rng.integers(0, 5, 200)
    scales = {f"cls_{i}": 2.0 for i in (1, 2, 3, 4)}
    train, val = labelled_features(y_tr, scales, 8, rng), labelled_features(y_va, scales, 8, rng)
    cfg = LinearGridConfig(epochs=2, batch_size=100)
    result = train_linear_grid(train, y_tr, val, y_va, cfg)
    assert len(fetches) == result.batches_fetched == 2 * 10  # epochs x steps, for all 52 heads
    assert set(fetches) == {100}
    trained = [acc for spec, acc in result.val_top1.items() if spec.lr >= 1e-2]
    assert len(trained) == 4 * 4 and min(trained) > 0.9  # every head with a usable lr learned
    fetches.clear()
    single = train_single_head(train, y_tr, val, y_va, cfg, 1e-2, 4, True)
    assert len(fetches) == single.batches_fetched == 20  # one head alone costs the same fetches


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_grid_head_matches_the_same_head_trained_alone(weight_decay):
    """Summed per-head losses give each head its own gradient, and the stacked per-head-lr update
    equals torch.optim.SGD + the cosine schedule (what ``train_single_head`` uses)."""
    rng = np.random.default_rng(3)
    y_tr, y_va = rng.integers(0, 3, 600), rng.integers(0, 3, 600)
    train, val = (labelled_features(y, {"cls_1": 0.6}, 6, rng) for y in (y_tr, y_va))
    cfg = LinearGridConfig(epochs=2, batch_size=50, n_last_blocks=(1,), avgpool=(False,),
                           weight_decay=weight_decay)
    solo = train_single_head(train, y_tr, val, y_va, cfg, lr=0.1, n_blocks=1, avgpool=False)
    grid = train_linear_grid(train, y_tr, val, y_va, cfg, lrs=(0.1,))
    assert np.abs(solo.best.weight).max() > 0.1  # trained well away from the N(0, 0.01) init
    np.testing.assert_allclose(grid.best.weight, solo.best.weight, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grid.best.bias, solo.best.bias, rtol=1e-4, atol=1e-6)
    full = train_linear_grid(train, y_tr, val, y_va, replace(cfg, n_last_blocks=(1, 4),
                                                             avgpool=(False, True)),
                             lrs=(0.1, 0.01))
    first = next(iter(full.val_top1))  # blocks1, cls, lr 0.1: same init and batches as solo
    assert (first.n_blocks, first.avgpool, first.lr) == (1, False, 0.1)
    assert full.val_top1[first] == pytest.approx(solo.best_val_top1)


def test_linear_config_imports_without_torch():
    """The job config imports ``dino_ray.evals.config``; building it must not pull in torch."""
    code = ("import sys; from dino_ray.evals.config import LinearGridConfig; LinearGridConfig(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo,
                   env={**os.environ, "PYTHONPATH": str(repo)})


def test_grid_rejects_mismatched_inputs():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 50)
    feats = feature_dict({}, 50, 4, rng)
    with pytest.raises(ValueError, match="train_y"):
        train_linear_grid(feats, y[:10], feats, y, LinearGridConfig(epochs=1))
    with pytest.raises(ValueError, match="learning_rates"):
        LinearGridConfig(learning_rates=(0.1, -1.0))
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(y, 1.5)


# ----------------------------------------------------------------------------- features / PCA


def tiny_backbone():
    from dino_ray.models import build_backbone

    torch.manual_seed(0)
    return build_backbone("vit_tiny", embed_dim=64, depth=4, num_heads=2, img_size=32,
                          patch_size=8, num_register_tokens=1, drop_path_rate=0.3)


def test_extract_features_layout_matches_backbone():
    backbone = tiny_backbone().train()
    images = torch.randn(3, 3, 32, 32)
    feats = extract_features(backbone, images)
    assert list(feats) == feature_keys(4)
    assert all(v.shape == (3, 64) and v.dtype == np.float32 for v in feats.values())
    assert backbone.training  # mode restored
    with torch.no_grad():
        backbone.eval()
        final = backbone.forward_features(images)
        blocks = backbone.get_intermediate_layers(images, n=4, return_class_token=True, norm=True)
    np.testing.assert_allclose(feats["cls_1"], final["x_norm_clstoken"].numpy(), atol=1e-5)
    np.testing.assert_allclose(feats["avgpool_1"], final["x_norm_patchtokens"].mean(1).numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(feats["cls_4"], blocks[0][1].numpy(), atol=1e-5)
    grid = extract_patch_grid(backbone, images)
    assert grid.shape == (3, 4, 4, 64)
    with pytest.raises(ValueError, match="3, H, W"):
        extract_features(backbone, torch.randn(3, 32, 32))


def planted_patches(fg_side: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[2, 8, 8, 16] tokens: a fg_side x fg_side square of 'object' patches on a background."""
    rng = np.random.default_rng(seed)
    tokens = np.tile(rng.normal(size=16) * 4, (2, 8, 8, 1)) + 0.05 * rng.normal(size=(2, 8, 8, 16))
    mask = np.zeros((2, 8, 8), dtype=bool)
    mask[:, 1:1 + fg_side, 1:1 + fg_side] = True
    tokens[mask] = rng.normal(size=16) * 4 + rng.normal(size=(mask.sum(), 16))
    return tokens.astype(np.float32), mask


def test_patch_pca_background_black_foreground_coloured():
    tokens, mask = planted_patches(3)
    rgb = patch_pca_rgb(tokens)
    assert rgb.shape == (2, 8, 8, 3) and rgb.dtype == np.uint8
    assert (rgb[~mask] == 0).all()
    assert (rgb[mask].max(axis=-1) > 0).mean() > 0.8
    flat = patch_pca_rgb(tokens.reshape(2, 64, 16), grid=(8, 8))
    np.testing.assert_array_equal(flat, rgb)


def test_patch_pca_takes_smaller_side_as_foreground():
    tokens, mask = planted_patches(6)  # the planted square covers 36/64: background is smaller
    rgb = patch_pca_rgb(tokens)
    assert (rgb[mask] == 0).all() and (rgb[~mask].max(axis=-1) > 0).mean() > 0.8
    larger = patch_pca_rgb(tokens, foreground="larger")
    assert (larger[~mask] == 0).all()
    with pytest.raises(ValueError, match="square"):
        patch_pca_rgb(tokens.reshape(2, 64, 16)[:, :60])


def test_side_by_side_grid_size():
    images = to_uint8_images(torch.zeros(2, 3, 32, 32))
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    pictures = patch_pca_rgb(planted_patches(3)[0])
    canvas = side_by_side(images, pictures, scale=2)
    assert canvas.size == (2 * 64, 2 * 64)
    pixels = np.asarray(canvas)
    # Left: the (uniform, mean-coloured) image; right: each patch as an 8x8 block (32 px / 8 * 2).
    assert (pixels[:64, :64] == pixels[0, 0]).all()
    np.testing.assert_array_equal(pixels[64:, 64:], pictures[1].repeat(8, axis=0).repeat(8, axis=1))


# ------------------------------------------------------------------------------------- report


def test_reports_render_sections_tables_and_pictures():
    results = {"train_images": 2000, "knn_k20_top1": 0.91234, "linear_best_head": "blocks4_cls_lr0.001",
               "retrieval": {"mAP": 0.5, "best_lr": 1e-3}, "notes": ["k=200 <capped>"]}
    md = markdown_report("vit_small | run1", results, ["pca/epoch1.png"])
    assert md.startswith("# Evaluation: vit_small | run1")
    metrics, retrieval = md.index("## Metrics"), md.index("## retrieval")
    assert metrics < md.index("| knn_k20_top1 | 0.9123 |") < retrieval  # flat scalars come first
    assert "| train_images | 2000 |" in md and "| linear_best_head | blocks4_cls_lr0.001 |" in md
    assert "| best_lr | 0.001 |" in md[retrieval:]
    assert "- k=200 <capped>" in md and "![epoch1.png](pca/epoch1.png)" in md
    page = html_report("vit<small>", results, ["pca/epoch1.png"])
    assert "vit&lt;small&gt;" in page and "&lt;capped&gt;" in page and "<img src=\"pca/epoch1.png\"" in page
    assert "<td>knn_k20_top1</td><td>0.9123</td>" in page
    with pytest.raises(TypeError, match="kNN"):
        markdown_report("x", {"kNN": {"nested": {"too": "deep"}}}, [])


def test_comparison_table_unions_columns():
    table = comparison_table([{"backbone": "raw pixels", "knn": 0.36},
                              {"backbone": "vit_s", "knn": 0.5, "linear": 0.61}])
    lines = table.splitlines()
    assert lines[0] == "| backbone | knn | linear |"
    assert lines[2] == "| raw pixels | 0.36 | - |"
    assert lines[3] == "| vit_s | 0.5 | 0.61 |"
    with pytest.raises(ValueError):
        comparison_table([])


# --------------------------------------------------------------------------- real-data baseline


def load_cifar(root: Path, split: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / split / name).glob("*.jpg"))[:per_class]:
            with Image.open(path) as img:
                images.append(np.asarray(img.convert("RGB")))
            labels.append(label)
    return np.stack(images), np.array(labels)


def test_raw_pixel_knn_on_cifar10_beats_chance(cifar10_dir):
    train_x, train_y = load_cifar(cifar10_dir, "train", 200)
    test_x, test_y = load_cifar(cifar10_dir, "test", 50)
    assert train_x.shape == (2000, 32, 32, 3) and test_x.shape == (500, 32, 32, 3)
    f_train, f_test = raw_pixel_features(train_x, size=16), raw_pixel_features(test_x, size=16)
    assert f_train.shape == (2000, 768)
    np.testing.assert_allclose(f_train.mean(axis=1), 0.0, atol=1e-5)
    top1 = knn_classify(f_train, train_y, f_test, test_y, ks=(20,))["metrics"]["k20_top1"]
    assert top1 > 0.25, top1  # chance is 0.10; ~0.33 measured (36% with all 50k train)
    assert not math.isnan(top1)
