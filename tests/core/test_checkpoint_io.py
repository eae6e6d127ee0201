"""Checkpoints are read without unpickling code: a crafted file fails, DeepSpeed's own records load."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from dino_ray.train.checkpoint_io import load_weights_only


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_crafted_checkpoint_does_not_run_code(tmp_path):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _RunsCode(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_weights_only(str(path))
    assert not os.path.exists(marker)
    torch.load(path, weights_only=False)  # what DeepSpeed's own loader does: the code runs
    assert os.path.exists(marker)


def test_deepspeed_records_and_tensors_load(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "state.pt"
    torch.save({"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0), "w": torch.ones(3),
                "ds_version": "0.x", "step": 7}, path)
    state = load_weights_only(str(path))
    assert state["zero_stage"] == ZeroStageEnum.weights and state["step"] == 7
    assert isinstance(state["loss_scaler"], LossScaler) and torch.equal(state["w"], torch.ones(3))
