"""Pretrain on Ray Train + DeepSpeed ZeRO-3 with real workers: equivalence, fault recovery, resume."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dino_ray import backbone_io, storage
from dino_ray.config.loader import load_job
from dino_ray.pipeline import Pipeline
from testlib import pipeline_in_thread

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


def test_two_zero3_workers_match_one_worker_over_several_real_steps(ray_session, cifar10_dir, tmp_path):
    """ZeRO-3 on 2 workers (batch 8 each) against 1 worker (batch 16) on the same global batches, over 5 steps
    with a non-zero learning rate from step 1: gradient averaging, per-part clipping, the optimizer step and
    the shard-local EMA all enter the losses of steps 2-5 and the exported EMA teacher (backbone and heads).
    The two workers also recompute their blocks' activations in the backward (activation checkpointing)."""
    import torch

    # KoLeo is computed per rank on the local batch (as in DINOv2), so its gradient depends on the world size:
    # it is off here. The gradients are large enough to be clipped (norms logged per part).
    common = ("pretrain.model.drop_path_rate=0.0", "pretrain.schedule.total_iters=5",
              "pretrain.schedule.warmup_iters=1", "pretrain.schedule.base_lr=2.0e-3",
              "pretrain.schedule.lr_scaling_rule=none", "pretrain.schedule.freeze_last_layer_iters=0",
              "pretrain.schedule.clip_grad=0.5", "pretrain.loss.koleo_loss_weight=0.0",
              "pretrain.train.checkpoint_every=5")
    one = pretrain_job(tmp_path, cifar10_dir / "train", "one", *common,
                       "pretrain.train.batch_size_per_worker=16", "pretrain.train.scaling.num_workers=1")
    two = pretrain_job(tmp_path, cifar10_dir / "train", "two", *common,
                       "pretrain.train.batch_size_per_worker=8", "pretrain.train.scaling.num_workers=2",
                       "pretrain.train.scaling.cpus_per_worker=0.5",
                       # recomputing each block in the backward must not change a single number under ZeRO-3
                       "pretrain.train.activation_checkpointing=true")
    Pipeline(one, ensure_ray=lambda: None).run()
    summary = Pipeline(two, ensure_ray=lambda: None).run()["pretrain"]["summary"]
    for rank in (0, 1):  # each worker's memory, what `dino-ray plan` is checked against
        assert 0 < summary[f"memory/rank{rank}_before_models_gb"] < summary[f"memory/rank{rank}_peak_gb"] < 8
    assert [v for _, v in metric_steps(one, "lr")][:2] == pytest.approx([0.0, 2.0e-3])  # steps 2-5 learn
    assert max(v for _, v in metric_steps(one, "grad_norm/dino_head")) > 0.5  # clipping is in play
    for name in ("dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "grad_norm/backbone",
                 "grad_norm/dino_head", "grad_norm/ibot_head"):
        a, b = metric_steps(one, name), metric_steps(two, name)
        assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4, 5], name
        assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=2e-3, abs=1e-5), name
    states = [torch.load(os.path.join(j.output_root, "pretrain", "teacher", "ssl_model.pth"), weights_only=True)
              for j in (one, two)]
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-3, atol=1e-5, msg=k)


def test_a_checkpoint_resumes_on_another_number_of_workers_both_ways(ray_session, cifar10_dir, tmp_path):
    """2 ZeRO-3 workers -> 1 and 1 -> 2 (spot instances, autoscaling): steps 3-4 after the move, and the
    exported EMA teacher, match a run that never moved. Schedules are constant so that a 2-step run and
    the 4-step run it continues into train with the same values; softmax centring makes the loss carry state
    (its running centre) across the checkpoint."""
    import torch

    common = ("pretrain.model.drop_path_rate=0.0", "pretrain.loss.koleo_loss_weight=0.0",
              "pretrain.loss.centering=softmax", "pretrain.schedule.lr_scaling_rule=none",
              "pretrain.schedule.base_lr=2.0e-3", "pretrain.schedule.min_lr=2.0e-3", "pretrain.schedule.warmup_iters=0",
              "pretrain.schedule.weight_decay=0.04", "pretrain.schedule.weight_decay_end=0.04",
              "pretrain.schedule.momentum_teacher=0.9", "pretrain.schedule.final_momentum_teacher=0.9",
              "pretrain.schedule.warmup_teacher_temp=0.05", "pretrain.schedule.teacher_temp=0.05",
              "pretrain.schedule.warmup_teacher_temp_iters=0", "pretrain.schedule.freeze_last_layer_iters=0",
              "pretrain.train.checkpoint_every=2")
    workers = {1: ("pretrain.train.batch_size_per_worker=16", "pretrain.train.scaling.num_workers=1"),
               2: ("pretrain.train.batch_size_per_worker=8", "pretrain.train.scaling.num_workers=2",
                   "pretrain.train.scaling.cpus_per_worker=0.5")}
    train = cifar10_dir / "train"
    whole = pretrain_job(tmp_path, train, "whole", *common, *workers[2], "pretrain.schedule.total_iters=4")
    Pipeline(whole, ensure_ray=lambda: None).run()

    def teacher(job) -> dict:
        return torch.load(os.path.join(job.output_root, "pretrain", "teacher", "ssl_model.pth"), weights_only=True)

    for before, after in ((2, 1), (1, 2)):
        name = f"moved_{before}_to_{after}"
        first = pretrain_job(tmp_path, train, name, *common, *workers[before], "pretrain.schedule.total_iters=2")
        Pipeline(first, ensure_ray=lambda: None).run()
        moved = pretrain_job(tmp_path, train, name, *common, *workers[after], "pretrain.schedule.total_iters=4")
        Pipeline(moved, ensure_ray=lambda: None).run(resume=["pretrain"])
        summary = storage.read_json(os.path.join(moved.output_root, "pretrain", "_manifest.json"))["summary"]
        assert summary["resumed_at_step"] == 2 and summary["steps"] == 4, summary
        for metric in ("dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss"):
            expected = [v for s, v in metric_steps(whole, metric) if s > 2]
            got = metric_steps(moved, metric)
            assert [s for s, _ in got] == [3, 4], (name, metric)
            assert [v for _, v in got] == pytest.approx(expected, rel=2e-3, abs=1e-5), (name, metric)
        reference, state = teacher(whole), teacher(moved)
        for key in reference:
            torch.testing.assert_close(state[key], reference[key], rtol=1e-3, atol=1e-5, msg=f"{name}: {key}")


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
    earlier = set(_train_worker_pids())  # workers of earlier tests' runs may still be alive
    thread, errors = pipeline_in_thread(job)
    # The second checkpoint's folder: by then Ray Train has registered the first one (a kill right after the
    # first folder appears may come before that, and the restarted group then rightly starts from step 0).
    first_ckpt = Path(job.output_root) / "pretrain" / "ray_train" / "pretrain" / "step_000000008"
    deadline = time.time() + 600
    while not first_ckpt.exists() and thread.is_alive() and time.time() < deadline:
        time.sleep(0.2)
    assert first_ckpt.exists(), f"no checkpoint appeared: {errors}"
    victims = sorted(set(_train_worker_pids()) - earlier)  # this run's two workers
    assert len(victims) == 2, victims
    os.kill(victims[-1], signal.SIGKILL)
    thread.join(timeout=900)
    assert not errors, errors
    steps = [s for s, _ in metric_steps(job, "total_loss")]
    assert steps == list(range(1, 25)), steps  # nothing lost, nothing logged twice
    # The finishing attempt started from a checkpoint the killed run wrote, not from step 0.
    summary = storage.read_json(os.path.join(job.output_root, "pretrain", "_manifest.json"))["summary"]
    assert summary["resumed_at_step"] in (4, 8, 12, 16, 20), summary

    # The exported teacher is a plain, world-size-independent state dict that loads strictly.
    model = backbone_io.load_backbone(os.path.join(job.output_root, "pretrain", "teacher"))
    assert model.embed_dim == 96 and len(model.blocks) == 4

    # Re-running the finished stage is a no-op.
    manifest = storage.read_json(os.path.join(job.output_root, "pretrain", "_manifest.json"))
    start = time.time()
    again = Pipeline(job, ensure_ray=lambda: None).run()
    assert again["pretrain"]["token"] == manifest["token"]
    assert time.time() - start < 10


def test_broken_recipe_raises_the_collapse_alarm_and_stops_with_its_checkpoint(ray_session, cifar10_dir, tmp_path):
    """A teacher so soft (temperature 10) that its targets are uniform: the DINO loss cannot get below
    ln(K). The alarm must fire in plain words, tag the run, and with on_collapse=stop end the stage at
    that step with the step's checkpoint kept. The monitor runs under two ZeRO-3 workers meanwhile."""
    import mlflow

    job = pretrain_job(tmp_path, cifar10_dir / "train", "broken", "pretrain.schedule.total_iters=16",
                       "pretrain.model.layerscale_init=1.0",  # the CPU preset's init: only the temperature is off
                       "pretrain.schedule.teacher_temp=10.0", "pretrain.schedule.warmup_teacher_temp=10.0",
                       "pretrain.schedule.warmup_teacher_temp_iters=0", "pretrain.schedule.warmup_iters=1",
                       "pretrain.train.batch_size_per_worker=8", "pretrain.train.scaling.num_workers=2",
                       "pretrain.train.scaling.cpus_per_worker=0.5", "pretrain.train.checkpoint_every=100",
                       "pretrain.train.on_collapse=stop", "pretrain.train.collapse.window=2",
                       "pretrain.train.collapse.check_after_fraction=0.25",
                       f"pretrain.monitor.train.uri={cifar10_dir / 'train'}", "pretrain.monitor.train.max_images=200",
                       f"pretrain.monitor.test.uri={cifar10_dir / 'test'}", "pretrain.monitor.test.max_images=100",
                       "pretrain.monitor.train.labels_from_folders=true",
                       "pretrain.monitor.test.labels_from_folders=true", "pretrain.monitor.every=4",
                       "pretrain.monitor.pca_images=2")
    with pytest.raises(Exception, match="collapse alarm") as failure:
        Pipeline(job, ensure_ray=lambda: None).run()
    assert "teacher_temp" in str(failure.value)  # says what usually fixes it

    client = mlflow.MlflowClient(job.tracking.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name(job.tracking.experiment).experiment_id],
                             "tags.`dino_ray.stage` = 'pretrain'")[0]
    assert run.data.tags.get("dino_ray.collapse_alarm") == "uniform_targets"
    assert "ln(K)" in run.data.tags["dino_ray.alarm.uniform_targets"]
    stop_step = int(run.data.tags["dino_ray.alarm.uniform_targets"].split("step ")[1].split(":")[0])
    assert 4 <= stop_step < 16
    ckpt = Path(job.output_root) / "pretrain" / "ray_train" / "pretrain" / f"step_{stop_step:09d}"
    assert ckpt.is_dir(), sorted(p.name for p in ckpt.parent.iterdir())

    def history(name: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))

    ratio = history("collapse/dino_loss_over_lnk")
    assert ratio and all(v > 0.99 for _, v in ratio[2:])
    assert [s for s, _ in history("monitor/knn_top1")][:2] == [0, 4]
    assert all(0.0 <= v <= 1.0 for _, v in history("monitor/linear_top1"))
    assert history("monitor/pixels_knn_top1")[0][1] > 0.1  # 10 classes: raw pixels beat chance
    assert history("collapse/cls_effective_rank")
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("monitor_pca" in p for p in images), images


def test_resume_from_checkpoint_continues_a_changed_schedule_and_counts_skipped_images(ray_session, cifar10_dir,
                                                                                       tmp_path):
    """After a change of schedule the user may continue instead of starting over; the stream's skipped images
    (here: files that are not images) are counted in the summary, across the resume too."""
    import shutil

    import mlflow

    from dino_ray.pipeline import StageFailed

    images = tmp_path / "images"
    images.mkdir()
    for src in sorted((cifar10_dir / "train" / "airplane").glob("*.jpg"))[:40]:
        shutil.copy(src, images / src.name)
    for i in range(8):
        (images / f"bad_{i}.jpg").write_bytes(b"not a jpeg at all")
    common = ("pretrain.train.checkpoint_every=2", "pretrain.train.batch_size_per_worker=8",
              "pretrain.train.scaling.num_workers=1", "pretrain.train.log_every=1")
    first = pretrain_job(tmp_path, images, "resume", *common, "pretrain.schedule.total_iters=4")
    Pipeline(first, ensure_ray=lambda: None).run()
    summary = storage.read_json(os.path.join(first.output_root, "pretrain", "_manifest.json"))["summary"]
    assert summary["steps"] == 4 and summary["skipped_images"] > 0 and summary["resumed_at_step"] == 0
    assert set(summary["skipped_by_reason"]) == {"not_an_image"}

    longer = pretrain_job(tmp_path, images, "resume", *common, "pretrain.schedule.total_iters=6",
                          "pretrain.schedule.base_lr=0.0005")
    Pipeline(longer, ensure_ray=lambda: None).run(resume=["pretrain"])
    manifest = storage.read_json(os.path.join(longer.output_root, "pretrain", "_manifest.json"))
    assert manifest["summary"]["steps"] == 6 and manifest["summary"]["resumed_at_step"] == 4
    assert manifest["summary"]["skipped_images"] >= summary["skipped_images"]  # counted since step 0
    steps = [s for s, _ in metric_steps(longer, "total_loss")]
    assert steps == [5, 6], steps  # continued at step 5: steps 1-4 were not trained again
    run = mlflow.MlflowClient(longer.tracking.tracking_uri).get_run(manifest["mlflow_run_id"])
    assert float(run.data.params["pretrain.schedule.base_lr"]) == 0.0005  # the new schedule is the run's

    shorter = pretrain_job(tmp_path, images, "resume", *common, "pretrain.schedule.total_iters=3")
    with pytest.raises(StageFailed, match="step 6, past schedule.total_iters=3"):
        Pipeline(shorter, ensure_ray=lambda: None).run(resume=["pretrain"])
