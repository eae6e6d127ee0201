"""The typed job config: one dataclass per stage, composed from the domain configs.

Defaults follow the DINOv2 ViT-g/14 recipe (../shared/notes/dinov2-recipe.md, section 2.1); the
presets under ``jobs/presets/`` shrink it. Domain knobs are documented where they are defined (crops
in :mod:`dino_ray.data.multicrop`, losses in :mod:`dino_ray.losses.config`, schedules in
:mod:`dino_ray.train.schedules`, curation in :mod:`dino_ray.curation.config`, probes in
:mod:`dino_ray.evals.config`). Nothing here imports torch, so a bad config fails in well under a second.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from dino_ray import storage
from dino_ray.config.typed import ConfigError, bounded, operational
from dino_ray.curation.config import CurationConfig
from dino_ray.data.decode import DecodeConfig
from dino_ray.data.masking import MaskingConfig
from dino_ray.data.crop_config import MultiCropConfig
from dino_ray.data.sources import SourceConfig
from dino_ray.evals.config import LinearGridConfig
from dino_ray.losses.config import LossConfig
from dino_ray.train.alarms import CollapseConfig
from dino_ray.train.schedules import ScheduleConfig

ARCH_NAMES = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2")
STAGE_NAMES = ("curate", "pretrain", "highres", "distill", "eval")


@dataclass
class ModelConfig:
    """A ViT backbone; shapes match the official DINOv2 checkpoints for the named archs."""

    arch: str = bounded("vit_giant2", choices=ARCH_NAMES)
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
class ScalingConfig:
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
            from dino_ray.plan import parse_bytes

            parse_bytes(self.gpu_memory)


@dataclass
class TrainConfig:
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
    # What a collapse alarm does (dino_ray.train.alarms): warn = log + tag the MLflow run and go on;
    # stop = also end the stage with an error, after checkpointing the current step.
    on_collapse: Literal["warn", "stop"] = "warn"
    collapse: CollapseConfig = field(default_factory=CollapseConfig)


@dataclass
class MonitorConfig:
    """A small labeled set measured every ``every`` steps while a stage trains (dino_ray.evals.monitor):
    kNN and a closed-form linear probe on the model's CLS features, raw pixels once as the reference,
    and a patch-PCA picture, all logged to the stage's MLflow run. ``every: 0`` turns it off."""

    train: SourceConfig = field(default_factory=lambda: SourceConfig(uri="", labels_from_folders=True))
    test: SourceConfig = field(default_factory=lambda: SourceConfig(uri="", labels_from_folders=True))
    every: int = bounded(0, ge=0)
    image_size: Optional[int] = bounded(None, gt=0)  # None: the stage's global crop size
    knn_k: int = bounded(20, ge=1)
    ridge: float = bounded(1e-2, gt=0.0)  # closed-form probe penalty, relative to the mean Gram eigenvalue
    batch_size: int = bounded(256, ge=1)
    pca_images: int = bounded(4, ge=0)

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
class SSLDataConfig:
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
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SSLDataConfig = field(default_factory=SSLDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = operational(MonitorConfig)

    def validate(self) -> None:
        check_patch_grid(self.model, self.data)


def _highres_data() -> SSLDataConfig:
    return SSLDataConfig(crops=MultiCropConfig(global_crops_size=518, local_crops_size=224))


@dataclass
class HighResConfig:
    """A short continuation at high resolution (paper sec. 4 / app. B.2: 518 px, 10k iterations)."""

    enabled: bool = True
    img_size: int = bounded(518, gt=0)  # new position-embedding size (interpolated from pretrain)
    data: SSLDataConfig = field(default_factory=_highres_data)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        total_iters=10_000, warmup_iters=1000, warmup_teacher_temp_iters=0, freeze_last_layer_iters=0))
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = operational(MonitorConfig)


@dataclass
class StudentConfig:
    name: str = "vit_large"  # output folder and MLflow name
    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="vit_large", drop_path_rate=0.0,
                                                                   ffn_layer="mlp"))


@dataclass
class DistillConfig:
    """Students taught by the frozen teacher from one teacher forward per batch (paper sec. 5)."""

    teacher: str = "highres"  # a stage name ("highres", "pretrain") or a backbone checkpoint URI
    students: list[StudentConfig] = field(default_factory=lambda: [StudentConfig()])
    data: SSLDataConfig = field(default_factory=SSLDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = operational(MonitorConfig)

    def validate(self) -> None:
        if not self.students:
            raise ValueError("distill needs at least one student")
        for student in self.students:
            check_patch_grid(student.model, self.data)
        names = [s.name for s in self.students]
        if len(set(names)) != len(names):
            raise ValueError(f"student names must be unique, got {names}")


@dataclass
class EmbedConfig:
    """The frozen backbone that embeds images for curation."""

    checkpoint: str = ""  # an exported backbone dir (backbone.pth + backbone.json); "" -> bootstrap below
    # With no checkpoint: train a small SSL embedder on the raw pool first, for this many iterations, with
    # the pretrain stage's settings (useful for domains no public model knows). 0 = a checkpoint is required.
    bootstrap_iterations: int = bounded(0, ge=0)
    shard_size: int = bounded(4096, ge=1)  # images per embedding shard (the unit of resume)
    center: bool = True  # subtract the pool mean before cosine comparisons (see stages/curate.py)
    flip_invariant: bool = True  # embed an image and its mirror together: mirrored copies are copies
    model: ModelConfig = field(default_factory=lambda: ModelConfig(drop_path_rate=0.0))
    image_size: int = bounded(224, gt=0)
    batch_size: int = bounded(64, ge=1)
    num_actors: int = bounded(1, ge=1)
    cpus_per_actor: float = bounded(1.0, gt=0.0)
    gpus_per_actor: float = bounded(0.0, ge=0.0)


@dataclass
class CurateConfig:
    """Embed a raw pool, deduplicate, decontaminate, cluster and sample it into a curated manifest."""

    pool: SourceConfig = field(default_factory=lambda: SourceConfig(uri=""))
    eval_sets: list[SourceConfig] = field(default_factory=list)  # images to keep out of the pool
    seed_set: Optional[SourceConfig] = None  # curated seed images for retrieval
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)


@dataclass
class LabeledDatasetConfig:
    name: str = "dataset"
    train: SourceConfig = field(default_factory=lambda: SourceConfig(uri="", labels_from_folders=True))
    test: SourceConfig = field(default_factory=lambda: SourceConfig(uri="", labels_from_folders=True))
    image_size: int = bounded(224, gt=0)


@dataclass
class KNNConfig:
    """Weighted kNN on cosine similarity (DINOv2 protocol)."""

    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = bounded(0.07, gt=0.0)


@dataclass
class EvalConfig:
    """Which backbones to judge on which labeled sets, and how."""

    backbones: list[str] = field(default_factory=lambda: ["pretrain", "highres", "distill"])
    baselines: list[Literal["random", "pixels"]] = field(default_factory=lambda: ["random", "pixels"])
    datasets: list[LabeledDatasetConfig] = field(default_factory=list)
    knn: KNNConfig = field(default_factory=KNNConfig)
    linear: LinearGridConfig = field(default_factory=LinearGridConfig)
    linear_enabled: bool = True
    linear_trial_cpus: float = bounded(1.0, gt=0.0)  # Ray Tune resources per linear-probe trial
    val_fraction: float = bounded(0.1, gt=0.0, lt=1.0)  # of train, held out to choose the probe head
    retrieval_ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    pca_images: int = bounded(4, ge=0)
    batch_size: int = bounded(64, ge=1)
    extract_cpus: float = bounded(1.0, gt=0.0)
    extract_gpus: float = bounded(0.0, ge=0.0)
    tune_max_concurrent: int = bounded(2, ge=1)


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: $RAY_ADDRESS (inside `ray job submit`) or a local instance
    num_cpus: Optional[int] = bounded(None, ge=1)  # logical CPUs of the local instance (None: cores)


@dataclass
class TrackingConfig:
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here
    experiment: str = "dino-ray"
    run_name: Optional[str] = None
    # Exported backbones up to this size are logged as MLflow models and registered (ViT-g/14 fp32 is
    # 4.4 GB); a bigger one gets a LOCATION.txt pointer in its run instead of a copy.
    max_model_gb: float = bounded(8.0, ge=0.0)


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class JobConfig:
    """A job YAML: which stages to run, where outputs go, and every stage's settings."""

    name: str = "dino-ray"
    output_root: str = "outputs/run"  # local folder or s3://bucket/prefix; every stage writes under it
    stages: list[str] = field(default_factory=lambda: list(STAGE_NAMES))
    seed: int = bounded(0, ge=0)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    runtime_env: dict[str, Any] = field(default_factory=dict)  # used by `dino-ray submit`
    curate: CurateConfig = field(default_factory=CurateConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    highres: HighResConfig = field(default_factory=HighResConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sources: list[str] = field(default_factory=list, repr=False)  # files read, filled by the loader

    def validate(self) -> None:
        root = self.output_root.strip()
        if root.rstrip("/") in ("", "s3:", "~"):
            raise ConfigError(f"{self.output_root!r} is not a folder of its own: every stage writes (and replaces "
                              "its outputs) under it; give a dedicated folder such as outputs/run", "output_root")
        unknown = [s for s in self.stages if s not in STAGE_NAMES]
        if unknown:
            import difflib

            hints = [difflib.get_close_matches(s, STAGE_NAMES, n=1) for s in unknown]
            hint = "".join(f"; did you mean {h[0]!r}?" for h in hints if h)
            raise ConfigError(f"unknown stage(s) {unknown}{hint} (stages are {list(STAGE_NAMES)})", "stages")
        self.stages = [s for s in STAGE_NAMES if s in self.stages]
        try:
            check_patch_grid(self.pretrain.model, self.highres.data)  # high-res continues the pretrain model
        except ValueError as e:
            raise ConfigError(f"{e} (highres.data vs pretrain.model)", "highres.data.crops") from None
        if self.highres.img_size % self.pretrain.model.patch_size:
            raise ConfigError(f"{self.highres.img_size} is not a multiple of pretrain.model.patch_size "
                              f"{self.pretrain.model.patch_size}", "highres.img_size")
        # highres starts from pretrain's heads, distill loads its teacher stage's heads: same shapes or a
        # strict-load failure inside every worker, after the cluster has started.
        loaders = [("highres", "pretrain")]
        if self.distill.teacher in ("pretrain", "highres"):
            loaders.append(("distill", self.distill.teacher))
        for stage, source in loaders:
            mine, theirs = getattr(self, stage).loss.head_shapes(), getattr(self, source).loss.head_shapes()
            diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
            if diff:
                said = ", ".join(f"{k}: {a} in {source}, {b} here" for k, (a, b) in diff.items())
                raise ConfigError(f"heads differ from the {source} stage it loads ({said})", f"{stage}.loss")
        names = [("distill.students", s.name) for s in self.distill.students] + \
            [("eval.datasets", d.name) for d in self.eval.datasets]
        for key, name in names:
            if not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
                raise ConfigError(f"name {name!r} must be one folder name (letters, digits, '.', '_', '-'): "
                                  "it becomes an output folder and an MLflow name", key)

    def stage_names(self) -> tuple[str, ...]:
        return STAGE_NAMES

    def absolutize(self, base: str | None = None) -> None:
        """Make local paths absolute: Ray workers run in their own working directories."""
        def fix(uri: str) -> str:
            if not uri or storage.is_remote(uri) or uri in STAGE_NAMES:
                return uri
            return os.path.abspath(os.path.join(base or os.getcwd(), os.path.expanduser(uri)))

        self.output_root = fix(self.output_root)
        monitors = [m for st in (self.pretrain, self.highres, self.distill) for m in (st.monitor.train, st.monitor.test)]
        sources = [*monitors, self.curate.pool, *self.curate.eval_sets, self.pretrain.data.source, self.highres.data.source,
                   self.distill.data.source, *[d.train for d in self.eval.datasets], *[d.test for d in self.eval.datasets]]
        if self.curate.seed_set is not None:
            sources.append(self.curate.seed_set)
        for src in sources:
            src.uri = fix(src.uri)
        self.curate.embed.checkpoint = fix(self.curate.embed.checkpoint)
        self.distill.teacher = fix(self.distill.teacher)
        self.eval.backbones = [fix(b) for b in self.eval.backbones]

    def check_inputs(self, source: str | None = None) -> None:
        """Input paths that must exist before any cluster work starts."""
        checks: list[tuple[str, str]] = []
        if "curate" in self.stages:
            checks.append(("curate.pool.uri", self.curate.pool.uri))
            checks += [(f"curate.eval_sets[{i}].uri", s.uri) for i, s in enumerate(self.curate.eval_sets)]
            if self.curate.seed_set is not None:
                checks.append(("curate.seed_set.uri", self.curate.seed_set.uri))
            if self.curate.embed.checkpoint:
                checks.append(("curate.embed.checkpoint", self.curate.embed.checkpoint))
            elif self.curate.embed.bootstrap_iterations == 0:
                raise ConfigError("is empty: give an exported backbone dir, or set curate.embed.bootstrap_iterations "
                                  "> 0 to train an embedder on the pool first", "curate.embed.checkpoint", source)
        if "distill" in self.stages and self.distill.teacher not in STAGE_NAMES:
            checks.append(("distill.teacher", self.distill.teacher))  # an exported SSL checkpoint folder
        for stage in ("pretrain", "distill"):
            if stage in self.stages and getattr(self, stage).data.source.uri:
                checks.append((f"{stage}.data.source.uri", getattr(self, stage).data.source.uri))
        for stage in ("pretrain", "highres", "distill"):
            monitor = getattr(self, stage).monitor
            if stage in self.stages and monitor.every:
                checks += [(f"{stage}.monitor.train.uri", monitor.train.uri), (f"{stage}.monitor.test.uri",
                                                                                 monitor.test.uri)]
        if "eval" in self.stages:
            for i, d in enumerate(self.eval.datasets):
                checks += [(f"eval.datasets[{i}].train.uri", d.train.uri), (f"eval.datasets[{i}].test.uri", d.test.uri)]
        for key, uri in checks:
            if not uri:
                raise ConfigError("is empty: set the path or URI of the input", key, source)
            if not storage.is_remote(uri) and not os.path.exists(os.path.expanduser(uri)):
                raise ConfigError(f"input path does not exist: {uri}", key, source)
