"""Hand-checked tests of the DINOv2 objectives: Sinkhorn-Knopp, softmax centering, DINO, iBOT, KoLeo."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_ray.losses.centering import SoftmaxCentering, sinkhorn_knopp
from dino_ray.losses.dino import DINOLoss, dino_pair_count
from dino_ray.losses.ibot import iBOTPatchLoss, masked_token_weights
from dino_ray.losses.koleo import KoLeoLoss


def _reference_sinkhorn(logits: torch.Tensor, temp: float, n_iterations: int) -> torch.Tensor:
    """Textbook single-process Sinkhorn-Knopp in float64, no max shift."""
    q = torch.exp(logits.double() / temp).t()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


# ----------------------------------------------------------------------------------- Sinkhorn


def test_sinkhorn_rows_sum_to_one_and_columns_balance():
    torch.manual_seed(0)
    logits = torch.randn(16, 8)
    q = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=3)
    assert q.shape == (16, 8)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(16))
    # prototype mass moves towards B/K = 2 in 3 rounds (much closer than a plain softmax) ...
    softmax_spread = (torch.softmax(logits / 0.5, dim=-1).sum(dim=0) - 2.0).abs().max()
    assert (q.sum(dim=0) - 2.0).abs().max() < 0.5 * softmax_spread
    # ... and converges to it with more rounds
    q_long = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=200)
    torch.testing.assert_close(q_long.sum(dim=0), torch.full((8,), 2.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(q_long.sum(dim=1), torch.ones(16))


def test_sinkhorn_matches_textbook_version():
    torch.manual_seed(1)
    logits = torch.randn(12, 5)
    expected = _reference_sinkhorn(logits, 0.3, 3).float()
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.3, 3), expected, atol=1e-6, rtol=1e-5)


def test_sinkhorn_is_finite_where_a_plain_exp_overflows():
    logits = torch.tensor([[10.0, 0.0, -1.0], [0.0, 9.0, 0.0], [1.0, 0.0, 8.0]])
    assert torch.isinf(torch.exp(logits / 0.04)).any()  # the naive version would produce NaN
    q = sinkhorn_knopp(logits, teacher_temp=0.04)
    assert torch.isfinite(q).all()
    assert q.argmax(dim=1).tolist() == [0, 1, 2]


def test_sinkhorn_rejects_bad_input():
    with pytest.raises(ValueError, match="teacher_temp"):
        sinkhorn_knopp(torch.randn(4, 3), teacher_temp=0.0)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        sinkhorn_knopp(torch.randn(4, 3, 2), teacher_temp=0.1)


def test_sinkhorn_empty_batch_gives_empty_result():
    assert sinkhorn_knopp(torch.zeros(0, 7), teacher_temp=0.1).shape == (0, 7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SPLIT = 5  # rank 0 gets rows [0, 5), rank 1 the rest: uneven on purpose (iBOT token counts differ per rank)


def _distributed_worker(rank: int, port: int, logits: torch.Tensor, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        local = logits[:SPLIT] if rank == 0 else logits[SPLIT:]
        q = sinkhorn_knopp(local, teacher_temp=0.2, n_iterations=3)
        centering = SoftmaxCentering(logits.shape[1], momentum=0.5)
        centering(local, teacher_temp=0.2)
        centering.apply_pending_update()
        empty_q = sinkhorn_knopp(local[:0] if rank == 0 else local, teacher_temp=0.2)
        torch.save({"q": q, "center": centering.center, "empty_q": empty_q}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_and_centering_across_two_gloo_processes_equal_one_process(tmp_path):
    torch.manual_seed(2)
    logits = torch.randn(12, 6)
    mp.spawn(_distributed_worker, args=(_free_port(), logits, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    expected_q = sinkhorn_knopp(logits, teacher_temp=0.2, n_iterations=3)
    torch.testing.assert_close(torch.cat([ranks[0]["q"], ranks[1]["q"]]), expected_q)
    # rank 0 holding no rows: rank 1 gets the single-process result on its own rows
    assert ranks[0]["empty_q"].shape == (0, 6)
    torch.testing.assert_close(ranks[1]["empty_q"], sinkhorn_knopp(logits[SPLIT:], teacher_temp=0.2))

    single = SoftmaxCentering(6, momentum=0.5)
    single(logits, teacher_temp=0.2)
    single.apply_pending_update()
    for r in ranks:
        torch.testing.assert_close(r["center"], single.center)
    torch.testing.assert_close(single.center, 0.5 * logits.mean(dim=0, keepdim=True))


# --------------------------------------------------------------------------- softmax centering


def test_softmax_centering_applies_batch_mean_to_the_next_call():
    centering = SoftmaxCentering(3, momentum=0.9)
    batch1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])  # mean [2, 2, 2]
    batch2 = torch.tensor([[0.0, 1.0, 0.0]])
    probs1 = centering(batch1, teacher_temp=1.0)
    torch.testing.assert_close(probs1, torch.softmax(batch1, dim=-1))  # center still 0
    assert torch.count_nonzero(centering.center) == 0  # the update is pending, not applied
    probs2 = centering(batch2, teacher_temp=0.5)
    expected_center = torch.full((1, 3), 0.1 * 2.0)
    torch.testing.assert_close(probs2, torch.softmax((batch2 - expected_center) / 0.5, dim=-1))
    torch.testing.assert_close(centering.center, expected_center)
    assert "center" in centering.state_dict()


def test_a_checkpointed_center_includes_the_last_batch_mean():
    """A resumed run must centre its next batch as an uninterrupted one would."""
    going, batch = SoftmaxCentering(3, momentum=0.9), torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    going(batch, teacher_temp=1.0)  # registers this batch's mean for the next call
    resumed = SoftmaxCentering(3, momentum=0.9)
    resumed.load_state_dict(going.state_dict())
    nxt = torch.tensor([[0.0, 1.0, 0.0]])
    torch.testing.assert_close(resumed(nxt, teacher_temp=0.5), going(nxt, teacher_temp=0.5))


def test_softmax_centering_ignores_an_empty_batch():
    centering = SoftmaxCentering(4)
    centering(torch.zeros(0, 4), teacher_temp=0.1)
    centering.apply_pending_update()
    assert torch.isfinite(centering.center).all() and torch.count_nonzero(centering.center) == 0


# ------------------------------------------------------------------------------------- DINO


def test_dino_cross_entropy_by_hand():
    loss = DINOLoss(out_dim=2, student_temp=0.1, centering="softmax")
    # logits / 0.1 = [0, ln 3]  ->  student probabilities [1/4, 3/4]
    student = torch.tensor([[0.0, 0.1 * math.log(3.0)]])
    uniform = torch.tensor([[0.5, 0.5]])
    one_hot = torch.tensor([[0.0, 1.0]])
    ce_uniform = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    ce_one_hot = -math.log(0.75)
    assert loss([student], [uniform]).item() == pytest.approx(ce_uniform, rel=1e-5)
    # every (student, teacher) pair is summed ...
    assert loss([student, student], [uniform, one_hot]).item() == pytest.approx(
        2 * ce_uniform + 2 * ce_one_hot, rel=1e-5)
    # ... and ignore_diagonal keeps only the cross pairs (s0, t1) and (s1, t0)
    assert loss([student, student], [uniform, one_hot], ignore_diagonal=True).item() == pytest.approx(
        ce_uniform + ce_one_hot, rel=1e-5)


def test_dino_loss_averages_over_the_batch_and_backpropagates():
    loss = DINOLoss(out_dim=2, student_temp=1.0)
    student = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    value = loss([student], [teacher])
    assert value.item() == pytest.approx((math.log(2.0) - math.log(0.75)) / 2, rel=1e-5)
    value.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_dino_teacher_probs_sinkhorn_and_softmax():
    torch.manual_seed(3)
    logits = torch.randn(6, 4)
    sk = DINOLoss(4, centering="sinkhorn_knopp").teacher_probs(logits, teacher_temp=0.07)
    torch.testing.assert_close(sk, sinkhorn_knopp(logits, 0.07))
    sm = DINOLoss(4, centering="softmax").teacher_probs(logits, teacher_temp=0.07)
    torch.testing.assert_close(sm, torch.softmax(logits / 0.07, dim=-1))


def test_dino_loss_rejects_bad_configuration():
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(4, centering="kmeans")
    with pytest.raises(ValueError, match=r"\[M, 4\], got shape \(3, 5\)"):
        DINOLoss(4).teacher_probs(torch.randn(3, 5), 0.05)
    with pytest.raises(ValueError, match="differ"):
        DINOLoss(4)([torch.randn(3, 4)], [torch.rand(2, 4)])


def test_dino_pair_count_is_the_official_normaliser():
    assert dino_pair_count(2, 8) == 18
    assert dino_pair_count(2, 0) == 3  # official: max(n_local * n_global, 1) local terms, even with none
    with pytest.raises(ValueError):
        dino_pair_count(1, 0)


# ------------------------------------------------------------------------------------- iBOT


def test_ibot_weights_each_image_equally_and_divides_by_all_images():
    # image 0: 1 masked token, image 1: 3 masked tokens, image 2: unmasked (still counted)
    masks = torch.tensor([
        [False, True, False, False],
        [True, True, False, True],
        [False, False, False, False],
    ])
    torch.testing.assert_close(masked_token_weights(masks), torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3]))
    k = 3
    student = torch.randn(4, k)
    teacher = torch.eye(k)[[0, 1, 2, 0]]  # one-hot targets
    log_p = torch.log_softmax(student / 0.1, dim=-1)
    ce = [-log_p[i, c].item() for i, c in enumerate([0, 1, 2, 0])]
    expected = (ce[0] + (ce[1] + ce[2] + ce[3]) / 3) / 3
    got = iBOTPatchLoss(k, student_temp=0.1).forward_masked(student, teacher, masks)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_ibot_padding_and_explicit_weights():
    masks = torch.tensor([[True, False], [True, True]])
    student, teacher = torch.randn(3, 5), torch.softmax(torch.randn(3, 5), dim=-1)
    loss = iBOTPatchLoss(5)
    reference = loss.forward_masked(student, teacher, masks)
    padded = loss.forward_masked(torch.cat([student, torch.randn(2, 5)]), torch.cat([teacher, torch.rand(2, 5)]),
                                 masks, n_masked_patches=3,
                                 masks_weight=torch.tensor([1.0, 0.5, 0.5, 9.0, 9.0]))
    torch.testing.assert_close(padded, reference)
    with pytest.raises(ValueError, match="masked tokens"):
        loss.forward_masked(student[:2], teacher[:2], masks)


def test_ibot_loss_is_zero_without_masked_tokens():
    masks = torch.zeros(4, 6, dtype=torch.bool)
    loss = iBOTPatchLoss(5)
    probs = loss.teacher_probs(torch.zeros(0, 5), teacher_temp=0.07)
    value = loss.forward_masked(torch.zeros(0, 5, requires_grad=True), probs, masks)
    assert value.item() == 0.0


# ------------------------------------------------------------------------------------ KoLeo


def test_koleo_three_points_on_a_circle():
    # unit vectors at 0, 60 and 180 degrees: nearest-neighbour chords are 1, 1 and sqrt(3)
    angles = torch.tensor([0.0, math.pi / 3, math.pi])
    points = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    expected = -math.log(3.0) / 6  # -(log 1 + log 1 + log sqrt 3) / 3
    assert KoLeoLoss()(points).item() == pytest.approx(expected, abs=1e-6)
    # scale of the inputs does not matter: features are L2-normalised first
    assert KoLeoLoss()(points * torch.tensor([[2.0], [0.5], [7.0]])).item() == pytest.approx(expected, abs=1e-6)


def test_koleo_gradient_pushes_neighbours_apart_and_batch_one_is_rejected():
    points = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]], requires_grad=True)
    KoLeoLoss()(points).backward()
    assert points.grad[1, 1] < 0  # descending the loss moves point 1 away from point 0 (up, +y)
    with pytest.raises(ValueError, match="at least 2"):
        KoLeoLoss()(torch.randn(1, 8))
    duplicate = KoLeoLoss()(torch.ones(2, 3))
    assert torch.isfinite(duplicate)
