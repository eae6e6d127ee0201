"""The MLflow runs of a pipeline: one parent run per output root, one nested run per stage key.

A re-run of the same output root reopens its parent run (its id is kept in the root's pipeline record) and
a stage whose key did not change reopens its own run, so a resumed stage keeps logging where it stopped.
Secrets in the config (passwords, tokens, credentials in URLs) never reach MLflow: ``redact``.
"""

from __future__ import annotations

from typing import Any

import yaml

from dino_ray import storage, tracking
from dino_ray.config.typed import flatten, to_dict
from dino_ray.stage_records import PIPELINE_RECORD, RUN_RECORD, read_record


class PipelineRuns:
    """Parent run of an output root, and the nested run of each stage."""

    def __init__(self, job: Any):
        self.job = job
        self.uri = tracking.resolve_tracking_uri(job.tracking.tracking_uri)
        self.exp_id = tracking.experiment_id(self.uri, job.tracking.experiment)
        record_uri = storage.join(job.output_root, PIPELINE_RECORD)
        record = storage.read_json(record_uri) if storage.exists(record_uri) else {}
        parent = record.get("parent_run_id")
        if record.get("tracking_uri") != self.uri or not tracking.run_exists(self.uri, parent):
            parent = tracking.create_run(self.uri, self.exp_id, job.tracking.run_name or job.name,
                                         tags={**tracking.environment_tags(), "dino_ray.output_root": job.output_root})
            storage.write_json(record_uri, {"parent_run_id": parent, "tracking_uri": self.uri,
                                            "experiment_id": self.exp_id})
        else:
            tracking.set_status(self.uri, parent, "RUNNING")
        self.parent_id = parent
        resolved = to_dict(job)
        tracking.log_params(self.uri, parent, {k: v for k, v in flatten(resolved).items()
                                               if k.split(".")[0] not in job.stage_names()})
        tracking.log_text(self.uri, parent, yaml.safe_dump(redact(resolved), sort_keys=False),
                          "config/resolved.yaml")

    def stage_run(self, name: str, key: str, stage_dir: str) -> str:
        record = read_record(stage_dir)
        run_id = record.get("run_id")
        if record.get("key") == key and record.get("tracking_uri") == self.uri and tracking.run_exists(self.uri, run_id):
            tracking.set_status(self.uri, run_id, "RUNNING")
            return run_id
        run_id = tracking.create_run(self.uri, self.exp_id, name, parent_run_id=self.parent_id,
                                     tags={**tracking.environment_tags(), "dino_ray.stage": name,
                                           "dino_ray.key": key})
        section = to_dict(getattr(self.job, name, None))
        tracking.log_params(self.uri, run_id, flatten({name: section, "seed": self.job.seed}))
        tracking.log_text(self.uri, run_id, yaml.safe_dump(redact({name: section}), sort_keys=False),
                          "config/stage.yaml")
        storage.write_json(storage.join(stage_dir, RUN_RECORD),
                           {"key": key, "run_id": run_id, "tracking_uri": self.uri})
        return run_id

    def finish(self) -> None:
        tracking.set_status(self.uri, self.parent_id, "FINISHED")


def redact(tree: Any) -> Any:
    """The config tree with secret values and URL credentials masked, as logged to MLflow."""
    if isinstance(tree, dict):
        return {k: ("***" if tracking.is_secret(str(k)) else redact(v)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    return tracking.redact_url(tree) if isinstance(tree, str) else tree
