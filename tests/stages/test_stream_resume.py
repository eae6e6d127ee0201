"""The training stream that Ray Train workers read: a resumed stream gives exactly the crops it would have given.

This is the promise behind "a killed worker resumes on exactly the crops it would have seen": the stream
is started again at the checkpoint's step, by new Ray Data actors with fresh state, and every tensor of
every later batch must be bit-identical to the uninterrupted stream's, on every rank, across an epoch
boundary and with an unreadable image being replaced.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dino_ray.config.loader import load_job
from dino_ray.data.ssl_stream import StreamSpec, ssl_batches, write_index

pytestmark = pytest.mark.slow
PRESET = Path(__file__).resolve().parents[1] / "presets" / "tiny.yaml"
STEPS, RESUME_AT, BATCH, WORLD = 8, 5, 4, 2


def test_a_resumed_stream_gives_bit_identical_crops_on_every_rank(ray_session, cifar10_dir, tmp_path):
    uris = sorted(str(p) for p in (cifar10_dir / "train").rglob("*.jpg"))[:40]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")  # replaced by the next image of the order, and counted
    uris.insert(7, str(broken))
    index = str(tmp_path / "index.parquet")
    n = write_index(uris, index)
    assert STEPS * BATCH * WORLD > n  # the run crosses into a second epoch (a new permutation)
    data = load_job(PRESET, [f"output_root={tmp_path}", "stages=[pretrain]",
                             f"pretrain.data.source.uri={cifar10_dir / 'train'}"]).pretrain.data

    def stream(rank: int, start: int) -> list[dict[str, torch.Tensor]]:
        spec = StreamSpec(index_uri=index, n_images=n, seed=3, batch_size=BATCH, world_size=WORLD, rank=rank,
                          start_step=start, total_steps=STEPS)
        return list(ssl_batches(spec, data))

    skipped = 0
    for rank in range(WORLD):
        whole, resumed = stream(rank, 0), stream(rank, RESUME_AT)
        assert len(whole) == STEPS and len(resumed) == STEPS - RESUME_AT
        for step, (a, b) in enumerate(zip(whole[RESUME_AT:], resumed), start=RESUME_AT):
            assert a.keys() == b.keys() and {"sample_index", "epoch", "skips"} < set(a)
            for key in a:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (rank, step, key)
        assert {int(e) for b in whole for e in b["epoch"]} == {0, 1}
        skipped += int(sum(b["skips"].sum() for b in whole))
    assert skipped >= 1  # the broken file was met (once per epoch that reached it) and replaced
