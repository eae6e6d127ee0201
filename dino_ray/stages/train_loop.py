"""The Ray Train loop shared by pretrain, high-res and distill: DeepSpeed engines, EMA, checkpoints.

One function, ``train_loop``, runs on every Ray Train worker. It trains one or more students:

* pretrain / high-res: one student; its EMA is the teacher that produces the targets (DINOv2).
* distill: several students taught by one frozen teacher from a single teacher forward per batch;
  the EMA of each student is what gets exported (paper, section 5).

**Teacher and EMA under ZeRO-3.** Every EMA model is a DeepSpeed engine *without an optimizer*, built
from a module with the same parameter shapes as its student and the same ZeRO config, so DeepSpeed
partitions both identically: rank r owns the same slice of every parameter in both. The EMA update
then touches only local slices (``ds_tensor`` of the EMA, the fp32 master slice of the student):
no communication and no gather of the full model per step. Parameters are gathered only for
forwards (as for the student) and once per export. With ZeRO stage < 3 parameters are replicated and
the same update runs on full tensors.

**Metrics.** Rank 0 buffers per-step metrics and writes them to MLflow only after the checkpoint that
covers those steps is committed. After a crash the uncommitted steps are redone and logged once, so
the step axis in MLflow never repeats or skips. The buffered rows also travel inside the checkpoint:
a worker killed between committing a checkpoint and logging its rows logs them on resume (skipping
any step MLflow already has), so those steps are not lost either. An unreachable MLflow does not stop
training: the rows wait (bounded) until it answers again, see ``_MetricBuffer``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from typing import Any

import torch

log = logging.getLogger("dino_ray.train")


@dataclasses.dataclass
class StudentSpec:
    name: str
    model: Any  # dino_ray.config.schema.ModelConfig


@dataclasses.dataclass
class LoopSpec:
    """Everything a worker needs; plain dataclasses so Ray pickles it by value."""

    stage: str
    students: list[StudentSpec]
    loss: Any  # LossConfig
    schedule: Any  # ScheduleConfig
    train: Any  # TrainConfig
    data: Any  # SSLDataConfig
    index_uri: str
    n_images: int
    seed: int
    output_dir: str  # exported models go here (rank 0)
    tracking_uri: str
    run_id: str
    init_from: str | None = None  # an SSL checkpoint dir (ssl_model.pth) to start the student from
    teacher_from: str | None = None  # distill: frozen teacher SSL checkpoint dir
    masking: bool = True  # distill students train without masking (paper, section 5)
    monitor: Any = None  # MonitorConfig: the labeled set measured while training (None/every 0: off)


SSL_WEIGHTS = "ssl_model.pth"  # backbone + heads of the teacher, for high-res and distillation


def _device() -> torch.device:
    if torch.cuda.is_available():
        from ray.train import get_context

        return torch.device("cuda", get_context().get_local_rank())
    return torch.device("cpu")


def _ds_config(spec: LoopSpec, world: int, bf16: bool, with_optimizer: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.train.batch_size_per_worker,
        "train_batch_size": spec.train.batch_size_per_worker * world,
        "gradient_accumulation_steps": 1,
        # EMA engines are updated shard-locally, so none of their parameters may stay gathered between
        # forwards (ZeRO-3 keeps small ones resident by default): threshold 0 for them.
        "zero_optimization": {"stage": spec.train.zero_stage} if with_optimizer else
        {"stage": spec.train.zero_stage, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": bf16 and with_optimizer},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if with_optimizer:
        cfg["gradient_clipping"] = spec.schedule.clip_grad
    return cfg


def _disable_jit_ops() -> None:
    """DeepSpeed's CPU comm op needs a C++ toolchain at run time; gloo collectives do not need it."""
    import importlib

    ops = importlib.import_module("deepspeed.ops")
    compat = getattr(ops, "__compatible_ops__", None)
    if isinstance(compat, dict):
        compat["deepspeed_shm_comm"] = False


def _build_ssl_model(model_cfg: Any, loss_cfg: Any, drop_path: bool) -> torch.nn.Module:
    from dino_ray.models import build_backbone
    from dino_ray.train.ssl_arch import SSLModel

    kwargs = model_cfg.backbone_kwargs()
    if not drop_path:
        kwargs["drop_path_rate"] = 0.0
    return SSLModel.build(build_backbone(model_cfg.arch, **kwargs), loss_cfg)


def _load_ssl_state(model: torch.nn.Module, ckpt_dir: str) -> None:
    """Load backbone + heads saved by a previous stage, resizing the position embedding if needed."""
    import io

    from dino_ray import storage
    from dino_ray.models import interpolate_pos_embed_state_dict

    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(ckpt_dir, SSL_WEIGHTS))), map_location="cpu",
                       weights_only=True)
    bb = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    cfg = model.backbone.config
    if bb["pos_embed"].shape != model.backbone.pos_embed.shape:
        bb = interpolate_pos_embed_state_dict(bb, cfg.img_size, cfg.patch_size)
    state.update({f"backbone.{k}": v for k, v in bb.items()})
    model.load_state_dict(state, strict=True)


class _Member:
    """A student engine and its EMA engine (the EMA is the teacher in pretrain, the output in distill)."""

    def __init__(self, name: str, engine: Any, ema: Any, zero3: bool, bf16: bool):
        self.name, self.engine, self.ema, self.zero3 = name, engine, ema, zero3
        self.pairs = list(zip(ema.module.parameters(), engine.module.parameters()))
        self.bf16 = bf16

    @torch.no_grad()
    def ema_update(self, momentum: float) -> None:
        from dino_ray.train.ema import ema_update_

        if self.zero3:
            from deepspeed.utils import safe_get_local_fp32_param

            teacher, student = [], []
            for t, s in self.pairs:
                src = safe_get_local_fp32_param(s) if self.bf16 else None
                src = s.ds_tensor if src is None else src
                n = min(t.ds_tensor.numel(), src.numel())
                teacher.append(t.ds_tensor.view(-1)[:n])
                student.append(src.reshape(-1)[:n])
            ema_update_(teacher, student, momentum)
        else:
            ema_update_([t for t, _ in self.pairs], [s for _, s in self.pairs], momentum)

    def full_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The full state dict of an (EMA) module on rank 0; a collective under ZeRO-3."""
        from ray.train import get_context

        if self.zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} \
                    if get_context().get_world_rank() == 0 else None
            return state
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} \
            if get_context().get_world_rank() == 0 else None

    def ema_shards(self) -> dict[int, torch.Tensor]:
        params = [t for t, _ in self.pairs]
        if self.zero3:
            return {i: p.ds_tensor.detach().cpu().clone() for i, p in enumerate(params)}
        return {i: p.detach().cpu().clone() for i, p in enumerate(params)}

    def load_ema_shards(self, shards: dict[int, torch.Tensor]) -> None:
        params = [t for t, _ in self.pairs]
        with torch.no_grad():
            for i, p in enumerate(params):
                (p.ds_tensor if self.zero3 else p).copy_(shards[i])


MAX_PENDING_ROWS = 100_000  # metric rows held while MLflow is unreachable; past it the oldest are dropped
FINAL_FLUSH_WAIT_S = 60.0  # how long the end of training keeps trying an unreachable MLflow
FINAL_FLUSH_PAUSE_S = 3.0  # between those tries
UNLOGGED_METRICS = "metrics_unlogged.json"  # rows MLflow never took, next to the checkpoints (see close)


class _MetricBuffer:
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
      before the one that failed, a timeout after the server wrote), and rows restored from a checkpoint
      may have been logged before the worker stopped. The next flush after either first reads which steps
      MLflow has for each key and logs only the rest.
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
        self._outage, self._check_logged, self.dropped = None, False, 0
        self.rows.clear()
        return True

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


PENDING_METRICS = "metrics_pending.json"


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker entry point (``TorchTrainer(train_loop, train_loop_config={"spec": spec})``)."""
    import deepspeed
    import ray.train
    from ray.train import Checkpoint, get_context

    from dino_ray.data.multicrop import normalize_batch
    from dino_ray.progress import Reporter
    from dino_ray.stages.ssl_stream import StreamSpec, ssl_batches, started_early
    from dino_ray.stages.watch import TrainingWatch
    from dino_ray.train.param_groups import apply_schedules, build_param_groups
    from dino_ray.train.schedules import TrainSchedules
    from dino_ray.train.ssl_arch import SSLObjective

    spec: LoopSpec = config["spec"]
    marks = {"worker_started_at": time.time()}  # start-up phases, for the stage's overhead breakdown
    ctx = get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device()
    from dino_ray.train import precision as mixed

    precision = mixed.resolve(spec.train.precision, device)
    if rank == 0:
        log.info("%s: %s", spec.stage, precision.reason)
    # DeepSpeed's bf16 mode (bf16 weights, fp32 master copy) on GPU; on CPU the engine stays fp32 and
    # only the forward/backward run under bf16 autocast (DeepSpeed's CPU path has no bf16 optimizer).
    bf16 = device.type == "cuda" and precision.name == "bf16"
    if spec.train.threads_per_worker:
        torch.set_num_threads(spec.train.threads_per_worker)
    _disable_jit_ops()
    zero3 = spec.train.zero_stage == 3
    distill = spec.teacher_from is not None

    # The input stream starts first, so Ray Data's actors start and crop the first batches while the
    # models and DeepSpeed engines are built (the resume step is in the checkpoint's folder name).
    checkpoint = ray.train.get_checkpoint()
    start_step = checkpoint_step(checkpoint.path) if checkpoint is not None else 0
    stream = StreamSpec(index_uri=spec.index_uri, n_images=spec.n_images, seed=spec.seed,
                        batch_size=spec.train.batch_size_per_worker, world_size=world, rank=rank,
                        start_step=start_step, total_steps=spec.schedule.total_iters)
    batches = started_early(ssl_batches(stream, spec.data, num_actors=spec.train.data_workers,
                                        cpus_per_actor=spec.train.data_cpus))

    members: list[_Member] = []
    for st in spec.students:
        torch.manual_seed(spec.seed)  # identical init on every rank and for every world size
        student = _build_ssl_model(st.model, spec.loss, drop_path=not distill)
        if spec.init_from:
            _load_ssl_state(student, spec.init_from)
        ema = copy.deepcopy(student)
        for p in ema.parameters():
            p.requires_grad_(False)
        groups = build_param_groups(student, spec.schedule.layerwise_decay, spec.schedule.patch_embed_lr_mult,
                                    spec.schedule.weight_decay)
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
        engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer,
                                               config=_ds_config(spec, world, bf16, with_optimizer=True))
        ema_engine = _inference_engine(ema, spec, world, device)
        ema_engine.module.eval()
        members.append(_Member(st.name, engine, ema_engine, zero3, bf16))

    if distill:
        teacher_module = _teacher_module(spec.teacher_from, spec.loss)
        for p in teacher_module.parameters():
            p.requires_grad_(False)
        teacher = _inference_engine(teacher_module, spec, world, device)
        teacher.module.eval()
    else:
        teacher = members[0].ema

    marks["engines_ready_at"] = time.time()
    objectives = [SSLObjective(spec.loss).to(device) for _ in members]
    global_batch = spec.train.batch_size_per_worker * world
    schedules = TrainSchedules.from_config(spec.schedule, global_batch)
    total = spec.schedule.total_iters

    from dino_ray.data.decode import SKIP_REASONS

    skips = torch.zeros(len(SKIP_REASONS), dtype=torch.int64)  # images the stream replaced, by SKIP_REASONS
    buffer = _MetricBuffer(spec.tracking_uri, spec.run_id, enabled=rank == 0)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            restored = _restore(d, members, objectives, rank, skips)
            if restored != start_step:
                raise RuntimeError(f"checkpoint {checkpoint.path} holds step {restored}, its name says {start_step}")
            pending = os.path.join(d, PENDING_METRICS)
            if os.path.exists(pending):
                with open(pending) as f:
                    saved = json.load(f)
                # rows of this stage's MLflow run only: a run continued under a new config
                # (--resume-from-checkpoint) is a new MLflow run, and the old run's rows belong to the old run
                if isinstance(saved, list) or saved.get("run_id") == spec.run_id:
                    rows = saved if isinstance(saved, list) else saved["rows"]
                    buffer.restore([(int(step), m) for step, m in rows])
        log.info("rank %d resumed at step %d", rank, start_step)

    n_global, n_local = spec.data.crops.global_crops_number, spec.data.crops.local_crops_number
    autocast = mixed.autocast(precision, device)
    step = start_step
    watch = TrainingWatch(spec, [m.name for m in members], rank, world, autocast, start_step)

    def monitored() -> list[tuple[str, torch.nn.Module]]:
        return [(m.name, m.ema.module.backbone) for m in members]

    if watch.is_monitor_step(step):  # the untrained model: where the curves start
        row = watch.measure(step, monitored(), teacher.module.backbone if distill else None)
        buffer.add(step, row)
        watch.verdict(step, row, device)
    marks["loop_ready_at"] = time.time()
    t_last, imgs_since = time.time(), 0
    first_step_at, first_step = None, start_step  # stage overhead and steady-state speed, for the summary
    monitor_s = 0.0  # time spent on monitor points after the first step (part of the steady-state time)
    progress = Reporter(spec.stage.replace("_", " "), total, "steps") if rank == 0 else None
    for batch in batches:
        if step >= total:
            break
        marks.setdefault("first_batch_at", time.time())
        skips += batch.pop("skips").sum(0)
        crops = normalize_batch({k: v.to(device, non_blocking=True) for k, v in batch.items()}, spec.data.crops)
        masks = crops["masks"] if spec.masking else torch.ones_like(crops["masks"])
        apply_masks = spec.masking
        values = schedules.values(step)
        with torch.no_grad(), autocast:
            t_out = teacher(crops["global_crops"], None, masks, apply_masks=False)
        metrics: dict[str, float] = dict(values)
        is_log = (step + 1) % spec.train.log_every == 0 or step + 1 == total
        for m, objective in zip(members, objectives):
            targets = objective.teacher_targets(t_out, values["teacher_temp"], n_global)
            apply_schedules(m.engine.optimizer, values["lr"], values["wd"], values["last_layer_lr"])
            with autocast:
                s_out = m.engine(crops["global_crops"], crops["local_crops"] if n_local else None, masks,
                                 apply_masks=apply_masks)
            loss, terms = objective(s_out, targets, masks, n_global, n_local)
            if not _all_finite(loss):
                buffer.close()  # steps before this one are real; the bad one is not logged
                return {"final_step": step, "error": (
                    f"non-finite loss at step {step} (student {m.name}); training stopped and the last good "
                    f"checkpoint is kept. Lower schedule.base_lr or raise schedule.warmup_iters.")}
            m.engine.backward(loss)
            m.engine.step()
            m.ema_update(values["mom"])
            prefix = "" if len(members) == 1 else f"{m.name}/"
            metrics.update({prefix + k: v for k, v in terms.items()})
            if is_log:  # the exported model's features: the EMA teacher's in pretrain, the student's in distill
                cls_tokens = s_out["global_cls_tokens"] if distill else t_out["global_cls_tokens"]
                metrics.update(watch.diagnostics(m.name, targets, cls_tokens, terms))
        step += 1
        imgs_since += global_batch
        if first_step_at is None:
            first_step_at, first_step = time.time(), step
        if progress is not None:  # throttled and fire-and-forget: costs the step nothing
            progress.update(step, **{k.replace("total_loss", "loss"): v for k, v in metrics.items()
                                     if k.endswith("total_loss")})
        row: dict[str, float] = {}
        if is_log:
            metrics = _mean_over_ranks(metrics, device)
            now = time.time()
            metrics["images_per_s"] = imgs_since / max(now - t_last, 1e-9)
            if device.type == "cuda":
                metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            t_last, imgs_since = now, 0
            row.update(metrics)
        at_monitor = watch.is_monitor_step(step)
        if at_monitor:
            t_monitor = time.time()
            row.update(watch.measure(step, monitored()))
            row["monitor/seconds"] = time.time() - t_monitor
            monitor_s += row["monitor/seconds"]
        if row:
            buffer.add(step, row)
        if (is_log or at_monitor) and watch.verdict(step, row, device):
            _save_and_report(step, members, objectives, rank, {"step": step, **row}, buffer.rows, skips,
                             spec.run_id, device)
            buffer.close()
            return {"final_step": step, "alarms": watch.summary(), "collapse_stop": (
                f"stopped at step {step} by a collapse alarm (train.on_collapse: stop); the checkpoint of this "
                f"step is kept under the stage's ray_train folder. "
                + " | ".join(a["message"] for a in watch.summary()))}
        if step % spec.train.checkpoint_every == 0 or step == total:
            _save_and_report(step, members, objectives, rank, {"step": step, **metrics}, buffer.rows, skips,
                             spec.run_id, device)
            buffer.flush()
    if step < total:
        raise RuntimeError(f"the input stream ended at step {step} of {total}")

    steady = time.time() - (first_step_at or time.time())
    skipped = dict(zip(SKIP_REASONS, _summed_over_ranks(skips, device).tolist()))
    skipped = {r: n for r, n in skipped.items() if n}
    _export(spec, members, rank)
    buffer.close()  # rank 0: a longer bounded wait for an unreachable MLflow, then the rows go to a file
    return {"final_step": step, "precision": precision.name, "precision_reason": precision.reason,
            "first_step_at": first_step_at, "startup_marks": marks, "alarms": watch.summary(), "monitor_s": monitor_s, "steady_s": steady,
            "skipped_by_reason": skipped,
            "images_per_s": (step - first_step) * global_batch / steady if steady > 0 else None}


def _teacher_module(teacher_dir: str, loss_cfg: Any) -> torch.nn.Module:
    """The frozen SSL teacher (backbone + heads) exported by an earlier stage."""
    from dino_ray import backbone_io
    from dino_ray.models import DinoVisionTransformer, ViTConfig
    from dino_ray.train.ssl_arch import SSLModel

    vit = {**backbone_io.read_meta(teacher_dir)["vit"], "drop_path_rate": 0.0}
    model = SSLModel.build(DinoVisionTransformer(ViTConfig(**vit)), loss_cfg)
    _load_ssl_state(model, teacher_dir)
    return model


def _inference_engine(module: torch.nn.Module, spec: LoopSpec, world: int, device: torch.device):
    """A DeepSpeed engine without optimizer, partitioned like the students under ZeRO-3."""
    import deepspeed

    if spec.train.zero_stage == 3:
        engine, _, _, _ = deepspeed.initialize(model=module, config=_ds_config(spec, world, False, False))
        return engine
    return _Plain(module.to(device))


class _Plain:
    """Stage < 3: the EMA/teacher is an ordinary replicated module."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def _mean_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Logged losses are the average over ranks, i.e. the loss of the global batch (as DINOv2 logs)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    values /= torch.distributed.get_world_size()
    return dict(zip(keys, values.tolist()))


def _all_finite(loss: torch.Tensor) -> bool:
    """Agreed on by every rank, so all of them stop at the same step."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss).all()) else 1.0], device=loss.device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad)
    return bad.item() == 0


def _save_and_report(step: int, members: list[_Member], objectives: list, rank: int, metrics: dict,
                     pending: list[tuple[int, dict[str, float]]], skips: torch.Tensor, run_id: str,
                     device: torch.device) -> None:
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    total_skips = _summed_over_ranks(skips, device).tolist()  # every rank saves at the same steps

    with tempfile.TemporaryDirectory(prefix="dino_ray_ckpt_") as tmp:
        for m, objective in zip(members, objectives):
            m.engine.save_checkpoint(os.path.join(tmp, m.name, "ds"), tag="state",
                                     client_state={"step": step, "objective": objective.state_dict(),
                                                   "skips": total_skips})
            torch.save(m.ema_shards(), os.path.join(tmp, m.name, f"ema_rank{rank:05d}.pt"))
        if rank == 0 and pending:
            with open(os.path.join(tmp, PENDING_METRICS), "w") as f:
                json.dump(_MetricBuffer.payload(run_id, pending), f)
        if dist.is_initialized():
            dist.barrier()
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                         checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step_{step:09d}")


def checkpoint_step(path: str) -> int:
    """The step of a checkpoint this loop reported (its folder is ``step_<9 digits>``)."""
    name = os.path.basename(path.rstrip("/"))
    if not name.startswith("step_") or not name[5:].isdigit():
        raise RuntimeError(f"{path}: not a dino-ray training checkpoint (expected a step_<number> folder)")
    return int(name[5:])


def _summed_over_ranks(counts: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``counts`` summed over every rank, on the CPU (a collective: all ranks call it)."""
    total = counts.to(device, copy=True)  # NCCL reduces device tensors only
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return total.cpu()


def _restore(ckpt_dir: str, members: list[_Member], objectives: list, rank: int, skips: torch.Tensor) -> int:
    step = 0
    from dino_ray.train.checkpoint_io import use_weights_only_loads

    for m, objective in zip(members, objectives):
        use_weights_only_loads(m.engine)  # a bucket's checkpoint must not run code on the workers
        _, client = m.engine.load_checkpoint(os.path.join(ckpt_dir, m.name, "ds"), tag="state")
        step = int(client["step"])
        objective.load_state_dict(client["objective"])
        # The checkpoint holds the sum over ranks (with ZeRO < 3 only rank 0's client state is written, and
        # every rank reads it), so rank 0 alone takes it over and the others count from zero again.
        saved = (client.get("skips") or [])[:len(skips)] if rank == 0 else []  # older checkpoints have none
        skips[:len(saved)] = torch.tensor(saved, dtype=torch.int64)
        shard_file = os.path.join(ckpt_dir, m.name, f"ema_rank{rank:05d}.pt")
        if not os.path.exists(shard_file):
            raise RuntimeError(f"{shard_file} missing: resuming needs the same number of workers as the run that "
                               f"wrote the checkpoint")
        m.load_ema_shards(torch.load(shard_file, map_location="cpu", weights_only=True))
    return step


def _export(spec: LoopSpec, members: list[_Member], rank: int) -> None:
    """Consolidated, world-size-independent outputs: the EMA backbone (+ heads) of every student."""
    import io

    from dino_ray import backbone_io, storage

    for m in members:
        state = m.full_state(m.ema.module)
        if rank != 0:
            continue
        out = spec.output_dir if len(members) == 1 else storage.join(spec.output_dir, m.name)
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        vit = dataclasses.asdict(m.ema.module.backbone.config)
        backbone_io.save_state_dict(backbone, vit, out, extra={"stage": spec.stage, "student": m.name,
                                                               "steps": spec.schedule.total_iters})
        buf = io.BytesIO()
        torch.save(state, buf)
        storage.write_bytes(storage.join(out, SSL_WEIGHTS), buf.getvalue())
