"""What a person at the terminal sees during ``dino-ray run``.

By default: one line when a stage starts (and why: new, config changed, resumed, forced) or is
skipped, one live progress line while it runs, one summary line when it ends, and at the end the
results table and where to look (MLflow, the output folder). Everything else (Ray's and the
libraries' logs, progress bars, worker output) goes to Ray's session folder, named once when Ray
starts and again when a stage fails; ``--verbose`` shows it all on the console as well.

The live line is rewritten in place on a terminal; when the output is a file or a CI log it is
printed as a new line at most every ``every_s`` seconds, so a 20-minute run stays a short log.
Progress arrives from the workers through :mod:`dino_ray.progress`.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import shutil
import sys
import threading
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, TextIO

from dino_ray.evals.report import format_value
from dino_ray.run_report import format_duration, load_report, results_table
from dino_ray.progress import Note, Snapshot
from dino_ray.tracking import redact_url

log = logging.getLogger("dino_ray.console")

NAME_WIDTH = 9  # "pretrain" and "dino-ray" fit, so every line's message starts in the same column


def configure_output(verbose: bool) -> None:
    """Logging and warnings for the driver: INFO and every warning with ``--verbose``; else only
    warnings and errors of loggers, and no Python warnings (deprecation notices of the stack)."""
    level = os.environ.get("DINO_RAY_LOG_LEVEL") or ("INFO" if verbose else "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow configures its own handler


# ---------------------------------------------------------------------------------------- formatting


def format_rate(rate: float, unit: str) -> str:
    return f"{rate:.1f} {unit}/s" if rate >= 1 else f"{rate * 60:.1f} {unit}/min"


def rate_and_figures(snap: Snapshot) -> list[str]:
    parts = [] if snap.rate is None else [format_rate(snap.rate, snap.unit)]
    return parts + [f"{k} {format_value(v)}" for k, v in snap.figures.items()]


def format_snapshot(snap: Snapshot, stage: str) -> str:
    """``bootstrap: 40/60 steps · 2.1 steps/s · loss 9.81 · ETA 10 s`` (the stage's name is left out)."""
    label = snap.task[len(stage):].strip() if snap.task.startswith(stage) else snap.task
    parts = [f"{label + ': ' if label else ''}{snap.done}/{snap.total} {snap.unit}", *rate_and_figures(snap)]
    if snap.eta_s is not None:
        parts.append(f"ETA {format_duration(snap.eta_s)}")
    return " · ".join(parts)


def progress_text(snapshots: Iterable[Snapshot], stage: str) -> str:
    """The tasks still running (or else the last one), in the order they started."""
    snaps = list(snapshots)
    running = [s for s in snaps if not s.finished] or snaps[-1:]
    return " | ".join(format_snapshot(s, stage) for s in running)


def stage_line(name: str, text: str) -> str:
    return f"{name:<{NAME_WIDTH}} {text}"


def key_figures(summary: Mapping[str, Any], limit: int = 8) -> str:
    """The summary's top-level numbers; tables and per-backbone figures stay in the manifest and MLflow."""
    items = [f"{k}={format_value(v)}" for k, v in summary.items()
             if "/" not in k and isinstance(v, numbers.Number) and not isinstance(v, bool)]
    return ", ".join(items[:limit])


def experiment_page(base_url: str, experiment_id: str | None) -> str:
    """The experiment's page in the MLflow UI, opened on its training runs: MLflow 3's UI shows a
    GenAI view (traces, "no data") unless the URL or a remembered toggle asks for model training."""
    base = base_url.rstrip("/")
    if not experiment_id:
        return base
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"


def mlflow_hint(tracking_uri: str, experiment_id: str | None = None) -> str:
    """How to open the runs: the UI command for a local store, else the server's page (no credentials)."""
    tracking_uri = redact_url(tracking_uri)
    if tracking_uri.startswith("databricks"):
        return tracking_uri
    if tracking_uri.startswith(("http://", "https://")):
        return experiment_page(tracking_uri, experiment_id)
    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///"):]
        rel = os.path.relpath(path)
        tracking_uri = f"sqlite:///{rel if not rel.startswith('..') else path}"
    return (f"mlflow ui --backend-store-uri {tracking_uri}   "
            f"(then {experiment_page('http://127.0.0.1:5000', experiment_id)})")


# ------------------------------------------------------------------------------------------- output


class LiveLine:
    """One progress line: rewritten in place on a terminal; elsewhere printed as a new line when it
    changed, at most every ``every_s`` seconds and less often as a stage goes on (every eighth of the
    time since :meth:`restart`, up to ``max_every_s``), so that a long run's log stays short."""

    def __init__(self, stream: TextIO, tty: bool, every_s: float = 15.0, max_every_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        self.stream, self.tty, self.clock = stream, tty, clock
        self.every_s, self.max_every_s = every_s, max_every_s
        self._on_screen = False
        self._last_text: str | None = None
        self._last_at = -math.inf
        self._since = clock()

    def restart(self) -> None:
        """A new stage: back to printing every ``every_s``."""
        self._since = self.clock()

    def show(self, text: str) -> None:
        if self.tty:
            width = shutil.get_terminal_size().columns
            self.stream.write("\r" + text[:width - 1] + "\x1b[K")
            self._on_screen = True
        else:
            now = self.clock()
            every = min(self.max_every_s, max(self.every_s, (now - self._since) / 8))
            if text == self._last_text or now - self._last_at < every:
                return
            self.stream.write(text + "\n")
            self._last_text, self._last_at = text, now
        self.stream.flush()

    def clear(self) -> None:
        """Make room for an ordinary line."""
        if self._on_screen:
            self.stream.write("\r\x1b[K")
            self._on_screen = False


class Console:
    """The pipeline's observer (see :class:`dino_ray.pipeline.PipelineEvents`) and the progress reader."""

    def __init__(self, stream: TextIO | None = None, *, verbose: bool = False, tty: bool | None = None,
                 every_s: float = 15.0, poll_s: float = 1.0):
        self.stream = stream or sys.stdout
        tty = self.stream.isatty() if tty is None else tty
        self.live = LiveLine(self.stream, tty and not verbose, every_s)  # verbose output would tear it
        self.poll_s = poll_s
        self.logs_dir: str | None = None
        self._lock = threading.Lock()
        self._stage: str | None = None
        self._since = 0.0
        self._tasks: dict[str, Snapshot] = {}
        self._board: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def say(self, name: str, text: str) -> None:
        with self._lock:
            self.live.clear()
            self.stream.write(stage_line(name, text) + "\n")
            self.stream.flush()

    # ------------------------------------------------------------------ pipeline events
    def stage_skipped(self, name: str, manifest: Mapping[str, Any]) -> None:
        self.say(name, "up to date, skipped")

    def stage_started(self, name: str, reason: str) -> None:
        with self._lock:
            self._stage, self._since, self._tasks = name, time.time(), {}
            self.live.restart()
        self.say(name, f"running: {reason}")

    def stage_finished(self, name: str, manifest: Mapping[str, Any]) -> None:
        self.poll()  # the last snapshots, for the figures below
        main = self._tasks.get(name)  # a training stage's own task: its final rate and loss
        extra = f" ({', '.join(rate_and_figures(main))})" if main and main.rate else ""
        figures = key_figures(manifest.get("summary", {}))
        self.say(name, f"done in {format_duration(manifest.get('seconds', 0))}"
                       f"{': ' + figures if figures else ''}{extra}")
        self._stage = None

    def stage_failed(self, name: str, error: BaseException, seconds: float) -> None:
        """Where to look; the error itself reaches the console in full through the CLI's exit message."""
        self._stage = None
        where = f"; Ray's logs: {self.logs_dir}" if self.logs_dir else ""
        self.say(name, f"failed after {format_duration(seconds)}{where}")

    # ------------------------------------------------------------------ progress
    def add(self, snapshots: Iterable[Snapshot | Note]) -> None:
        """Take snapshots of the running stage (older ones are late reports of an earlier stage); print
        notes (alarms) on their own lines, whatever stage they come from."""
        snapshots = list(snapshots)
        for note in (s for s in snapshots if isinstance(s, Note)):
            self.say("!", note.text)
        snapshots = [s for s in snapshots if isinstance(s, Snapshot)]
        with self._lock:
            if self._stage is None:
                return
            fresh = [s for s in snapshots if s.at >= self._since - 1.0]
            if not fresh:
                return
            self._tasks.update({s.task: s for s in fresh})
            self.live.show(stage_line(self._stage, progress_text(self._tasks.values(), self._stage)))

    def attach_ray(self, logs_dir: str | None) -> None:
        """Once Ray is up: say where its logs are, open the progress board and start reading it."""
        if self._board is not None:
            return
        from dino_ray import progress

        self.logs_dir = logs_dir
        if logs_dir:
            self.say("dino-ray", f"Ray's logs: {logs_dir}")
        self._board = progress.open_board()
        self._thread = threading.Thread(target=self._poll_loop, name="dino-ray-progress", daemon=True)
        self._thread.start()

    def poll(self) -> None:
        if self._board is None:
            return
        import ray

        try:
            self.add(ray.get(self._board.drain.remote(), timeout=10))
        except Exception:  # noqa: BLE001 - a missed poll only delays the progress line
            log.debug("progress poll failed", exc_info=True)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self.live.clear()
            self.stream.flush()

    # ------------------------------------------------------------------ the end
    def finish(self, seconds: float, output_root: str, tracking_uri: str, with_results: bool = True,
               experiment_id: str | None = None) -> None:
        """The closing block: total time, the eval results (as ``dino-ray report`` shows them) unless the
        job had no eval stage (they would be of other backbones), where to look."""
        self.say("dino-ray", f"finished in {format_duration(seconds)}")
        lines = [""]
        report = load_report(output_root)
        if with_results and report.results:
            table = report.stages["eval"].get("outputs", {}).get("table")
            lines += [results_table(report), f"(all metrics: {table})", ""]
        lines += [f"MLflow:   {mlflow_hint(tracking_uri, experiment_id)}", f"outputs:  {output_root}"]
        with self._lock:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()

