"""What a stage and the pipeline runner agree on: the registry entry, the context a stage gets, its result.

Stage modules import this, never :mod:`dino_ray.pipeline`, so the runner depends on the stages and not
the other way round.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from typing import Any, Callable, Mapping, Sequence

from dino_ray import storage
from dino_ray.config.typed import ConfigError


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """A registered stage: where its code is and which stages' outputs it reads for a given config."""

    name: str
    entry: str | Callable[..., "StageResult"]  # "package.module:function", imported only when the stage runs
    needs: Callable[[Any], Sequence[str]] = lambda cfg: ()
    # Sub-folders that survive a change of the stage's key (content-addressed caches); everything else
    # in the stage folder is removed first, so a changed stage never resumes stale training state.
    keep_on_change: tuple[str, ...] = ()
    # Sub-folders that ``--resume-from-checkpoint`` keeps in place when the key changes (training state), so
    # the new config continues from the old run's last checkpoint instead of starting over.
    resumable: tuple[str, ...] = ()
    # Config outside the stage's own section that decides its results, by a name for the key: curate's
    # bootstrap embedder trains with pretrain's recipe, eval decodes images with curate's decode policy.
    # Part of the stage's key, so changing it re-runs the stage.
    reads: Callable[[Any], Mapping[str, Any]] = lambda job: {}

    def load(self) -> Callable[..., "StageResult"]:
        if callable(self.entry):
            return self.entry
        module, _, fn = self.entry.partition(":")
        return getattr(importlib.import_module(module), fn)


@dataclasses.dataclass
class StageResult:
    outputs: dict[str, str]
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StageContext:
    """What a stage gets from the runner: where to write, what upstream produced, where to log."""

    stage: str
    job: Any
    stage_dir: str
    upstream: dict[str, dict[str, str]]
    tracking_uri: str
    run_id: str
    parent_run_id: str
    ensure_ray: Callable[[], None]
    started_at: float = dataclasses.field(default_factory=time.time)  # stage overhead is measured from here

    def path(self, *parts: str) -> str:
        return storage.join(self.stage_dir, *parts)

    def input(self, stage: str, output: str) -> str:
        try:
            return self.upstream[stage][output]
        except KeyError:
            raise ConfigError(f"stage {self.stage} needs output {output!r} of stage {stage!r}, "
                              f"which is not available (have: {self.upstream})") from None


class NonRetryableError(RuntimeError):
    """A failure that running the same config again would repeat (a NaN loss, a collapse stop, a checkpoint
    past the schedule). Stages return these from the workers instead of raising there, so Ray Train does not
    restart the worker group; the pipeline records them (``_failed.json``), so a retried job (a RayJob's
    ``backoffLimit``, a re-submitted ``ray job``) fails in seconds with the same message instead of training
    into the same failure on a fresh cluster."""
