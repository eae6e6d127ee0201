"""Run a chain of stages with manifests, skip/resume and one MLflow parent run.

A stage is a function ``run(cfg, ctx) -> StageResult`` named in the registry
(:mod:`dino_ray.stages`); the runner never looks inside it. What the runner owns:

* **Keys.** A stage's key hashes its own config section, the job seed and the *run tokens* of the
  upstream manifests it reads. A stage whose manifest carries the same key is skipped; a changed
  config changes the key, and the fresh run token then changes every downstream key, so exactly the
  stage and what depends on it re-run. Deleting a stage's output does the same.
* **Manifests.** Written last, after the stage's outputs, so a manifest means "complete".
* **Resume.** A failed stage leaves no manifest; the next run starts it again with the same MLflow
  run (same key) and, for training, the same Ray Train run name, so it continues from its last
  checkpoint. Earlier stages' outputs are never touched. A training stage whose config changed starts
  over unless the user asks it to continue (``resume``: ``--resume-from-checkpoint STAGE``), which keeps
  its checkpoints and moves only its other outputs aside.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable, Mapping, Sequence

import yaml

from dino_ray import storage, tracking
from dino_ray.config.loader import config_hash
from dino_ray.config.typed import ConfigError, flatten, to_dict
from dino_ray.pipeline_runs import PipelineRuns
from dino_ray.stage_records import (FAILURE_RECORD, MANIFEST, REPLACED, known_failure,
                                    name_of, read_manifest, read_record, refuse_foreign, replaceable, run_reason)
from dino_ray.stages.contract import NonRetryableError, StageContext, StageResult, StageSpec

__all__ = ["NonRetryableError", "Pipeline", "PipelineEvents", "StageContext", "StageFailed", "StageResult",
           "StageSpec"]

log = logging.getLogger("dino_ray.pipeline")

class StageFailed(RuntimeError):
    def __init__(self, stage: str, cause: BaseException):
        self.stage = stage
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {cause}")


class PipelineEvents:
    """What the runner tells an observer (the console, :class:`dino_ray.console.Console`); by default, logs."""

    def stage_skipped(self, name: str, manifest: Mapping[str, Any]) -> None:
        log.info("stage %s: up to date (key %s), skipped", name, manifest.get("key"))

    def stage_started(self, name: str, reason: str) -> None:
        log.info("stage %s: running (%s)", name, reason)

    def stage_finished(self, name: str, manifest: Mapping[str, Any]) -> None:
        log.info("stage %s: done in %.1f s", name, manifest.get("seconds", 0))

    def stage_failed(self, name: str, error: BaseException, seconds: float) -> None:
        log.info("stage %s: failed after %.1f s", name, seconds)


class Pipeline:
    """Runs ``job.stages`` in registry order under ``job.output_root``."""

    def __init__(self, job: Any, registry: Mapping[str, StageSpec] | None = None,
                 ensure_ray: Callable[[], None] | None = None, events: PipelineEvents | None = None):
        if registry is None:
            from dino_ray.stages import REGISTRY as registry  # noqa: N811
        self.job = job
        self.registry = dict(registry)
        self.ensure_ray = ensure_ray or (lambda: None)
        self.events = events or PipelineEvents()
        unknown = [s for s in job.stages if s not in self.registry]
        if unknown:
            raise ConfigError(f"unknown stage(s) {unknown}; known: {list(self.registry)}", "stages")

    # ------------------------------------------------------------------ planning
    def stage_dir(self, name: str) -> str:
        return storage.join(self.job.output_root, name)

    def ordered(self) -> list[str]:
        return [s for s in self.registry if s in self.job.stages]

    def key(self, name: str, tokens: Mapping[str, str]) -> str:
        return config_hash({"stage": name, **self._config_read(name), "seed": self.job.seed,
                            "upstream": dict(sorted(tokens.items()))})

    def section_hash(self, name: str) -> str:
        """The hash of the config that decides the stage's results (operational fields left out)."""
        return config_hash(self._config_read(name))

    def _config_read(self, name: str) -> dict[str, Any]:
        """The stage's own section, and what it reads of other sections (``StageSpec.reads``)."""
        out = {"config": to_dict(getattr(self.job, name, None), results_only=True)}
        reads = self.registry[name].reads(self.job)
        if reads:
            out["reads"] = {k: to_dict(v, results_only=True) for k, v in sorted(reads.items())}
        return out

    def check_inputs(self) -> None:
        """Fail before any cluster work when a stage reads a stage that neither ran nor will run."""
        planned = set(self.ordered())
        for name in self.ordered():
            stage_dir = self.stage_dir(name)
            if not read_record(stage_dir):
                refuse_foreign(stage_dir, replaceable(self.registry[name], stage_dir), {})
            for up in self.registry[name].needs(self.job):
                if up not in planned and read_manifest(self.stage_dir(up)) is None:
                    raise ConfigError(
                        f"stage {name!r} reads the output of stage {up!r}, but "
                        f"{self.stage_dir(up)} has no completed {up!r} stage: run it first "
                        f"(add it to `stages`) or point {name} at existing inputs", "stages")

    # ------------------------------------------------------------------ running
    def check_resume(self, resume: Sequence[str], force: Sequence[str]) -> None:
        """``--resume-from-checkpoint`` names planned training stages that have checkpoints (checked before
        any work, like every config mistake)."""
        for name in resume:
            spec = self.registry.get(name)
            if spec is None or not spec.resumable:
                can = [n for n, s in self.registry.items() if s.resumable]
                raise ConfigError(f"--resume-from-checkpoint {name}: only training stages ({', '.join(can)}) have "
                                  "checkpoints to continue from")
            if name not in self.job.stages:
                raise ConfigError(f"--resume-from-checkpoint {name}: {name!r} is not in this job's stages")
            if name in force:
                raise ConfigError(f"--resume-from-checkpoint {name} and --force {name} contradict each other: "
                                  "--force starts the stage over")
            folders = [storage.join(self.stage_dir(name), f) for f in spec.resumable]
            if not any(storage.list_children(f) for f in folders):
                raise ConfigError(f"--resume-from-checkpoint {name}: no checkpoints under {', '.join(folders)}")

    def run(self, force: Sequence[str] = (), resume: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
        bad = [f for f in force if f not in self.registry]
        if bad:
            raise ConfigError(f"--force names unknown stage(s) {bad}; known: {list(self.registry)}")
        self.check_resume(resume, force)
        self.check_inputs()
        manifests: dict[str, dict[str, Any]] = {}
        tracker: PipelineRuns | None = None
        for name in self.ordered():
            spec = self.registry[name]
            needs = list(spec.needs(self.job))
            for up in needs:
                if up not in manifests:
                    m = read_manifest(self.stage_dir(up))
                    if m is None:
                        raise ConfigError(f"stage {name!r} needs stage {up!r} to be complete", "stages")
                    manifests[up] = m
            tokens = {up: manifests[up]["token"] for up in needs}
            key = self.key(name, tokens)
            existing = read_manifest(self.stage_dir(name))
            reason = run_reason(key, name in force, existing, read_record(self.stage_dir(name)),
                                self.section_hash(name), tokens)
            if reason is None:
                self.events.stage_skipped(name, existing)
                manifests[name] = existing
                continue
            failed = None if name in force else known_failure(self.stage_dir(name), key)
            if failed is not None:
                raise StageFailed(name, NonRetryableError(
                    f"{failed['error']} [this config already failed this way at {failed['at']}; it was not run "
                    f"again: change the config, or pass --force {name} to try once more]"))
            self.events.stage_started(name, reason)
            tracker = tracker or PipelineRuns(self.job)
            try:
                manifests[name] = self._run_stage(spec, key, {up: manifests[up]["outputs"] for up in needs},
                                                  tokens, tracker, forced=name in force, resume=name in resume)
            except BaseException:
                # best effort: an unreachable MLflow must not replace the stage's error with its own
                tracking.set_status_best_effort(tracker.uri, tracker.parent_id, "FAILED")
                raise
        if tracker is not None:
            tracker.finish()
        return manifests

    def _run_stage(self, spec: StageSpec, key: str, upstream: dict[str, dict[str, str]],
                   tokens: dict[str, str], tracker: "PipelineRuns", forced: bool = False,
                   resume: bool = False) -> dict[str, Any]:
        name = spec.name
        stage_dir = self.stage_dir(name)
        self._reset_if_changed(spec, key, stage_dir, forced, resume)
        storage.makedirs(stage_dir)
        run_id = tracker.stage_run(name, key, stage_dir)
        section = to_dict(getattr(self.job, name, None))
        storage.write_bytes(storage.join(stage_dir, "config.yaml"),
                            yaml.safe_dump({name: section, "seed": self.job.seed}, sort_keys=False).encode())
        ctx = StageContext(stage=name, job=self.job, stage_dir=stage_dir, upstream=upstream,
                           tracking_uri=tracker.uri, run_id=run_id, parent_run_id=tracker.parent_id,
                           ensure_ray=self._ensure_ray_tagged(tracker, run_id))
        log.info("stage %s: key %s -> %s", name, key, stage_dir)
        start = time.time()
        try:
            result = spec.load()(self.job, ctx)
        except BaseException as e:  # noqa: BLE001 - recorded, then re-raised
            tracking.set_status_best_effort(tracker.uri, run_id, "FAILED")  # never replaces e
            self.events.stage_failed(name, e, time.time() - start)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            if isinstance(e, (NonRetryableError, ConfigError)):
                storage.write_json(storage.join(stage_dir, FAILURE_RECORD), {
                    "key": key, "error": f"{type(e).__name__}: {e}", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            raise StageFailed(name, e) from e
        manifest = {
            "stage": name, "key": key, "token": uuid.uuid4().hex, "upstream_tokens": tokens,
            "inputs": upstream, "outputs": result.outputs, "summary": result.summary,
            "seconds": round(time.time() - start, 2), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mlflow_run_id": run_id, "config_hash": self.section_hash(name),
        }
        tracking.log_metrics(tracker.uri, run_id, {f"summary/{k}": v for k, v in flatten(result.summary).items()
                                                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
        tracking.log_text(tracker.uri, run_id, yaml.safe_dump(manifest, sort_keys=False), "manifest.yaml")
        storage.write_json(storage.join(stage_dir, MANIFEST), manifest)
        storage.delete(storage.join(stage_dir, FAILURE_RECORD))  # our own record of a failure that is now past
        tracking.set_status(tracker.uri, run_id, "FINISHED")
        self.events.stage_finished(name, manifest)
        return manifest

    def _reset_if_changed(self, spec: StageSpec, key: str, stage_dir: str, forced: bool = False,
                          resume: bool = False) -> None:
        """Same key: a retry, keep everything (checkpoints to resume). New key, or ``--force``: start clean
        (a forced training stage must not resume from the checkpoints of the run it is asked to redo).

        Nothing is deleted: the previous outputs move to ``<output_root>/.replaced/<stage>-<old key>-<time>``
        (and the log says where), except what the stage declares reusable across configs
        (``keep_on_change``, e.g. a feature cache), which stays, and, when ``resume`` is asked, the training
        checkpoints (``resumable``), which the new config continues from. A folder the pipeline did not
        write (no run record) is not touched at all: the stage refuses to start in it."""
        record = read_record(stage_dir)
        if record.get("key") == key and not forced:
            return
        children = replaceable(spec, stage_dir)
        if resume:
            children = [u for u in children if name_of(u) not in spec.resumable]
            log.warning("stage %s: config changed; continuing from the last checkpoint in %s "
                        "(--resume-from-checkpoint): the weights, optimizer state, EMA teacher, centering and step "
                        "count are kept; the schedule and every other setting come from the new config",
                        spec.name, ", ".join(storage.join(stage_dir, f) for f in spec.resumable))
        if not children:
            return
        refuse_foreign(stage_dir, children, record)
        base = storage.join(self.job.output_root, REPLACED,
                            f"{spec.name}-{record.get('key', 'unknown')}-{time.strftime('%Y%m%d-%H%M%S')}")
        aside, n = base, 1
        while storage.exists(aside):  # two replacements of the same key within a second
            n += 1
            aside = f"{base}-{n}"
        for uri in children:
            storage.move(uri, storage.join(aside, name_of(uri)))
        log.warning("stage %s: %s; its previous outputs were moved to %s (delete them when no longer needed)",
                    spec.name, "forced" if forced else "config changed", aside)

    def _ensure_ray_tagged(self, tracker: "PipelineRuns", run_id: str) -> Callable[[], None]:
        def ensure() -> None:
            self.ensure_ray()
            try:
                import ray

                if ray.is_initialized():
                    res = {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
                    tracking.set_tags(tracker.uri, run_id, {"ray.cluster_resources": res})
            except Exception:  # noqa: BLE001 - tagging must never fail a stage
                log.debug("could not tag ray resources", exc_info=True)
        return ensure
