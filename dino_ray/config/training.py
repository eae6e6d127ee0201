"""The training-stage sections of a job: pretrain, highres and distill, and the parts they share.

Defaults follow the DINOv2 ViT-g/14 recipe (../shared/notes/dinov2-recipe.md, section 2.1); the
presets under ``jobs/presets/`` shrink it. Domain knobs are documented where they are defined (crops
in :mod:`dino_ray.data.crop_config`, losses in :mod:`dino_ray.losses.config`, schedules in
:mod:`dino_ray.train.schedules`). Field rules follow :mod:`dino_ray.config.fields`. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args

from dino_ray.config.fields import Checked, bounded, operational
from dino_ray.data.crop_config import MultiCropConfig
from dino_ray.data.decode import DecodeConfig
from dino_ray.data.masking import MaskingConfig
from dino_ray.data.source_config import SourceConfig
from dino_ray.losses.config import LossConfig
from dino_ray.train.alarms import CollapseConfig
from dino_ray.train.schedules import ScheduleConfig

Arch = Literal["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2"]
ARCH_NAMES: tuple[str, ...] = get_args(Arch)


@dataclass
class ModelConfig(Checked):
    """A ViT backbone; shapes match the official DINOv2 checkpoints for the named archs."""

    arch: Arch = "vit_giant2"
    patch_size: int = bounded(14, gt=0)
    img_size: int = bounded(224, gt=0)  # position embedding size; other sizes are interpolated
    num_register_tokens: int = bounded(0, ge=0)  # 4 for the "with registers" models
    drop_path_rate: float = bounded(0.4, ge=0.0, lt=1.0)  # uniform across blocks (g14: 0.4)
    layerscale_init: Optional[float] = 1e-5
    qkv_bias: bool = True
    ffn_layer: Optional[Literal["mlp", "swiglu"]] = None  # None: the arch's own (swiglu for giant2)
    # Overrides that shrink an arch for CPU demos and tests (None: the arch's own size).
    embed_dim: Optional[int] = bounded(None, gt=0)
    depth: Optional[int] = bounded(None, gt=0)
    num_heads: Optional[int] = bounded(None, gt=0)

    def validate(self) -> None:
        if self.embed_dim and self.num_heads and self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    def backbone_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(patch_size=self.patch_size, img_size=self.img_size,
                                  num_register_tokens=self.num_register_tokens,
                                  drop_path_rate=self.drop_path_rate, layerscale_init=self.layerscale_init,
                                  qkv_bias=self.qkv_bias)
        for name in ("ffn_layer", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        return kw


@dataclass
class ScalingConfig(Checked):
    """How many Ray Train workers and what each one gets (Ray Train ``ScalingConfig``)."""

    num_workers: int = bounded(1, ge=1)
    use_gpu: Literal["auto", "true", "false"] = "auto"  # auto: GPUs when the cluster has any
    cpus_per_worker: float = bounded(1.0, ge=0.0)
    gpus_per_worker: float = bounded(1.0, ge=0.0)
    accelerator_type: Optional[str] = None  # e.g. "H100"; None: any
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Memory of each worker's GPU, e.g. "80GB": validation then plans the stage (`dino-ray plan`) and refuses
    # a job whose step does not fit, with the plan's table, before any cluster work. None: not checked.
    gpu_memory: Optional[str] = bounded(None, operational=True)

    def validate(self) -> None:
        if self.gpu_memory is not None:
            from dino_ray.config.units import parse_bytes

            parse_bytes(self.gpu_memory)


@dataclass
class TrainConfig(Checked):
    """The loop: batch, precision, checkpoints, DeepSpeed, failure handling (length and clipping: schedule)."""

    batch_size_per_worker: int = bounded(12, ge=2)  # g14: 12 per GPU x 256 GPUs = 3072 (length: schedule.total_iters)
    zero_stage: int = bounded(3, ge=0, le=3)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the device multiplies bf16 natively (CUDA, AVX512-BF16/AMX CPUs)
    log_every: int = bounded(10, ge=1, operational=True)
    checkpoint_every: int = bounded(1000, ge=1, operational=True)
    keep_checkpoints: int = bounded(2, ge=1, operational=True)
    max_failures: int = bounded(3, ge=0, operational=True)  # worker-group restarts from the last checkpoint
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    data_cpus: float = bounded(0.25, gt=0.0, operational=True)  # CPUs per preprocessing task (fractional: shares small clusters)
    data_workers: int = bounded(2, ge=1, operational=True)  # preprocessing actors per train worker
    threads_per_worker: Optional[int] = bounded(None, ge=1)  # torch intra-op threads (None: leave as is)
    # Recompute each transformer block's activations during the backward: a step then keeps one block's
    # activations instead of all of them, for one more forward of compute (`dino-ray plan` shows both).
    activation_checkpointing: bool = bounded(False, operational=True)
    # ZeRO-3 reduces gradients in buckets of this many elements (DeepSpeed's default): a smaller bucket holds
    # less memory per worker for more collectives per step; `dino-ray plan` counts it.
    zero3_reduce_bucket_size: int = bounded(500_000_000, ge=1, operational=True)
    # What a collapse alarm does (dino_ray.train.alarms): warn = log + tag the MLflow run and go on;
    # stop = also end the stage with an error, after checkpointing the current step.
    on_collapse: Literal["warn", "stop"] = "warn"
    collapse: CollapseConfig = field(default_factory=CollapseConfig)


@dataclass
class MonitorConfig(Checked):
    """A small labeled set measured every ``every`` steps while a stage trains (dino_ray.evals.monitor):
    kNN and a closed-form linear probe on the model's CLS features, raw pixels once as the reference,
    and a patch-PCA picture, all logged to the stage's MLflow run. ``every: 0`` turns it off."""

    train: SourceConfig = bounded(default_factory=lambda: SourceConfig(uri="", labels_from_folders=True),
                                  input="required")
    test: SourceConfig = bounded(default_factory=lambda: SourceConfig(uri="", labels_from_folders=True),
                                 input="required")
    every: int = bounded(0, ge=0)
    image_size: Optional[int] = bounded(None, gt=0)  # None: the stage's global crop size
    knn_k: int = bounded(20, ge=1)
    ridge: float = bounded(1e-2, gt=0.0)  # closed-form probe penalty, relative to the mean Gram eigenvalue
    batch_size: int = bounded(256, ge=1)
    pca_images: int = bounded(4, ge=0)

    @property
    def enabled(self) -> bool:
        """Off (``every: 0``): it reads nothing, so its folders are not checked."""
        return self.every > 0

    def validate(self) -> None:
        if self.every and not (self.train.uri and self.test.uri):
            raise ValueError("monitor.every is set, so monitor.train.uri and monitor.test.uri must name labeled "
                             "folders (one sub-folder per class)")
        for split in ("train", "test"):
            src = getattr(self, split)
            if self.every and not (src.labels_from_folders or src.label_column):
                raise ValueError(f"monitor.{split} has no labels: set monitor.{split}.labels_from_folders: true (one "
                                 f"sub-folder per class) or monitor.{split}.label_column")


@dataclass
class SSLDataConfig(Checked):
    """What a training stage reads and how it cuts crops from it."""

    source: SourceConfig = field(default_factory=lambda: SourceConfig(uri=""))  # "": upstream stage's output
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)


def check_patch_grid(model: ModelConfig, data: SSLDataConfig) -> None:
    """Crops must tile into the model's patches, and masks must be drawn on the model's grid."""
    crops = data.crops
    if crops.patch_size != model.patch_size:
        raise ValueError(f"data.crops.patch_size {crops.patch_size} differs from model.patch_size "
                         f"{model.patch_size}: iBOT masks would not match the patch grid")
    for name in ("global_crops_size", "local_crops_size"):
        if getattr(crops, name) % model.patch_size:
            raise ValueError(f"data.crops.{name} {getattr(crops, name)} is not a multiple of patch_size "
                             f"{model.patch_size}")


@dataclass
class TrainingStageConfig(Checked):
    """What every training stage has: its data and crops, objective, schedule, loop and monitor."""

    data: SSLDataConfig = field(default_factory=SSLDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = operational(MonitorConfig)


@dataclass
class PretrainConfig(TrainingStageConfig):
    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> None:
        check_patch_grid(self.model, self.data)


def _highres_data() -> SSLDataConfig:
    return SSLDataConfig(crops=MultiCropConfig(global_crops_size=518, local_crops_size=224))


@dataclass
class HighResConfig(TrainingStageConfig):
    """A short continuation at high resolution (paper sec. 4 / app. B.2: 518 px, 10k iterations)."""

    data: SSLDataConfig = field(default_factory=_highres_data)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        total_iters=10_000, warmup_iters=1000, warmup_teacher_temp_iters=0, freeze_last_layer_iters=0))
    enabled: bool = True
    img_size: int = bounded(518, gt=0)  # new position-embedding size (interpolated from pretrain)


@dataclass
class StudentConfig(Checked):
    name: str = "vit_large"  # output folder and MLflow name
    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="vit_large", drop_path_rate=0.0,
                                                                   ffn_layer="mlp"))


@dataclass
class DistillConfig(TrainingStageConfig):
    """Students taught by the frozen teacher from one teacher forward per batch (paper sec. 5)."""

    # A stage name ("highres", "pretrain") or a backbone checkpoint URI.
    teacher: str = bounded("highres", uri=True, input="required")
    students: list[StudentConfig] = field(default_factory=lambda: [StudentConfig()])

    def validate(self) -> None:
        if not self.students:
            raise ValueError("distill needs at least one student")
        for student in self.students:
            check_patch_grid(student.model, self.data)
        names = [s.name for s in self.students]
        if len(set(names)) != len(names):
            raise ValueError(f"student names must be unique, got {names}")
