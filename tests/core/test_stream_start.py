"""The training input starts before the models are built, and a resume finds its step without them."""

from __future__ import annotations

import threading

import pytest

from dino_ray.data.ssl_stream import started_early
from dino_ray.train.train_state import checkpoint_step


def test_the_first_batch_is_fetched_before_anyone_asks_and_order_is_kept():
    asked = threading.Event()

    def batches():
        asked.set()
        yield from range(5)

    it = started_early(batches())
    assert asked.wait(10), "the first batch was not requested in the background"
    assert list(it) == [0, 1, 2, 3, 4]


def test_an_empty_stream_and_a_failing_stream():
    assert list(started_early(iter(()))) == []

    def broken():
        raise OSError("s3://bucket/index.parquet: access denied")
        yield  # pragma: no cover - makes this a generator

    it = started_early(broken())
    with pytest.raises(OSError, match="access denied"):
        next(it)


def test_checkpoint_step_reads_the_folder_name_and_rejects_strangers():
    assert checkpoint_step("/runs/x/pretrain/ray_train/pretrain/step_000000400") == 400
    assert checkpoint_step("bucket/runs/pretrain/step_000000008/") == 8
    with pytest.raises(RuntimeError, match="checkpoint_000003"):
        checkpoint_step("/runs/x/checkpoint_000003")
