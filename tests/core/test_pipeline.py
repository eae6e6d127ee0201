"""The chain's skip / resume / force / failure logic, with small test stages and a real MLflow store."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from dino_ray import storage
from dino_ray.config.typed import ConfigError, bounded
from dino_ray.pipeline import Pipeline, StageFailed, StageResult, StageSpec


@dataclasses.dataclass
class Section:
    value: int = 1
    fail: bool = False
    log_every: int = bounded(10, ge=1, operational=True)  # how a stage runs, not what it computes


@dataclasses.dataclass
class Tracking:
    tracking_uri: str | None = None
    experiment: str = "test-pipeline"
    run_name: str | None = None


@dataclasses.dataclass
class Job:
    output_root: str
    stages: list = dataclasses.field(default_factory=lambda: ["a", "b", "c"])
    name: str = "test"
    seed: int = 0
    tracking: Tracking = dataclasses.field(default_factory=Tracking)
    a: Section = dataclasses.field(default_factory=Section)
    b: Section = dataclasses.field(default_factory=Section)
    c: Section = dataclasses.field(default_factory=Section)

    def stage_names(self):
        return ["a", "b", "c"]


CALLS: list[str] = []


def _stage(name):
    def run(job, ctx):
        CALLS.append(name)
        section = getattr(job, name)
        if section.fail:
            raise RuntimeError(f"{name} broke on purpose")
        upstream = {k: storage.read_bytes(v["data"]).decode() for k, v in ctx.upstream.items()}
        out = ctx.path("data.txt")
        storage.write_bytes(out, json.dumps({"value": section.value, "up": upstream}).encode())
        return StageResult(outputs={"data": out}, summary={"value": section.value})
    return run


REGISTRY = {
    "a": StageSpec("a", _stage("a")),
    "b": StageSpec("b", _stage("b"), needs=lambda job: ["a"]),
    "c": StageSpec("c", _stage("c"), needs=lambda job: ["b"]),
}


@pytest.fixture
def job(tmp_path):
    CALLS.clear()
    return Job(output_root=str(tmp_path / "out"),
               tracking=Tracking(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"))


def test_runs_then_skips_everything(job):
    Pipeline(job, REGISTRY).run()
    assert CALLS == ["a", "b", "c"]
    CALLS.clear()
    Pipeline(job, REGISTRY).run()
    assert CALLS == []


def test_changed_config_reruns_stage_and_downstream_only(job):
    Pipeline(job, REGISTRY).run()
    CALLS.clear()
    job.b.value = 7
    Pipeline(job, REGISTRY).run()
    assert CALLS == ["b", "c"]


def test_deleted_output_reruns_it_and_downstream(job):
    Pipeline(job, REGISTRY).run()
    CALLS.clear()
    storage.delete(os.path.join(job.output_root, "b"))
    Pipeline(job, REGISTRY).run()
    assert CALLS == ["b", "c"]


def test_force_reruns_stage_and_downstream(job):
    Pipeline(job, REGISTRY).run()
    # what a finished training stage leaves behind: checkpoints a same-key retry would resume from
    leftover = os.path.join(job.output_root, "a", "ray_train", "step_000000012", "state.pt")
    storage.write_bytes(leftover, b"checkpoint")
    CALLS.clear()
    Pipeline(job, REGISTRY).run(force=["a"])
    assert CALLS == ["a", "b", "c"]
    assert not storage.exists(leftover)  # forced means from scratch, not resumed from the last run's end
    assert _moved_aside(job, "a", "ray_train/step_000000012/state.pt") == [b"checkpoint"]  # ... yet not deleted


def _moved_aside(job, stage: str, relative: str) -> list[bytes]:
    """The contents of ``relative`` in every earlier output folder of ``stage`` kept under .replaced/."""
    root = os.path.join(job.output_root, ".replaced")
    folders = sorted(d for d in os.listdir(root) if d.startswith(f"{stage}-")) if os.path.isdir(root) else []
    return [storage.read_bytes(os.path.join(root, d, relative)) for d in folders
            if storage.exists(os.path.join(root, d, relative))]


def test_operational_settings_do_not_rerun_or_replace_a_stage(job):
    Pipeline(job, REGISTRY).run()
    CALLS.clear()
    job.a.log_every = 50  # e.g. log_every, checkpoint_every, the monitor: nothing the stage computes changes
    Pipeline(job, REGISTRY).run()
    assert CALLS == []
    assert not os.path.exists(os.path.join(job.output_root, ".replaced"))


def test_a_folder_the_pipeline_did_not_write_is_left_alone(job):
    thesis = os.path.join(job.output_root, "b", "thesis.tex")
    storage.write_bytes(thesis, b"\\documentclass{article}")
    with pytest.raises(ConfigError, match=r"holds files dino-ray did not write \(thesis.tex\)"):
        Pipeline(job, REGISTRY).run()
    assert CALLS == []  # refused before any stage ran
    assert storage.read_bytes(thesis) == b"\\documentclass{article}"


def test_failure_stops_chain_keeps_outputs_and_resumes(job):
    job.b.fail = True
    with pytest.raises(StageFailed, match="'b' failed: RuntimeError: b broke on purpose"):
        Pipeline(job, REGISTRY).run()
    assert CALLS == ["a", "b"]
    assert storage.exists(os.path.join(job.output_root, "a", "_manifest.json"))
    assert not storage.exists(os.path.join(job.output_root, "b", "_manifest.json"))
    CALLS.clear()
    job.b.fail = False  # the fix changes b's config: only b and c run, a is kept
    Pipeline(job, REGISTRY).run()
    assert CALLS == ["b", "c"]


def test_single_stage_job_needs_completed_upstream(job):
    job.stages = ["c"]
    with pytest.raises(ConfigError, match="stage 'c' reads the output of stage 'b'"):
        Pipeline(job, REGISTRY).run()
    assert CALLS == []


def test_unknown_stage_and_force_are_config_errors(job):
    job.stages = ["a", "x"]
    with pytest.raises(ConfigError, match=r"unknown stage\(s\) \['x'\]"):
        Pipeline(job, REGISTRY)
    job.stages = ["a"]
    with pytest.raises(ConfigError, match="--force names unknown"):
        Pipeline(job, REGISTRY).run(force=["nope"])


def test_mlflow_nesting_on_real_server(job, mlflow_server):
    import mlflow

    job.tracking.tracking_uri = mlflow_server
    manifests = Pipeline(job, REGISTRY).run()
    client = mlflow.MlflowClient(mlflow_server)
    parent = json.loads(open(os.path.join(job.output_root, "_pipeline.json")).read())["parent_run_id"]
    children = client.search_runs([client.get_experiment_by_name("test-pipeline").experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in children) == ["a", "b", "c"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.info.run_id for r in children} == {m["mlflow_run_id"] for m in manifests.values()}
    assert client.get_run(parent).info.status == "FINISHED"
    assert "version.mlflow" in client.get_run(parent).data.tags
    assert client.get_run(children[0].info.run_id).data.params["seed"] == "0"
    # a second run of the same output root continues the same parent run
    job.c.value = 3
    Pipeline(job, REGISTRY).run()
    again = json.loads(open(os.path.join(job.output_root, "_pipeline.json")).read())["parent_run_id"]
    assert again == parent


def test_changed_stage_starts_clean_but_a_retry_keeps_its_files(job):
    Pipeline(job, REGISTRY).run()
    leftover = os.path.join(job.output_root, "b", "checkpoint_from_old_config")
    storage.write_bytes(leftover, b"stale")
    job.b.value = 5  # new key: stale state must not be resumed
    Pipeline(job, REGISTRY).run()
    assert not storage.exists(leftover)
    assert _moved_aside(job, "b", "checkpoint_from_old_config") == [b"stale"]  # moved aside, not deleted
    job.c.fail = True
    with pytest.raises(StageFailed):
        Pipeline(job, REGISTRY).run()
    partial = os.path.join(job.output_root, "c", "partial_checkpoint")
    storage.write_bytes(partial, b"resume me")
    with pytest.raises(StageFailed):
        Pipeline(job, REGISTRY).run()  # same config: a retry of the same key keeps its files
    assert storage.exists(partial)


def test_console_says_why_each_stage_runs(job):
    import io
    import re

    from dino_ray.console import Console

    def run(**kwargs):
        out = io.StringIO()
        try:
            Pipeline(job, REGISTRY, events=Console(out, tty=False)).run(**kwargs)
        except StageFailed:
            pass
        # "b         running: new" -> ("b", "running: new"); the durations vary
        return [tuple(re.sub(r" in \d+ s.*| after \d+ s.*", "", line).split(None, 1))
                for line in out.getvalue().splitlines()]

    assert run() == [("a", "running: new"), ("a", "done"), ("b", "running: new"), ("b", "done"),
                     ("c", "running: new"), ("c", "done")]
    assert run() == [(s, "up to date, skipped") for s in "abc"]
    job.b.value = 7
    assert run()[1:] == [("b", "running: config changed"), ("b", "done"),
                         ("c", "running: input changed (b re-ran)"), ("c", "done")]
    assert run(force=["c"])[2:] == [("c", "running: forced (--force)"), ("c", "done")]
    job.c.fail = True
    assert run()[2:] == [("c", "running: config changed"), ("c", "failed")]
    assert run()[2:] == [("c", "running: resumed from a failed run"), ("c", "failed")]
    job.c.fail = False
    assert run()[2:] == [("c", "running: config changed since a failed run"), ("c", "done")]
    storage.delete(os.path.join(job.output_root, "b"))
    assert run()[1:] == [("b", "running: new"), ("b", "done"), ("c", "running: input changed (b re-ran)"),
                         ("c", "done")]


def test_replaced_outputs_move_aside_on_s3_too(job, s3_bucket):
    job.output_root = f"{s3_bucket}/run"
    Pipeline(job, REGISTRY).run()
    ckpt = f"{job.output_root}/a/ray_train/step_000000004/state.pt"
    storage.write_bytes(ckpt, b"weights")
    job.a.value = 2
    Pipeline(job, REGISTRY).run()
    assert not storage.exists(ckpt)
    kept = [u for u in storage.list_files(f"{job.output_root}/.replaced") if u.endswith("step_000000004/state.pt")]
    assert len(kept) == 1 and storage.read_bytes(kept[0]) == b"weights"


def _nan_stage(job, ctx):
    from dino_ray.pipeline import NonRetryableError

    CALLS.append("t")
    storage.write_bytes(ctx.path("ray_train", "t", "step_000000004", "state"), b"weights")
    if job.a.fail:
        raise NonRetryableError("non-finite loss at step 4")
    out = ctx.path("teacher.txt")
    storage.write_bytes(out, str(job.a.value).encode())
    return StageResult(outputs={"data": out})


TRAINING = {"a": StageSpec("a", _nan_stage, resumable=("ray_train",))}


def test_a_non_retryable_failure_is_not_replayed_by_a_retried_job(job):
    """A NaN replayed on fresh clusters by each RayJob retry: now the retry fails at once with the same message."""
    job.stages, job.a.fail = ["a"], True
    with pytest.raises(StageFailed, match="non-finite loss"):
        Pipeline(job, TRAINING).run()
    assert CALLS == ["t"]
    with pytest.raises(StageFailed, match="already failed this way.*--force a"):
        Pipeline(job, TRAINING).run()  # the retry of the same job: the stage is not run again
    assert CALLS == ["t"]
    with pytest.raises(StageFailed, match="non-finite loss at step 4$"):
        Pipeline(job, TRAINING).run(force=["a"])  # asked for explicitly: it runs
    assert CALLS == ["t", "t"]
    job.a.fail, job.a.value = False, 2  # the fix: a new config runs, and the record of the failure goes
    Pipeline(job, TRAINING).run()
    assert CALLS == ["t", "t", "t"]
    assert not os.path.exists(os.path.join(job.output_root, "a", "_failed.json"))


def test_resume_from_checkpoint_keeps_training_state_and_moves_the_rest(job, caplog):
    job.stages = ["a"]
    Pipeline(job, TRAINING).run()
    stage = os.path.join(job.output_root, "a")
    job.a.value = 2  # e.g. a lower learning rate after a divergence
    Pipeline(job, TRAINING).run(resume=["a"])
    assert os.path.exists(os.path.join(stage, "ray_train", "t", "step_000000004", "state"))  # kept in place
    aside = os.listdir(os.path.join(job.output_root, ".replaced"))
    assert len(aside) == 1 and os.path.exists(os.path.join(job.output_root, ".replaced", aside[0], "teacher.txt"))
    assert not os.path.exists(os.path.join(job.output_root, ".replaced", aside[0], "ray_train"))
    assert "continuing from the last checkpoint" in caplog.text and "optimizer state" in caplog.text
    job.a.value = 3  # without the flag a changed training stage starts over: its checkpoints move aside too
    Pipeline(job, TRAINING).run()
    second = sorted(set(os.listdir(os.path.join(job.output_root, ".replaced"))) - set(aside))
    assert len(second) == 1 and os.path.isdir(os.path.join(job.output_root, ".replaced", second[0], "ray_train"))


def test_resume_from_checkpoint_mistakes_fail_before_any_work(job):
    job.stages = ["a", "b"]
    registry = {**TRAINING, "b": StageSpec("b", _stage("b"), needs=lambda job: ["a"])}
    with pytest.raises(ConfigError, match="no checkpoints under"):
        Pipeline(job, registry).run(resume=["a"])
    with pytest.raises(ConfigError, match="only training stages \\(a\\)"):
        Pipeline(job, registry).run(resume=["b"])
    with pytest.raises(ConfigError, match="contradict"):
        Pipeline(job, registry).run(resume=["a"], force=["a"])
    assert CALLS == []


def test_config_a_stage_reads_from_another_section_reruns_it(job):
    """``StageSpec.reads``: c also reads a's section; changing it re-runs c even with a's output unchanged
    (a is not c's upstream here)."""
    registry = {**REGISTRY, "c": StageSpec("c", _stage("c"), needs=lambda job: ["b"],
                                           reads=lambda job: {"a.value": job.a.value})}
    Pipeline(job, registry).run()
    CALLS.clear()
    job.stages = ["b", "c"]
    job.a.value = 5  # a is not in this job: only c's key sees the change
    Pipeline(job, registry).run()
    assert CALLS == ["c"]


def test_the_product_stages_key_what_they_read_outside_their_section(tmp_path):
    """curate's bootstrap embedder trains with pretrain's recipe; eval decodes with curate's decode policy."""
    from dino_ray.config.loader import load_job
    from pathlib import Path

    images = tmp_path / "images"
    images.mkdir()
    preset = Path(__file__).resolve().parents[1] / "presets" / "tiny.yaml"

    def keys(*overrides: str) -> dict[str, str]:
        job = load_job(preset, [f"output_root={tmp_path / 'out'}", f"curate.pool.uri={images}", "stages=[curate, eval]",
                                f"curate.eval_sets=[{{uri: {images}}}]",
                                f"eval.datasets=[{{name: d, train: {{uri: {images}}}, test: {{uri: {images}}}}}]",
                                "eval.backbones=[]", *overrides])
        pipe = Pipeline(job)
        return {name: pipe.key(name, {}) for name in ("curate", "eval")}

    base = keys()
    assert keys("curate.decode.min_size=3")["eval"] != base["eval"]
    assert keys("pretrain.schedule.base_lr=0.01")["curate"] != base["curate"]  # bootstrap embedder's recipe
    assert keys("pretrain.train.log_every=3") == base  # operational: no re-run
    assert keys("pretrain.data.source.uri=/elsewhere")["curate"] == base["curate"]  # not what curate trains on
    with_checkpoint = keys(f"curate.embed.checkpoint={images}")
    assert keys(f"curate.embed.checkpoint={images}", "pretrain.schedule.base_lr=0.01") == with_checkpoint
