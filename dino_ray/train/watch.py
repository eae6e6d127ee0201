"""What the train loop knows about its own health: collapse diagnostics, the live monitor, alarms.

The train loop calls one :class:`TrainingWatch` on every rank:

- ``diagnostics`` at each log step, from the step's own tensors (no extra forward): every rank on its
  local batch, then averaged with the other metrics;
- ``monitor`` at the monitor steps (step 0, every ``monitor.every``, the last), a collective under
  ZeRO-3: each exported model (the EMA teacher in pretrain/high-res, each student's EMA in distill) is
  measured on the monitor set, and for distillation the frozen teacher once at step 0 as a reference;
- ``verdict`` after both, where rank 0's alarm rules decide and every rank learns the decision, so
  they all stop at the same step when ``train.on_collapse`` is ``stop``.

Alarms are logged in plain words, put on the MLflow run as tags and shown on the console.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dino_ray.train.alarms import Alarm, CollapseWatch

log = logging.getLogger("dino_ray.train")

MONITOR_PICTURE_KEY = "monitor_pca"


@dataclass
class PreparedMonitor:
    """The monitor set, decoded, and rank 0's raw-pixel reference scores."""

    data: Any
    reference: dict[str, float]


def prepare_monitor(spec: Any, rank: int) -> Future[PreparedMonitor] | None:
    """Decode the monitor set and score raw pixels on a thread, started before the models are built.

    Decoding a few thousand images and the pixel probes take seconds that would otherwise sit between
    the engines being ready and the first step; on a thread they overlap DeepSpeed's initialisation
    (PIL and the probes' BLAS release the GIL). None when the stage has no monitor.
    """
    mcfg = spec.monitor
    if mcfg is None or not mcfg.every:
        return None
    size = mcfg.image_size or spec.data.crops.global_crops_size

    def load() -> PreparedMonitor:
        from dino_ray.evals.monitor import Monitor, load_monitor_data

        data = load_monitor_data(mcfg.train, mcfg.test, size)
        reference = Monitor(data, k=mcfg.knn_k, ridge=mcfg.ridge).reference() if rank == 0 else {}
        return PreparedMonitor(data, reference)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="monitor-prepare")
    future = pool.submit(load)
    pool.shutdown(wait=False)  # the thread ends with the load; the future keeps the result
    return future


class TrainingWatch:
    def __init__(self, spec: Any, member_names: Sequence[str], rank: int, world: int, autocast: Any,
                 start_step: int, prepared: Future[PreparedMonitor] | None = None):
        from dino_ray.evals.monitor import Monitor, monitor_steps

        self.spec, self.rank, self.world, self.autocast = spec, rank, world, autocast
        total = spec.schedule.total_iters
        self.prefixes = {name: ("" if len(member_names) == 1 else f"{name}/") for name in member_names}
        warmup = max(spec.schedule.warmup_iters, spec.schedule.warmup_teacher_temp_iters)
        self.watches = {name: CollapseWatch(spec.train.collapse, total, warmup, prefix)
                        for name, prefix in self.prefixes.items()}
        self.alarms: list[Alarm] = []
        self._pictures: ThreadPoolExecutor | None = None  # MLflow sender, started by the first picture
        self._pending: list[Future[None]] = []
        mcfg = spec.monitor
        self.monitor = None
        self.steps: set[int] = set()
        if prepared is None:
            prepared = prepare_monitor(spec, rank)
        if prepared is not None:
            ready = prepared.result()  # re-raises a loading error (e.g. a monitor image without a label)
            data = ready.data
            self.monitor = Monitor(data, k=mcfg.knn_k, ridge=mcfg.ridge, batch_size=mcfg.batch_size,
                                   pca_images=mcfg.pca_images)
            self.steps = set(monitor_steps(mcfg.every, start_step, total))
            self.reference = ready.reference
            if rank == 0:
                size = data.train_x.shape[-1]
                log.info("%s monitor: %d train / %d test images at %d px (%d skipped), steps %s; raw pixels "
                         "kNN %.1f%%", spec.stage, len(data.train_y), len(data.test_y), size, data.skipped,
                         sorted(self.steps), 100 * self.reference["monitor/pixels_knn_top1"])

    # ------------------------------------------------------------------ label-free, every log step
    def diagnostics(self, name: str, targets: Any, cls_tokens: torch.Tensor, terms: dict[str, float]
                    ) -> dict[str, float]:
        from dino_ray.train.diagnostics import collapse_metrics

        dino = terms["dino_global_crops_loss"] + terms["dino_local_crops_loss"]
        found = collapse_metrics(targets.dino_global_probs, targets.ibot_masked_probs, cls_tokens.detach(), dino)
        return {self.prefixes[name] + k: v for k, v in found.items()}

    # ------------------------------------------------------------------ the monitor set
    def is_monitor_step(self, step: int) -> bool:
        return step in self.steps

    def measure(self, step: int, models: Sequence[tuple[str, torch.nn.Module]],
                reference_teacher: torch.nn.Module | None = None) -> dict[str, float]:
        """Monitor metrics of ``models`` (name, backbone) at ``step``; complete on rank 0."""
        if self.monitor is None:
            return {}
        metrics: dict[str, float] = dict(self.reference) if self.rank == 0 else {}
        if reference_teacher is not None and step == min(self.steps):
            point = self.monitor.measure(reference_teacher, rank=self.rank, world=self.world,
                                         autocast=self.autocast, with_picture=False)
            metrics.update({f"teacher/{k}": v for k, v in point.metrics.items()})
        for name, backbone in models:
            point = self.monitor.measure(backbone, rank=self.rank, world=self.world, autocast=self.autocast)
            metrics.update({self.prefixes[name] + k: v for k, v in point.metrics.items()})
            if point.picture is not None:
                self._log_picture(step, name, point.picture)
        return metrics

    def _log_picture(self, step: int, name: str, png: bytes) -> None:
        """Queue the picture for MLflow on the watch's one sender thread: the step never waits for it (the
        first MLflow artifact call of a worker alone took ~3 s here). ``close`` waits for the queue."""
        if self._pictures is None:
            self._pictures = ThreadPoolExecutor(max_workers=1, thread_name_prefix="monitor-picture")
        key = MONITOR_PICTURE_KEY if not self.prefixes[name] else f"{MONITOR_PICTURE_KEY}_{name}"
        self._pending.append(self._pictures.submit(self._send_picture, step, key, png))

    def close(self, wait_s: float = 120.0) -> None:
        """Wait (bounded) for the queued pictures, before the stage's MLflow run is closed."""
        if self._pictures is None:
            return
        done, not_done = wait(self._pending, timeout=wait_s)
        if not_done:
            log.warning("%d monitor pictures were not logged within %.0f s", len(not_done), wait_s)
        self._pictures.shutdown(wait=False, cancel_futures=True)
        self._pictures, self._pending = None, []

    def _send_picture(self, step: int, key: str, png: bytes) -> None:
        from dino_ray import tracking

        try:
            with tracking.bounded_requests():  # an unreachable MLflow must not hold training up for minutes
                tracking.log_image_step(self.spec.tracking_uri, self.spec.run_id, png, key, step)
        except Exception:  # noqa: BLE001 - a picture must never stop training
            log.warning("could not log the monitor picture at step %d", step, exc_info=True)

    # ------------------------------------------------------------------ alarms
    def verdict(self, step: int, metrics: dict[str, float], device: torch.device) -> bool:
        """Run the alarm rules (rank 0) and agree on every rank; True when the stage must stop."""
        new: list[Alarm] = []
        if self.rank == 0:
            for watch in self.watches.values():
                new += watch.observe(step, metrics)
            for alarm in new:
                self._raise(alarm)
        stop = bool(new) and self.spec.train.on_collapse == "stop"
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            flag = torch.tensor([1.0 if stop else 0.0], device=device)
            torch.distributed.broadcast(flag, src=0)
            stop = bool(flag.item())
        return stop

    def _raise(self, alarm: Alarm) -> None:
        from dino_ray import tracking
        from dino_ray.progress import Reporter

        self.alarms.append(alarm)
        log.warning("%s collapse alarm: %s", self.spec.stage, alarm.message)
        Reporter.note(f"{self.spec.stage}: COLLAPSE ALARM ({alarm.code}) {alarm.message}")
        try:
            with tracking.bounded_requests():  # the log line and the console carry it if MLflow is down
                tracking.set_tags(self.spec.tracking_uri, self.spec.run_id,
                                  {alarm.tag: alarm.message[:4900], "dino_ray.collapse_alarm": alarm.code})
        except Exception:  # noqa: BLE001 - the log line and the console already carry it
            log.warning("could not tag the MLflow run with alarm %s", alarm.code, exc_info=True)

    def summary(self) -> list[dict[str, Any]]:
        return [{"code": a.code, "step": a.step, "message": a.message} for a in self.alarms]
