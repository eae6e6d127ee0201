"""Block masks and the per-sample reproduction of DINOv2's per-batch masking distribution."""

from __future__ import annotations

import numpy as np
import pytest

from dino_ray.data.masking import MaskGenerator, MaskingConfig, MaskSampler


def test_block_generator_hits_its_target_within_bounds():
    gen = MaskGenerator((16, 16))
    assert gen.max_num_patches == 128
    rng = np.random.default_rng(0)
    assert not gen(0, rng).any()
    counts = []
    for target in (10, 40, 80, 128):
        for _ in range(20):
            mask = gen(target, rng)
            assert mask.shape == (16, 16) and mask.dtype == bool
            counts.append((target, int(mask.sum())))
    assert all(n <= t for t, n in counts)  # never above the target
    assert np.mean([n / t for t, n in counts]) > 0.9  # and close to it on average


def test_each_block_is_one_rectangle_within_the_budget():
    gen = MaskGenerator((14, 14), min_num_patches=4)
    rng = np.random.default_rng(1)
    sizes = []
    for _ in range(100):
        mask = np.zeros((14, 14), dtype=bool)
        added = gen._place_block(mask, 20, rng)
        rows, cols = np.nonzero(mask)
        assert added == mask.sum() and 2 <= added <= 20
        assert mask[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1].all()  # a solid rectangle
        sizes.append(added)
    assert np.mean(sizes) > 8  # areas drawn from [4, 20]


def test_generator_is_deterministic_given_the_generator_state():
    gen = MaskGenerator((16, 16))
    a = gen(60, np.random.default_rng(5))
    b = gen(60, np.random.default_rng(5))
    c = gen(60, np.random.default_rng(6))
    assert (a == b).all() and (a != c).any()


def test_one_group_reproduces_the_collate_scheme_exactly():
    cfg = MaskingConfig(group_size=128)
    sampler = MaskSampler(cfg, (16, 16), n_global=2, seed=3)
    # 64 images x 2 global crops with contiguous indices = one virtual batch of 128 crops
    slots = [sampler.slot(0, i, c) for i in range(64) for c in range(2)]
    assert {g for g, _ in slots} == {0}
    assert sorted(s for _, s in slots) == list(range(128))  # every stratum used exactly once
    masks = [sampler(0, i, c) for i in range(64) for c in range(2)]
    masked = [m for m in masks if m.any()]
    assert len(masked) == 64  # exactly int(128 * 0.5)
    ratios = np.array(sorted(m.mean() for m in masked))
    assert ratios.min() >= 0.05 and ratios.max() <= 0.5
    # stratified: the k-th smallest ratio sits near the k-th stratum of linspace(0.1, 0.5, 65)
    expected = np.linspace(0.1, 0.5, 65)[:-1] + 0.4 / 128
    assert np.abs(ratios - expected).mean() < 0.03


def test_marginal_probability_and_ratio_with_scattered_indices():
    sampler = MaskSampler(MaskingConfig(), (16, 16), n_global=2, seed=0)
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 2**62, size=600)  # hashed ids: every crop in its own virtual group
    masks = np.array([sampler(1, int(i), c) for i in indices for c in range(2)])
    assert masks.shape == (1200, 256) and masks.dtype == bool
    masked = masks.any(axis=1)
    assert 0.44 < masked.mean() < 0.56
    ratios = masks[masked].mean(axis=1)
    assert 0.25 < ratios.mean() < 0.33  # targets uniform in [0.1, 0.5]; blocks may stop a bit short
    assert ratios.max() <= 0.5


def test_probability_and_ratio_range_are_honoured():
    never = MaskSampler(MaskingConfig(mask_probability=0.0), (8, 8), 2, seed=0)
    assert not any(never(0, i, 0).any() for i in range(50))
    always = MaskSampler(MaskingConfig(mask_probability=1.0, mask_ratio_min_max=(0.3, 0.3)), (8, 8), 2, seed=0)
    counts = [always(0, i, c).sum() for i in range(40) for c in range(2)]
    assert max(counts) <= int(64 * 0.3) and np.mean(counts) > 0.8 * int(64 * 0.3)


def test_deterministic_and_different_across_epochs_samples_crops_and_seeds():
    a = MaskSampler(MaskingConfig(mask_probability=1.0), (16, 16), 2, seed=0)
    b = MaskSampler(MaskingConfig(mask_probability=1.0), (16, 16), 2, seed=1)
    ref = a(0, 7, 0)
    assert (ref == a(0, 7, 0)).all()
    assert (ref != a(1, 7, 0)).any()
    assert (ref != a(0, 8, 0)).any()
    assert (ref != a(0, 7, 1)).any()
    assert (ref != b(0, 7, 0)).any()


def test_validation_names_the_field():
    with pytest.raises(ValueError, match="mask_probability"):
        MaskingConfig(mask_probability=1.5).validate()
    with pytest.raises(ValueError, match="mask_ratio_min_max"):
        MaskingConfig(mask_ratio_min_max=(0.6, 0.2)).validate()
    with pytest.raises(ValueError, match="group_size"):
        MaskingConfig(group_size=0).validate()
    with pytest.raises(ValueError, match="crop_index"):
        MaskSampler(MaskingConfig(), (4, 4), 2, 0)(0, 0, 2)
    with pytest.raises(ValueError, match="sample_index"):
        MaskSampler(MaskingConfig(), (4, 4), 2, 0)(0, -1, 0)
