"""Rank 0's metric rows reach MLflow exactly once, also when a run resumes from an earlier checkpoint."""

from __future__ import annotations

import mlflow

from dino_ray.train.metric_buffer import MetricBuffer


def _steps(uri: str, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


def test_a_resumed_run_does_not_log_again_what_the_stopped_attempt_logged(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("buffer")).info.run_id
    stopped = MetricBuffer(uri, run_id, enabled=True)
    for step in range(1, 9):  # checkpoints at 4 and 8; the attempt dies after flushing step 8
        stopped.add(step, {"loss": 1.0 / step})
        if step % 4 == 0:
            assert stopped.flush()
    resumed = MetricBuffer(uri, run_id, enabled=True)  # Ray Train resumed it from the step-4 checkpoint
    resumed.expect_logged()
    for step in range(5, 13):
        resumed.add(step, {"loss": 1.0 / step, "new_key": 0.5})
        if step % 4 == 0:
            assert resumed.flush()
    assert _steps(uri, run_id) == list(range(1, 13))
    assert _steps(uri, run_id, "new_key") == list(range(5, 13))  # keys the stopped attempt never had
    assert not resumed._check_logged  # the flush of steps 9-12 found none of them there: checks stop


def test_without_the_resume_check_the_steps_would_be_logged_twice(tmp_path):
    """The check above is what keeps them single: the same sequence without it duplicates steps 5-8."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("buffer")).info.run_id
    for first, last in ((1, 8), (5, 8)):
        buffer = MetricBuffer(uri, run_id, enabled=True)
        for step in range(first, last + 1):
            buffer.add(step, {"loss": 1.0})
        buffer.flush()
    assert _steps(uri, run_id) == [1, 2, 3, 4, 5, 5, 6, 6, 7, 7, 8, 8]
