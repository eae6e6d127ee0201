"""A ZeRO-3 checkpoint resumes on another number of ranks (train/reshard.py), with real DeepSpeed engines.

The optimizer's trajectory must continue: after 3 steps on W ranks, a save, and a reload on W' ranks, the
next 3 losses equal those of an uninterrupted run. A reload that dropped Adam's moments or its step count
(bias correction), or put a slice in the wrong place, changes them.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow  # six DeepSpeed process groups: about two minutes on two cores

from test_clipping import Parts, batch  # noqa: E402  (the same three-part model)

GLOBAL_BATCH = 8


def _engine(world: int):
    import deepspeed

    torch.manual_seed(0)
    model = Parts()
    groups = [{"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0},
              {"params": [p for n, p in model.named_parameters() if n.endswith("weight")], "weight_decay": 0.04}]
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "train_batch_size": GLOBAL_BATCH,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 1 << 30, "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-2), config=config)
    return engine


def _steps(engine, rank: int, world: int, first: int, last: int) -> list[float]:
    losses = []
    for k in range(first, last):
        x = torch.cat([batch(10 * k + r) for r in range(2)])  # the same global batch for any world size
        part = GLOBAL_BATCH // world
        loss = engine(x[rank * part:(rank + 1) * part])
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(float(total) / world)
    return losses


def _worker(rank: int, world: int, port: int, mode: str, folder: str) -> None:
    import deepspeed

    from dino_ray.train.engines import disable_jit_ops
    from dino_ray.train.reshard import load_zero3_resharded

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    disable_jit_ops()
    deepspeed.init_distributed(dist_backend="gloo")
    engine = _engine(world)
    if mode == "whole":
        losses = _steps(engine, rank, world, 0, 6)
    elif mode == "first":
        losses = _steps(engine, rank, world, 0, 3)
        engine.save_checkpoint(os.path.join(folder, "ds"), tag="state", client_state={"step": 3})
    else:
        client = load_zero3_resharded(engine, os.path.join(folder, "ds", "state"), rank)
        assert client["step"] == 3
        losses = _steps(engine, rank, world, 3, 6)
    if rank == 0:
        with open(os.path.join(folder, f"{mode}-{world}.json"), "w") as f:
            json.dump(losses, f)


def _run(world: int, mode: str, folder) -> list[float]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, mode, str(folder)), nprocs=world, join=True)
    return json.loads((folder / f"{mode}-{world}.json").read_text())


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_zero3_checkpoint_continues_on_another_number_of_ranks(tmp_path, before, after):
    whole = _run(before, "whole", tmp_path)
    first = _run(before, "first", tmp_path)
    resumed = _run(after, "resume", tmp_path)
    assert first == pytest.approx(whole[:3], rel=1e-6)
    assert resumed == pytest.approx(whole[3:], rel=1e-5), (whole, resumed)
    assert resumed[1] != pytest.approx(resumed[0], rel=1e-3)  # it keeps learning: the steps differ
