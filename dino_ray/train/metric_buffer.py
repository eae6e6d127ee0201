"""Rank 0's per-step metrics on their way to MLflow: held until the checkpoint covering them commits.

After a crash the uncommitted steps are redone and logged once, so the step axis in MLflow never repeats
or skips. The held rows also travel inside every checkpoint (:data:`PENDING_METRICS`, with the MLflow run
they belong to): a worker killed between committing a checkpoint and logging its rows logs them on resume
(skipping any step MLflow already has). An unreachable MLflow does not stop training: the rows wait
(bounded) until it answers again.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

log = logging.getLogger("dino_ray.train")

MAX_PENDING_ROWS = 100_000  # metric rows held while MLflow is unreachable; past it the oldest are dropped
FINAL_FLUSH_WAIT_S = 60.0  # how long the end of training keeps trying an unreachable MLflow
FINAL_FLUSH_PAUSE_S = 3.0  # between those tries
UNLOGGED_METRICS = "metrics_unlogged.json"  # rows MLflow never took, next to the checkpoints (see close)
PENDING_METRICS = "metrics_pending.json"


class MetricBuffer:
    """Per-step metrics held until the checkpoint covering them is committed (see module docstring), and
    for as long as MLflow cannot take them: an unreachable MLflow never stops training, and holds a step
    up for one bounded attempt at most.

    * :meth:`flush` makes bounded requests (:func:`dino_ray.tracking.bounded_requests`: no retry, a 10 s
      timeout), so a step waits at most seconds, not MLflow's minutes of backoff. On a failure it keeps
      the rows, warns once for the outage (the tracking URI and the error; later failures are debug
      lines) and tries again at the next flush; the first one that succeeds logs "MLflow reachable again,
      flushed K rows". Every checkpoint meanwhile carries all held rows (``PENDING_METRICS``, written from
      :attr:`rows`, which may span several checkpoints), so a restarted worker loses none of them.
    * Held rows are bounded by ``max_rows`` (:data:`MAX_PENDING_ROWS`; about 150 MB of memory and 65 MB
      in each checkpoint at the bound for 25 metrics a row): past it the *oldest* rows are dropped and
      counted, with one warning when dropping starts and the count in the line of the next flush that
      succeeds (or in the end-of-training file). Losing the start of a very long outage beats running the
      worker out of memory.
    * Exactly once: after a failed flush some of its requests may have reached MLflow anyway (a batch
      before the one that failed, a timeout after the server wrote), rows restored from a checkpoint may
      have been logged before the worker stopped, and a run resumed from a checkpoint re-trains steps that
      the stopped attempt may have logged after it (its later checkpoint was not the one resumed). After
      any of these, flushes first read which steps MLflow has for each key and log only the rest, until a
      flush finds none of its steps there.
    * :meth:`close` ends training with a longer bounded wait, then writes what is still unlogged to a file.
    """

    def __init__(self, tracking_uri: str, run_id: str, enabled: bool, max_rows: int = MAX_PENDING_ROWS):
        self.uri, self.run_id, self.enabled, self.max_rows = tracking_uri, run_id, enabled, max_rows
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.dropped = 0  # oldest rows dropped past max_rows, never logged
        self._outage: str | None = None  # the first error of the current outage; None while MLflow answers
        self._check_logged = False  # rows may already be (partly) in MLflow: skip the (key, step) it has

    def add(self, step: int, metrics: dict[str, float]) -> None:
        if self.enabled:
            self.rows.append((step, metrics))
            self._bound()

    def _bound(self) -> None:
        over = len(self.rows) - self.max_rows
        if over <= 0:
            return
        if not self.dropped:
            log.warning("more than %d metric rows wait for MLflow at %s: dropping the oldest from now on (the "
                        "number dropped is logged when MLflow is back or training ends)", self.max_rows,
                        self._where())
        del self.rows[:over]
        self.dropped += over

    def _where(self) -> str:
        from dino_ray.tracking import redact_url

        return redact_url(self.uri)

    def flush(self) -> bool:
        """Log the held rows; True when none are left. Never raises: a failure keeps them (see class)."""
        if not self.enabled or not self.rows:
            return True
        from dino_ray import tracking

        try:
            with tracking.bounded_requests():
                self._log_rows()
        except Exception as e:  # noqa: BLE001 - any tracking failure: keep the rows, try again later
            self._check_logged = True
            if self._outage is None:
                self._outage = f"{type(e).__name__}: {e}"
                log.warning("MLflow at %s is unreachable (%s); training continues, its metrics are kept and "
                            "logged when MLflow answers again (%d rows held so far)", self._where(),
                            self._outage, len(self.rows))
            else:
                log.debug("MLflow at %s still unreachable (%s: %s); %d rows held", self._where(),
                          type(e).__name__, e, len(self.rows))
            return False
        dropped = f" ({self.dropped} older rows were dropped before it took them)" if self.dropped else ""
        if self._outage is not None:
            log.warning("MLflow reachable again at %s, flushed %d rows%s", self._where(), len(self.rows), dropped)
        elif dropped:
            log.warning("flushed %d metric rows to MLflow at %s%s", len(self.rows), self._where(), dropped)
        self._outage, self.dropped = None, 0
        self.rows.clear()
        return True

    def expect_logged(self) -> None:
        """The run resumes from a checkpoint: steps after it may already be in MLflow (see class)."""
        self._check_logged = True

    def _log_rows(self) -> None:
        import mlflow
        from mlflow.entities import Metric

        client = mlflow.MlflowClient(self.uri)
        logged: dict[str, set[int]] = {}
        if self._check_logged:
            for key in sorted({k for _, m in self.rows for k in m}):
                logged[key] = {m.step for m in client.get_metric_history(self.run_id, key)}
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for step, m in self.rows for k, v in m.items()
                 if step not in logged.get(k, ())]
        for i in range(0, len(items), 900):
            client.log_batch(self.run_id, metrics=items[i:i + 900])
        # Keep checking while MLflow still had some of these steps: the next rows may be there too.
        self._check_logged = any(step in steps for steps in logged.values() for step, _ in self.rows)

    def restore(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Take over rows saved in a checkpoint (their flush may or may not have happened before the worker
        stopped) and log them, skipping the steps MLflow already has, key by key. Never raises: with MLflow
        unreachable they wait, with that check, for the next flush like any other held rows."""
        if not self.enabled or not rows:
            return
        self.rows = list(rows) + self.rows
        self._bound()
        self._check_logged = True
        self.flush()

    def close(self, save: Any = None, wait_s: float = FINAL_FLUSH_WAIT_S) -> str | None:
        """End of training (also an early stop): flush, trying an unreachable MLflow again for up to
        ``wait_s``. Rows still unlogged then are not lost: ``save(bytes)`` (default: a file
        :data:`UNLOGGED_METRICS` next to the checkpoints in the stage's ``ray_train`` folder) writes them as
        ``{"tracking_uri", "run_id", "dropped", "rows": [[step, {key: value}], ...]}``, and the last
        checkpoint's ``PENDING_METRICS`` holds those it covers, which a re-run of the stage logs when it
        resumes. Returns where the file went (None when everything was logged). Never raises: a finished
        training run must not fail for its curves; the stage's own MLflow calls after it decide that."""
        if not self.enabled:
            return None
        deadline = time.monotonic() + wait_s
        while not self.flush() and time.monotonic() + FINAL_FLUSH_PAUSE_S < deadline:
            time.sleep(FINAL_FLUSH_PAUSE_S)
        if not self.rows:
            return None
        data = json.dumps({"tracking_uri": self._where(), "dropped": self.dropped,
                           **self.payload(self.run_id, self.rows)}).encode()
        try:
            where = (save or self.save_next_to_checkpoints)(data)
        except Exception:  # noqa: BLE001 - see the docstring
            log.error("MLflow at %s unreachable and %d metric rows (steps %d-%d) could not be written either",
                      self._where(), len(self.rows), self.rows[0][0], self.rows[-1][0], exc_info=True)
            return None
        log.warning("MLflow at %s still unreachable after %.0f s (%s): %d metric rows (steps %d-%d) not logged "
                    "were written to %s%s; re-running the stage logs those its last checkpoint holds",
                    self._where(), wait_s, self._outage, len(self.rows), self.rows[0][0], self.rows[-1][0], where,
                    f" ({self.dropped} older rows were dropped)" if self.dropped else "")
        return where

    @staticmethod
    def payload(run_id: str, rows: list[tuple[int, dict[str, float]]]) -> dict[str, Any]:
        """Rows as JSON-ready data, with the MLflow run they belong to (a checkpoint's ``PENDING_METRICS``,
        the end-of-training file)."""
        return {"run_id": run_id, "rows": [[step, {k: float(v) for k, v in m.items()}] for step, m in rows]}

    @staticmethod
    def save_next_to_checkpoints(data: bytes) -> str:
        """Write ``data`` as :data:`UNLOGGED_METRICS` in this Ray Train run's folder (local or remote)."""
        from ray.train import get_context

        storage = get_context().get_storage()  # a DeveloperAPI: the run's filesystem and folder
        fs, folder = storage.storage_filesystem, storage.experiment_fs_path
        path = f"{folder.rstrip('/')}/{UNLOGGED_METRICS}"
        fs.create_dir(folder)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return path if fs.type_name == "local" else f"{fs.type_name}://{path}"
