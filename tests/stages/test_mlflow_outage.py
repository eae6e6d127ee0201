"""MLflow going away mid-run, against a real MLflow server stopped and started again on the same port
and the same sqlite store: training carries on, no step's metrics are lost or logged twice, and a stage's
own error is never replaced by an MLflow one."""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from dino_ray.config.loader import load_job
from dino_ray.pipeline import Pipeline, StageFailed, StageSpec
from dino_ray.train.metric_buffer import PENDING_METRICS, UNLOGGED_METRICS, MetricBuffer
from testlib import RestartableMlflowServer, free_port, pipeline_in_thread

PRESET = Path(__file__).resolve().parents[1] / "presets" / "tiny.yaml"


class MlflowServer(RestartableMlflowServer):
    """The shared real server, plus a plain-REST metric query that polls safely while training runs."""

    def steps(self, run_id: str, key: str) -> list[int]:
        """The steps MLflow holds for ``key`` (plain REST with a short timeout: polled while training runs)."""
        query = urllib.parse.urlencode({"run_id": run_id, "metric_key": key})
        with urllib.request.urlopen(f"{self.uri}/api/2.0/mlflow/metrics/get-history?{query}", timeout=5) as r:
            return sorted(int(m.get("step", 0)) for m in json.load(r).get("metrics", []))


@pytest.fixture
def restartable_mlflow(tmp_path):
    server = MlflowServer(tmp_path / "mlflow")
    server.root.mkdir()
    server.start()
    yield server
    server.stop()


def _row(step: int) -> dict[str, float]:
    return {"total_loss": 10.0 - step / 10, "lr": 1e-3 * step}


def _json(path: Path, missing=None):
    """The JSON file's content, or ``missing`` (default {}) while it does not exist or is being written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {} if missing is None else missing


def _warnings(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def test_flush_to_an_unreachable_server_is_quick_keeps_the_newest_rows_and_warns_once(caplog, tmp_path):
    """Nothing listens on the port: MLflow's default retries would hold each flush for minutes and then
    raise; the buffer's flush returns False at once, keeps the rows up to its bound and warns once."""
    uri = f"http://127.0.0.1:{free_port()}"
    buffer = MetricBuffer(uri, "0" * 32, enabled=True, max_rows=5)
    caplog.set_level(logging.INFO)
    for step in (1, 2, 3):
        buffer.add(step, _row(step))
    start = time.monotonic()
    assert buffer.flush() is False
    assert buffer.flush() is False
    assert time.monotonic() - start < 10  # two flushes; default retries: about 4 minutes each
    assert [s for s, _ in buffer.rows] == [1, 2, 3]

    for step in range(4, 9):
        buffer.add(step, _row(step))
    assert [s for s, _ in buffer.rows] == [4, 5, 6, 7, 8]  # the oldest went first
    assert buffer.dropped == 3
    assert buffer.flush() is False
    buffer.restore([(2, _row(2))])  # a resumed worker's rows: no get_metric_history error either
    assert [s for s, _ in buffer.rows] == [4, 5, 6, 7, 8]  # still bounded: the restored row is the oldest

    [warning] = _warnings(caplog, "is unreachable")
    assert buffer.uri in warning.getMessage() and "Connection refused" in warning.getMessage()  # where, why
    assert len(_warnings(caplog, "dropping the oldest")) == 1

    # The end of training: nothing reachable, so the rows go to a file instead of being lost.
    out = tmp_path / UNLOGGED_METRICS

    def save(data: bytes) -> str:
        out.write_bytes(data)
        return str(out)

    where = buffer.close(save=save, wait_s=0)
    assert where == str(out)
    saved = json.loads(out.read_text())
    assert [s for s, _ in saved["rows"]] == [4, 5, 6, 7, 8] and saved["dropped"] == 4
    assert saved["rows"][0][1] == _row(4)
    assert len(_warnings(caplog, "is unreachable")) == 1  # one warning for the whole outage


def test_rows_held_through_an_outage_are_logged_once_when_the_server_returns(restartable_mlflow, caplog):
    """Stop the server, keep logging, take over a 'restarted worker's' checkpoint rows that overlap what
    MLflow has, start the server again: every step is in MLflow exactly once."""
    import mlflow

    server = restartable_mlflow
    caplog.set_level(logging.INFO)
    client = mlflow.MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("outage-unit")).info.run_id
    buffer = MetricBuffer(server.uri, run_id, enabled=True)
    for step in range(1, 5):
        buffer.add(step, _row(step))
    buffer.flush()
    assert server.steps(run_id, "total_loss") == [1, 2, 3, 4]

    server.stop()
    for step in range(5, 9):
        buffer.add(step, _row(step))
    assert buffer.flush() is False
    # A restarted worker resumes from a checkpoint whose rows 3..6 were (partly) logged before it died.
    resumed = MetricBuffer(server.uri, run_id, enabled=True)
    resumed.restore([(s, _row(s)) for s in range(3, 7)])
    assert [s for s, _ in resumed.rows] == [3, 4, 5, 6]

    server.start()
    assert resumed.flush() is True
    assert buffer.flush() is True  # 5 and 6 are in MLflow now: only 7 and 8 are new
    assert server.steps(run_id, "total_loss") == list(range(1, 9))
    assert server.steps(run_id, "lr") == list(range(1, 9))
    assert [r.getMessage() for r in _warnings(caplog, "reachable again")] == [
        f"MLflow reachable again at {server.uri}, flushed 4 rows"] * 2  # one line per buffer's outage


def test_a_failing_stage_keeps_its_own_error_when_mlflow_is_down(restartable_mlflow, tmp_path, caplog):
    """The stage raises after MLflow went away: the pipeline's attempt to mark the runs FAILED fails too,
    and must neither replace the stage's error nor hold it back for minutes of retries."""
    server = restartable_mlflow

    def failing_stage(job, ctx):
        server.stop()
        raise ValueError("the stage's own error")

    job = load_job(PRESET, [f"output_root={tmp_path / 'out'}", "stages=[pretrain]",
                            f"pretrain.data.source.uri={tmp_path}", f"tracking.tracking_uri={server.uri}"])
    pipeline = Pipeline(job, registry={"pretrain": StageSpec("pretrain", failing_stage)}, ensure_ray=lambda: None)
    caplog.set_level(logging.INFO)
    start = time.monotonic()
    with pytest.raises(StageFailed, match="the stage's own error") as failure:
        pipeline.run()
    assert time.monotonic() - start < 60
    assert isinstance(failure.value.__cause__, ValueError)
    assert len(_warnings(caplog, "could not mark MLflow run")) == 2  # the stage's run and the parent run


@pytest.mark.slow
def test_pretrain_survives_an_mlflow_outage_and_logs_every_step_once(ray_session, cifar10_dir, tmp_path,
                                                                     restartable_mlflow):
    """The real server is stopped after the first steps reach it and started again two checkpoints later.
    With ``max_failures=0`` a flush that raised would fail the stage at once; instead training finishes and
    MLflow holds every step 1..total exactly once."""
    server = restartable_mlflow
    total = 48
    job = load_job(PRESET, [f"output_root={tmp_path / 'out'}", "stages=[pretrain]",
                            f"pretrain.data.source.uri={cifar10_dir / 'train'}", f"tracking.tracking_uri={server.uri}",
                            f"pretrain.schedule.total_iters={total}", "pretrain.train.checkpoint_every=2",
                            "pretrain.train.log_every=1", "pretrain.train.batch_size_per_worker=8",
                            "pretrain.train.scaling.num_workers=1", "pretrain.train.max_failures=0",
                            "pretrain.train.keep_checkpoints=100",
                            # 48 steps are too few to get below ln(K): the collapse alarm would fire, and its
                            # MLflow tag (train/watch.py) still waits out MLflow's default retries (minutes).
                            "pretrain.train.collapse.enabled=false"])
    stage_dir = Path(job.output_root) / "pretrain"
    ckpts = stage_dir / "ray_train" / "pretrain"

    def checkpoints() -> list[int]:
        return sorted(int(p.name[5:]) for p in ckpts.glob("step_*")) if ckpts.is_dir() else []

    def wait_for(what: str, ready, timeout: float = 600):
        deadline = time.time() + timeout
        while thread.is_alive() and time.time() < deadline:
            value = ready()
            if value:
                return value
            time.sleep(0.2)
        value = ready()
        assert value, f"{what}: not seen before the stage ended or {timeout} s passed ({errors})"
        return value

    thread, errors = pipeline_in_thread(job)
    try:
        run_id = wait_for("the stage's MLflow run", lambda: _json(stage_dir / "_run.json").get("run_id"))
        wait_for("the first steps in MLflow", lambda: server.steps(run_id, "total_loss"))
        server.stop()
        before = checkpoints()
        # Two checkpoints written after the stop: the flush after the first of them failed for sure.
        c1, c2 = wait_for("two checkpoints during the outage",
                          lambda: [s for s in checkpoints() if s not in before][:2]
                          if len([s for s in checkpoints() if s not in before]) >= 2 else None)
        server.start()  # takes seconds; training goes on meanwhile, and takes it back at a later flush
        held = [step for step, _ in wait_for(f"the pending metrics of checkpoint {c2}",
                                             lambda: _json(ckpts / f"step_{c2:09d}" / PENDING_METRICS).get("rows"))]
        assert c1 in held and c2 in held, held  # rows MLflow did not take travel on in the next checkpoint
        assert held == list(range(held[0], c2 + 1)), held
    finally:
        if server.proc is None:
            server.start()
    thread.join(timeout=900)
    assert not thread.is_alive()
    assert not errors, errors
    assert (stage_dir / "_manifest.json").exists()
    assert server.steps(run_id, "total_loss") == list(range(1, total + 1))  # nothing lost, nothing twice
    assert not (ckpts / UNLOGGED_METRICS).exists()  # MLflow was back before training ended
