"""Per-device memory and step time of each training stage of a job, before anything runs.

Memory per worker = model state + DeepSpeed's working buffers + activations + teacher targets + a fixed
reserve (the framework: CUDA context and allocator slack on a GPU, the Python process on a CPU).

Model state follows the engines of ``train/engines.py`` and DeepSpeed's buffers, in bytes per
parameter P, world size N (checked against real steps by ``benchmarks/memory_plan.py``):

| ZeRO stage | student: weights, fp32 master and its gradient, gradient partition, AdamW m and v | EMA / frozen teacher |
|---|---|---|
| 3, bf16 (GPU) | (2 + 4 + 4 + 4 + 8) P / N | 4 P / N (fp32 shard) |
| 3, fp32 | (4 + 4 + 4 + 4 + 8) P / N | 4 P / N |
| 1 and 2 | 4 P weights + 4 P gradients + (4 + 4 + 8) P / N (DeepSpeed's fp32 partition, its gradient, m, v) | 4 P |
| 0 | 16 P (torch AdamW on the replicated model) | 4 P |

At stages 0-2 the weights stay fp32 and bf16 runs as autocast, whose cast copies of the weights add 2 P.
ZeRO-3 on more than one worker also holds whole-model working copies of the student beyond its shards:
two in the weights' dtype (the gathered weights and their full gradients before the reduce-scatter, as
measured on real steps: DeepSpeed's ``stage3_max_live_parameters`` did not lower them) and the gradient
reduce bucket (``train.zero3_reduce_bucket_size`` elements, DeepSpeed's 5e8 by default, capped at the
model's size). On one worker the shards are the whole model and nothing is copied. The optimizer step
comes after the activations are freed but adds AdamW's temporaries (8 bytes per parameter the worker
updates, measured); the peak is the larger of the two moments. Activations are traced
(``plan/trace.py``), with and without per-block activation checkpointing. Students of a distillation
step run one after the other, so their activations do not add up; their states do.

Step time = FLOPs per step / (peak FLOP/s x utilisation): forward + backward of the student (3x its
forward; 4x with checkpointing, which runs the forward twice) and the teacher's forward on the global crops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dino_ray.config.schema import TRAINING_STAGES
from dino_ray.plan.trace import StepTrace, trace_step

GiB = 2 ** 30
REDUCE_BUCKET = 500_000_000  # DeepSpeed reduce_bucket_size default (elements)



@dataclass(frozen=True)
class Hardware:
    """What each worker runs on; the defaults describe an A100-80GB at DINOv2's measured utilisation."""

    workers: int  # GPUs (one Ray Train worker each)
    memory_bytes: int  # memory per GPU (or per CPU worker)
    device: str = "cuda"  # "cuda" or "cpu": decides bf16 engines and the traced dtype
    peak_tflops: float = 312.0  # dense bf16 peak of an A100
    utilisation: float = 0.4  # share of the peak a step reaches (DINOv2 ViT-g/14: ~0.4, see README)
    reserve_bytes: int = 2 * GiB  # CUDA context + allocator slack (a CPU worker: the Python process)


@dataclass
class Member:
    """One trained student (and its EMA) of a stage, traced at the stage's batch and at twice it."""

    name: str
    trace: StepTrace
    trace_2x: StepTrace

    @property
    def params(self) -> int:
        return sum(self.trace.params.values())

    def activations(self, batch: int, checkpointing: bool) -> int:
        """Saved activations at ``batch``, linear through the two traced batches."""
        a = self.trace.checkpointed_saved_bytes if checkpointing else self.trace.saved_bytes
        b = self.trace_2x.checkpointed_saved_bytes if checkpointing else self.trace_2x.saved_bytes
        b1, b2 = self.trace.batch, self.trace_2x.batch
        slope = (b - a) / (b2 - b1)
        return int(a + slope * (batch - b1))


@dataclass
class StagePlan:
    """The memory table row of one stage, all figures per worker."""

    stage: str
    models: str
    batch: int
    zero_stage: int
    precision: str
    params: int
    state_bytes: int
    buffer_bytes: int
    activation_bytes: int
    activation_ckpt_bytes: int
    target_bytes: int
    optimizer_temp_bytes: int  # AdamW's temporaries during the optimizer step (activations are gone by then)
    reserve_bytes: int
    memory_bytes: int
    largest_batch: int
    largest_batch_ckpt: int
    step_tflop: float
    step_s: float
    step_ckpt_s: float
    checkpointing: bool
    notes: list[str] = field(default_factory=list)

    def total(self, checkpointing: bool) -> int:
        act = self.activation_ckpt_bytes if checkpointing else self.activation_bytes
        return step_peak(self.state_bytes + self.buffer_bytes + self.reserve_bytes, act + self.target_bytes,
                         self.optimizer_temp_bytes)

    @property
    def fits(self) -> bool:
        """Whether the stage as configured (with its own checkpointing setting) fits."""
        return self.total(self.checkpointing) <= self.memory_bytes


def step_peak(fixed: int, backward_held: int, optimizer_temps: int) -> int:
    """The step's peak: the backward (activations and targets held) or the optimizer step, the larger."""
    return fixed + max(backward_held, optimizer_temps)


def state_bytes(params: int, zero_stage: int, world: int, bf16_engine: bool, autocast_bf16: bool,
                ema_params: int) -> int:
    """Student + EMA (or frozen teacher) state per worker (the table in the module docstring)."""
    n = max(1, world)
    if zero_stage == 3:
        student = ((2 if bf16_engine else 4) + 4 + 4 + 4 + 8) * params / n
        return int(student + 4 * ema_params / n)
    student = 16 * params if zero_stage == 0 else 8 * params + 16 * params / n
    if autocast_bf16:
        student += 2 * params
    return int(student + 4 * ema_params)


def buffer_bytes(student_params: int, zero_stage: int, world: int, weight_bytes: int,
                 reduce_bucket: int = REDUCE_BUCKET) -> int:
    """ZeRO-3's whole-model working copies on more than one worker (module docstring); 0 otherwise."""
    if zero_stage != 3 or world <= 1:
        return 0
    return int(weight_bytes * (2 * student_params + min(reduce_bucket, student_params)))


def _precision(train: Any, hw: Hardware) -> tuple[str, bool, bool]:
    """(traced activation dtype, DeepSpeed bf16 engine, bf16 autocast) as ``train/loop.py`` decides them."""
    if train.precision == "auto" and hw.device == "cpu":
        from dino_ray.train.precision import cpu_bf16_flags

        bf16 = bool(cpu_bf16_flags())  # a CPU plan is for this machine: auto picks bf16 only where it is native
    else:
        bf16 = train.precision == "bf16" or (train.precision == "auto" and hw.device == "cuda")
    engine = bf16 and hw.device == "cuda" and train.zero_stage == 3
    return ("bf16" if bf16 else "fp32"), engine, bf16 and not engine


def plan_stage(stage: str, members: list[tuple[str, Any]], loss_cfg: Any, crops: Any, masking: Any, train: Any,
               hw: Hardware, teacher_cfg: Any = None) -> StagePlan:
    """Plan one training stage. ``members`` are (name, ModelConfig) of the trained students;
    ``teacher_cfg`` the frozen teacher's ModelConfig (distillation) or None (the EMA is the teacher)."""
    dtype, bf16_engine, autocast = _precision(train, hw)
    batch = train.batch_size_per_worker
    traced = [Member(name, trace_step(cfg, loss_cfg, crops, masking, batch, dtype),
                     trace_step(cfg, loss_cfg, crops, masking, 2 * batch, dtype)) for name, cfg in members]
    teacher = (trace_step(teacher_cfg, loss_cfg, crops, masking, batch, dtype, drop_path=False)
               if teacher_cfg is not None else None)
    weight_bytes = 2 if bf16_engine else 4
    bucket = train.zero3_reduce_bucket_size
    state = sum(state_bytes(m.params, train.zero_stage, hw.workers, bf16_engine, autocast, m.params) for m in traced)
    # members step one after the other: the largest student's working copies
    buffers = max(buffer_bytes(m.params, train.zero_stage, hw.workers, weight_bytes, bucket) for m in traced)
    total_params = sum(m.params for m in traced)
    if teacher is not None:
        t_params = sum(teacher.params.values())
        state += state_bytes(0, train.zero_stage, hw.workers, False, False, t_params)
        total_params += t_params
    targets = (teacher or traced[0].trace).target_bytes
    # torch's foreach AdamW builds two fp32 temporaries the size of what each worker updates
    optimizer_temps = max(8 * m.params // (hw.workers if train.zero_stage >= 1 else 1) for m in traced)
    fixed = state + buffers + hw.reserve_bytes

    def acts(b: int, ckpt: bool) -> int:
        return max(m.activations(b, ckpt) for m in traced)

    def targets_at(b: int) -> int:
        return int(targets * b / batch)

    def largest_batch(ckpt: bool) -> int:
        b = 0
        while b < 1 << 16 and step_peak(fixed, acts(b + 1, ckpt) + targets_at(b + 1),
                                        optimizer_temps) <= hw.memory_bytes:
            b += 1
        return b

    teacher_flops = (teacher.teacher_flops if teacher is not None else traced[0].trace.teacher_flops)
    student_flops = sum(m.trace.student_flops for m in traced)
    flops = 3 * student_flops + teacher_flops
    per_s = hw.peak_tflops * 1e12 * hw.utilisation
    notes = []
    if hw.device == "cuda" and dtype == "bf16" and not bf16_engine:
        notes.append("bf16 autocast over fp32 weights: activations traced in bf16; the fp32 residual stream adds some")
    return StagePlan(
        stage=stage, models=", ".join(m.name for m in traced) + (" (teacher frozen)" if teacher is not None else ""),
        batch=batch, zero_stage=train.zero_stage, precision=dtype, params=total_params, state_bytes=state,
        buffer_bytes=buffers, activation_bytes=acts(batch, False), activation_ckpt_bytes=acts(batch, True),
        target_bytes=targets, optimizer_temp_bytes=optimizer_temps, reserve_bytes=hw.reserve_bytes,
        memory_bytes=hw.memory_bytes,
        largest_batch=largest_batch(False), largest_batch_ckpt=largest_batch(True),
        step_tflop=flops / 1e12, step_s=flops / per_s, step_ckpt_s=(flops + student_flops) / per_s,
        checkpointing=train.activation_checkpointing, notes=notes)


def plan_job(job: Any, hw: Hardware, only: str | None = None) -> list[StagePlan]:
    """A plan row for every training stage the job runs (or only the stage ``only``)."""
    plans = []
    for stage in [s for s in job.stages if s in TRAINING_STAGES and only in (None, s)]:
        cfg = getattr(job, stage)
        if stage == "pretrain":
            plans.append(plan_stage(stage, [(cfg.model.arch, cfg.model)], cfg.loss, cfg.data.crops,
                                    cfg.data.masking, cfg.train, hw))
        elif stage == "highres":
            plans.append(plan_stage(stage, [(job.pretrain.model.arch, highres_model(job))], cfg.loss,
                                    cfg.data.crops, cfg.data.masking, cfg.train, hw))
        else:
            plans.append(plan_stage(stage, [(s.name, s.model) for s in cfg.students], cfg.loss, cfg.data.crops,
                                    None, cfg.train, hw, teacher_cfg=teacher_model(job, cfg.teacher)))
    return plans


def highres_model(job: Any) -> Any:
    """The model the highres stage trains: pretrain's, with the position embedding sized for highres.img_size."""
    from types import SimpleNamespace

    return SimpleNamespace(arch=job.pretrain.model.arch, backbone_kwargs=lambda: {
        **job.pretrain.model.backbone_kwargs(), "img_size": job.highres.img_size})


def teacher_model(job: Any, teacher: str) -> Any:
    """The distillation teacher's model config: a stage's own, or the config exported beside a checkpoint."""
    from types import SimpleNamespace

    if teacher == "pretrain" or (teacher == "highres" and "highres" not in job.stages):
        return job.pretrain.model
    if teacher == "highres":
        return highres_model(job)
    from dino_ray import backbone_io

    vit = dict(backbone_io.read_meta(teacher)["vit"])
    return SimpleNamespace(arch="vit_large", backbone_kwargs=lambda: vit)
