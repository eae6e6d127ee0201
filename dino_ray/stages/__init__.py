"""The stage registry: the one place that names the stages, their code and what each reads.

Stage code is imported only when the stage runs, so validating a job or skipping finished stages
never pays for torch, DeepSpeed or faiss imports.
"""

from __future__ import annotations

import dataclasses

from dino_ray.config.schema import TRAINING_STAGES
from dino_ray.stages.contract import StageSpec

TRAIN_STATE = "ray_train"  # a training stage's Ray Train run folder (checkpoints); see stages/training.py


def _curate_needs(job) -> list[str]:
    return []


def _pretrain_needs(job) -> list[str]:
    return [] if job.pretrain.data.source.uri else ["curate"]


def _highres_needs(job) -> list[str]:
    return ["pretrain"] if job.highres.data.source.uri else ["curate", "pretrain"]


def _distill_needs(job) -> list[str]:
    needs = [job.distill.teacher] if job.distill.teacher in ("highres", "pretrain") else []
    return needs if job.distill.data.source.uri else ["curate", *needs]


def _eval_needs(job) -> list[str]:
    return [b for b in job.eval.backbones if b in TRAINING_STAGES]


def _curate_reads(job) -> dict:
    """The bootstrap embedder (when curate trains its own) trains with pretrain's recipe."""
    embed = job.curate.embed
    if embed.checkpoint or not embed.bootstrap_iterations:
        return {}
    pre = job.pretrain
    data = {f.name: getattr(pre.data, f.name) for f in dataclasses.fields(pre.data) if f.name != "source"}
    return {"pretrain.data": data, "pretrain.loss": pre.loss, "pretrain.schedule": pre.schedule,
            "pretrain.train": pre.train}


def _eval_reads(job) -> dict:
    """Eval decodes its images with curate's decode policy."""
    return {"curate.decode": job.curate.decode}


REGISTRY: dict[str, StageSpec] = {
    "curate": StageSpec("curate", "dino_ray.stages.curate:run", _curate_needs,
                        keep_on_change=("bootstrap", "embeddings"), reads=_curate_reads),
    "pretrain": StageSpec("pretrain", "dino_ray.stages.pretrain:run", _pretrain_needs, resumable=(TRAIN_STATE,)),
    "highres": StageSpec("highres", "dino_ray.stages.highres:run", _highres_needs, resumable=(TRAIN_STATE,)),
    "distill": StageSpec("distill", "dino_ray.stages.distill:run", _distill_needs, resumable=(TRAIN_STATE,)),
    "eval": StageSpec("eval", "dino_ray.stages.eval:run", _eval_needs, keep_on_change=("features",),
                      reads=_eval_reads),
}
