"""Pretrain on Ray Train + DeepSpeed ZeRO-3 with real workers: equivalence, fault recovery, resume."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from dino_ray import backbone_io, storage
from dino_ray.config.loader import load_job
from dino_ray.pipeline import Pipeline

pytestmark = pytest.mark.slow
PRESET = Path(__file__).resolve().parents[1] / "presets" / "tiny.yaml"


def pretrain_job(tmp_path, images: Path, name: str, *overrides: str):
    return load_job(PRESET, [f"output_root={tmp_path / name}", "stages=[pretrain]",
                             f"pretrain.data.source.uri={images}",
                             f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", *overrides])


def metric_steps(job, name: str) -> list[tuple[int, float]]:
    import mlflow

    manifest = storage.read_json(os.path.join(job.output_root, "pretrain", "_manifest.json"))
    client = mlflow.MlflowClient(job.tracking.tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(manifest["mlflow_run_id"], name))


def test_two_zero3_workers_match_one_worker_on_the_same_global_batch(ray_session, cifar10_dir, tmp_path):
    common = ("pretrain.model.drop_path_rate=0.0", "pretrain.schedule.total_iters=2",
              "pretrain.train.checkpoint_every=2")
    one = pretrain_job(tmp_path, cifar10_dir / "train", "one", *common,
                       "pretrain.train.batch_size_per_worker=16", "pretrain.train.scaling.num_workers=1")
    two = pretrain_job(tmp_path, cifar10_dir / "train", "two", *common,
                       "pretrain.train.batch_size_per_worker=8", "pretrain.train.scaling.num_workers=2",
                       "pretrain.train.scaling.cpus_per_worker=0.5")
    Pipeline(one, ensure_ray=lambda: None).run()
    Pipeline(two, ensure_ray=lambda: None).run()
    # KoLeo is computed per rank on the local batch (as in DINOv2), so it is not compared.
    for name in ("dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss"):
        a, b = metric_steps(one, name)[0], metric_steps(two, name)[0]
        assert a[0] == b[0] == 1
        assert b[1] == pytest.approx(a[1], rel=1e-4, abs=1e-5), name


def _train_worker_pids() -> list[int]:
    """PIDs of this session's live Ray Train workers: children of our raylet (other Ray instances may run)."""
    import psutil
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    pids = []
    for raylet in psutil.process_iter(["cmdline"]):
        cmd = " ".join(raylet.info.get("cmdline") or [])
        if "raylet" in cmd and session in cmd:
            for child in raylet.children():
                try:
                    if "RayTrainWorker" in " ".join(child.cmdline()):
                        pids.append(child.pid)
                except psutil.NoSuchProcess:  # also a killed worker not yet reaped (a zombie)
                    continue
    return sorted(pids)


def test_killed_worker_resumes_from_checkpoint_without_losing_or_repeating_steps(ray_session, cifar10_dir, tmp_path):
    import signal

    job = pretrain_job(tmp_path, cifar10_dir / "train", "fault", "pretrain.schedule.total_iters=24",
                       "pretrain.train.checkpoint_every=4", "pretrain.train.batch_size_per_worker=8",
                       "pretrain.train.scaling.num_workers=2", "pretrain.train.scaling.cpus_per_worker=0.5",
                       "pretrain.train.max_failures=2")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            Pipeline(job, ensure_ray=lambda: None).run()
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    first_ckpt = Path(job.output_root) / "pretrain" / "ray_train" / "pretrain" / "step_000000004"
    deadline = time.time() + 600
    while not first_ckpt.exists() and thread.is_alive() and time.time() < deadline:
        time.sleep(0.2)
    assert first_ckpt.exists(), f"no checkpoint appeared: {errors}"
    victims = _train_worker_pids()
    assert len(victims) == 2, victims
    os.kill(victims[-1], signal.SIGKILL)
    thread.join(timeout=900)
    assert not errors, errors
    steps = [s for s, _ in metric_steps(job, "total_loss")]
    assert steps == list(range(1, 25)), steps  # nothing lost, nothing logged twice
    assert victims[-1] not in _train_worker_pids()

    # The exported teacher is a plain, world-size-independent state dict that loads strictly.
    model = backbone_io.load_backbone(os.path.join(job.output_root, "pretrain", "teacher"))
    assert model.embed_dim == 96 and len(model.blocks) == 4

    # Re-running the finished stage is a no-op.
    manifest = storage.read_json(os.path.join(job.output_root, "pretrain", "_manifest.json"))
    start = time.time()
    again = Pipeline(job, ensure_ray=lambda: None).run()
    assert again["pretrain"]["token"] == manifest["token"]
    assert time.time() - start < 10
