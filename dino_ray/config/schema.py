"""The typed job config: which stages run, where outputs go, and one section per stage.

The training-stage sections live in :mod:`dino_ray.config.training`; curation, evaluation and the job
itself here. Domain knobs are documented where they are defined (curation in
:mod:`dino_ray.curation.config`, probes in :mod:`dino_ray.evals.config`). Field rules follow
:mod:`dino_ray.config.fields`. Nothing here imports torch, so a bad config fails in well under a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from dino_ray import storage
from dino_ray.config.fields import Checked, ConfigError, bounded, uri_fields
from dino_ray.config.training import DistillConfig, HighResConfig, ModelConfig, PretrainConfig, check_patch_grid
from dino_ray.curation.config import CurationConfig
from dino_ray.data.decode import DecodeConfig
from dino_ray.data.source_config import SourceConfig
from dino_ray.evals.config import LinearGridConfig


def stage(default_factory: Any) -> Any:
    """A stage's section of :class:`JobConfig`; :data:`STAGE_NAMES` lists these fields, in order."""
    return dataclasses.field(default_factory=default_factory, metadata={"stage": True})


@dataclass
class EmbedConfig(Checked):
    """The frozen backbone that embeds images for curation."""

    # An exported backbone dir (backbone.pth + backbone.json); "" -> bootstrap below.
    checkpoint: str = bounded("", uri=True, input="optional")
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
class CurateConfig(Checked):
    """Embed a raw pool, deduplicate, decontaminate, cluster and sample it into a curated manifest."""

    pool: SourceConfig = bounded(default_factory=lambda: SourceConfig(uri=""), input="required")
    eval_sets: list[SourceConfig] = bounded(default_factory=list, input="required")  # kept out of the pool
    seed_set: Optional[SourceConfig] = bounded(None, input="required")  # curated seed images for retrieval
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)


@dataclass
class LabeledDatasetConfig(Checked):
    name: str = "dataset"
    train: SourceConfig = bounded(default_factory=lambda: SourceConfig(uri="", labels_from_folders=True),
                                  input="required")
    test: SourceConfig = bounded(default_factory=lambda: SourceConfig(uri="", labels_from_folders=True),
                                 input="required")
    image_size: int = bounded(224, gt=0)


@dataclass
class KNNConfig(Checked):
    """Weighted kNN on cosine similarity (DINOv2 protocol)."""

    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = bounded(0.07, gt=0.0)


@dataclass
class EvalConfig(Checked):
    """Which backbones to judge on which labeled sets, and how."""

    # Stage names, or exported backbone dirs (made absolute, not checked before the run).
    backbones: list[str] = bounded(default_factory=lambda: ["pretrain", "highres", "distill"], uri=True)
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
class RayConfig(Checked):
    address: Optional[str] = None  # None: $RAY_ADDRESS (inside `ray job submit`) or a local instance
    num_cpus: Optional[int] = bounded(None, ge=1)  # logical CPUs of the local instance (None: cores)


@dataclass
class TrackingConfig(Checked):
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here
    experiment: str = "dino-ray"
    run_name: Optional[str] = None
    # Exported backbones up to this size are logged as MLflow models and registered (ViT-g/14 fp32 is
    # 4.4 GB); a bigger one gets a LOCATION.txt pointer in its run instead of a copy.
    max_model_gb: float = bounded(8.0, ge=0.0)


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class JobConfig(Checked):
    """A job YAML: which stages to run, where outputs go, and every stage's settings."""

    name: str = "dino-ray"
    # Local folder or s3://bucket/prefix; every stage writes under it.
    output_root: str = bounded("outputs/run", uri=True)
    stages: list[str] = field(default_factory=lambda: list(STAGE_NAMES))
    seed: int = bounded(0, ge=0)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    runtime_env: dict[str, Any] = field(default_factory=dict)  # used by `dino-ray submit`
    curate: CurateConfig = stage(CurateConfig)
    pretrain: PretrainConfig = stage(PretrainConfig)
    highres: HighResConfig = stage(HighResConfig)
    distill: DistillConfig = stage(DistillConfig)
    eval: EvalConfig = stage(EvalConfig)
    sources: list[str] = field(default_factory=list, repr=False)  # files read, filled by the loader

    def validate(self) -> None:
        root = self.output_root.strip()
        if root.rstrip("/") in ("", "s3:", "~"):
            raise ConfigError(f"{self.output_root!r} is not a folder of its own: every stage writes (and replaces "
                              "its outputs) under it; give a dedicated folder such as outputs/run", "output_root")
        unknown = [s for s in self.stages if s not in STAGE_NAMES]
        if unknown:
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
        for stage, source in [(st, src) for st, src in loaders if st in self.stages]:
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
        """Make local paths absolute (every ``uri`` field): Ray workers run in their own working directories."""
        for f in uri_fields(self):
            if f.value and not storage.is_remote(f.value) and f.value not in STAGE_NAMES:
                f.set(os.path.abspath(os.path.join(base or os.getcwd(), os.path.expanduser(f.value))))

    def check_inputs(self, source: str | None = None) -> None:
        """Input paths (``input`` fields of the stages that run) that must exist before any cluster work;
        every problem is reported at once."""
        errors: list[ConfigError] = []
        embed = self.curate.embed
        if "curate" in self.stages and not embed.checkpoint and embed.bootstrap_iterations == 0:
            errors.append(ConfigError("is empty: give an exported backbone dir, or set curate.embed."
                                      "bootstrap_iterations > 0 to train an embedder on the pool first",
                                      "curate.embed.checkpoint", source))
        for name in self.stages:
            for f in uri_fields(getattr(self, name), name, active_only=True):
                if f.input is None or f.value in STAGE_NAMES:
                    continue
                if not f.value:
                    if f.input == "required":
                        errors.append(ConfigError("is empty: set the path or URI of the input", f.key, source))
                elif not storage.is_remote(f.value) and not os.path.exists(os.path.expanduser(f.value)):
                    errors.append(ConfigError(f"input path does not exist: {f.value}", f.key, source))
        if errors:
            raise ConfigError.combine(errors, source)


STAGE_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(JobConfig) if f.metadata.get("stage"))
# the stages that train (their section has a `train` loop config): they export backbones, and `dino-ray plan` plans them
TRAINING_STAGES: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(JobConfig)
    if f.metadata.get("stage") and any(g.name == "train" for g in dataclasses.fields(f.default_factory())))
