"""The console's formatting and pacing, and the progress channel's throttle, without Ray."""

from __future__ import annotations

import io

import pytest

from dino_ray import progress
from dino_ray.console import Console, LiveLine, format_snapshot, key_figures, mlflow_hint
from dino_ray.run_report import format_duration
from dino_ray.progress import Reporter, Snapshot


def _snap(task="pretrain", done=30, total=100, unit="steps", at=110.0, base=(10, 100.0), **figures):
    return Snapshot(task, done, total, unit, at, *base, figures)


def test_progress_line_has_rate_figures_and_eta():
    # 20 steps in 10 s since the first report: 2 steps/s, 70 left: 35 s
    assert format_snapshot(_snap(loss=9.8123), "pretrain") == "30/100 steps · 2.0 steps/s · loss 9.812 · ETA 35 s"
    # a task of a stage is labelled without the stage's name; slow rates read per minute
    slow = _snap("eval features pretrain/test", done=2, total=6, unit="backbones", at=160.0, base=(1, 100.0))
    assert format_snapshot(slow, "eval") == "features pretrain/test: 2/6 backbones · 1.0 backbones/min · ETA 4 min 0 s"
    # the first report has no rate yet, a finished task no ETA
    assert format_snapshot(_snap(done=10, at=100.0), "pretrain") == "10/100 steps"
    assert format_snapshot(_snap(done=100), "pretrain") == "100/100 steps · 9.0 steps/s"


def test_durations_and_key_figures():
    assert [format_duration(s) for s in (0.4, 59, 61, 3725)] == ["0 s", "59 s", "1 min 1 s", "1 h 02 min"]
    summary = {"pool_files": 1434, "index_recall": 0.98765, "skipped_by_reason": {"empty": 1},
               "digits/pretrain/knn_k20_top1": 0.5, "embedder": "outputs/x", "ok": True}
    assert key_figures(summary) == "pool_files=1434, index_recall=0.9877"


def test_mlflow_hint_for_local_store_and_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert mlflow_hint(f"sqlite:///{tmp_path}/mlflow.db").startswith("mlflow ui --backend-store-uri sqlite:///mlflow.db")
    assert mlflow_hint("http://mlflow.example:5000") == "http://mlflow.example:5000"
    assert mlflow_hint("http://mlflow.example:5000/", "7") == \
        "http://mlflow.example:5000/#/experiments/7?workflowType=machine_learning"
    assert mlflow_hint(f"sqlite:///{tmp_path}/mlflow.db", "3").endswith(
        "(then http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning)")


def test_live_line_rewrites_a_terminal_and_paces_a_log():
    clock = [0.0]
    out = io.StringIO()
    log = LiveLine(out, tty=False, every_s=15, clock=lambda: clock[0])
    # at most one line per 15 s, none when nothing changed, then every eighth of the time so far, up to 5 min
    for t, text in [(0, "a"), (5, "b"), (16, "b"), (40, "b"), (41, "c"), (50, "d"), (200, "d"), (220, "e"),
                    (230, "e"), (10_000, "f"), (10_250, "g"), (10_301, "g")]:
        clock[0] = t
        log.show(text)
    assert out.getvalue() == "a\nb\nc\nd\ne\nf\ng\n"
    log.restart()
    clock[0] += 16
    log.show("h")  # a new stage: every 15 s again
    assert out.getvalue().endswith("g\nh\n")
    term = io.StringIO()
    tty = LiveLine(term, tty=True)
    tty.show("x")
    tty.show("y")
    tty.clear()
    assert term.getvalue() == "\rx\x1b[K\ry\x1b[K\r\x1b[K"


def test_console_shows_only_the_running_stage_and_sums_it_up():
    out = io.StringIO()
    console = Console(out, tty=False, every_s=0)
    console.add([_snap()])  # no stage running: dropped
    console.stage_started("pretrain", "new")
    since = console._since
    console.add([_snap(at=since - 60), _snap("curate bootstrap", at=since - 60)])  # late reports of earlier work
    console.add([_snap(at=since + 10, base=(0, since), loss=2.5)])
    console.stage_finished("pretrain", {"seconds": 75, "summary": {"images": 1112, "steps": 300}})
    assert out.getvalue().splitlines() == [
        "pretrain  running: new",
        "pretrain  30/100 steps · 3.0 steps/s · loss 2.5 · ETA 23 s",
        "pretrain  done in 1 min 15 s: images=1112, steps=300 (3.0 steps/s, loss 2.5)",
    ]


class _Board:
    def __init__(self):
        self.got = []
        self.put = self

    def remote(self, snapshot):
        self.got.append(snapshot)


def test_reporter_sends_at_most_once_a_second_and_always_the_end(monkeypatch):
    board = _Board()
    monkeypatch.setattr(progress, "_find_board", lambda: board)
    now = [1000.0]
    reporter = Reporter("pretrain", total=5, unit="steps", clock=lambda: now[0])
    for step in range(1, 6):  # one step every 0.4 s
        reporter.update(step, loss=1.0 / step)
        now[0] += 0.4
    assert [s.done for s in board.got] == [1, 4, 5]
    assert board.got[-1].rate == pytest.approx(4 / 1.6) and board.got[-1].figures == {"loss": 0.2}
    monkeypatch.setattr(progress, "_find_board", lambda: None)
    Reporter("eval", 3, "backbones").update(1)  # no console listening: nothing happens


def test_finish_shows_the_results_and_where_to_look(tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    stage = tmp_path / "out" / "eval"
    stage.mkdir(parents=True)
    (stage / "results.json").write_text(json.dumps([{"dataset": "digits", "backbone": "pretrain",
                                                     "knn_k20_top1": 0.535, "retrieval_mAP": 0.226}]))
    (stage / "_manifest.json").write_text(json.dumps({
        "stage": "eval", "seconds": 12, "summary": {},
        "outputs": {"results": str(stage / "results.json"), "table": str(stage / "results.md")}}))
    out = io.StringIO()
    Console(out, tty=False).finish(65, "out", f"sqlite:///{tmp_path}/mlflow.db")
    lines = out.getvalue().splitlines()
    assert lines[0] == "dino-ray  finished in 1 min 5 s"
    assert any("pretrain" in line and "53.5" in line for line in lines)  # the headline table
    assert f"(all metrics: {stage / 'results.md'})" in lines
    assert lines[-2:] == ["MLflow:   mlflow ui --backend-store-uri sqlite:///mlflow.db   (then http://127.0.0.1:5000)",
                          "outputs:  out"]
