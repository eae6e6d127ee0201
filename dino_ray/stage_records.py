"""The files the pipeline keeps in each stage folder, and what they say about whether a stage must run.

``_manifest.json`` is written last, so it means "complete"; ``_run.json`` records the key and MLflow run of
the latest attempt; ``_failed.json`` a non-retryable failure under a key. Outputs of a stage's earlier
configs are moved under ``<output_root>/.replaced/``, never deleted.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from dino_ray import storage
from dino_ray.config.typed import ConfigError
from dino_ray.stages.contract import StageSpec

log = logging.getLogger("dino_ray.pipeline")

MANIFEST = "_manifest.json"
RUN_RECORD = "_run.json"
FAILURE_RECORD = "_failed.json"  # a non-retryable failure of the stage under its key
PIPELINE_RECORD = "_pipeline.json"


def known_failure(stage_dir: str, key: str) -> dict[str, Any] | None:
    uri = storage.join(stage_dir, FAILURE_RECORD)
    if not storage.exists(uri):
        return None
    record = storage.read_json(uri)
    return record if record.get("key") == key else None


REPLACED = ".replaced"  # under output_root: outputs of earlier configs of a stage, moved aside, never deleted


def name_of(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def replaceable(spec: StageSpec, stage_dir: str) -> list[str]:
    """The stage folder's children that a new config of the stage replaces (all but ``keep_on_change``)."""
    return [u for u in storage.list_children(stage_dir) if name_of(u) not in spec.keep_on_change]


def refuse_foreign(stage_dir: str, children: list[str], record: Mapping[str, Any]) -> None:
    """A non-empty stage folder without our run record was not written by dino-ray: never touch it."""
    if children and not record:
        names = ", ".join(sorted(name_of(u) for u in children)[:5])
        raise ConfigError(f"{stage_dir} holds files dino-ray did not write ({names}); move them away or "
                          "choose another output_root: a stage only replaces its own outputs", "output_root")


def read_record(stage_dir: str) -> dict[str, Any]:
    """The stage's ``_run.json`` (key and MLflow run of its latest attempt), or ``{}``."""
    uri = storage.join(stage_dir, RUN_RECORD)
    return storage.read_json(uri) if storage.exists(uri) else {}


def run_reason(key: str, forced: bool, manifest: Mapping[str, Any] | None, record: Mapping[str, Any],
               section_hash: str, tokens: Mapping[str, str]) -> str | None:
    """Why a stage must run, in words for the console; ``None`` when its manifest is up to date.

    A manifest with the same key is up to date. Without a manifest, a run record with the same key is a
    failed (or killed) attempt that this run continues. A manifest with another key was written for
    another config of this stage, or from outputs of upstream stages that have re-run since.
    """
    if forced:
        return "forced (--force)"
    if manifest is not None and manifest.get("key") == key:
        return None
    if manifest is None:
        if record.get("key") == key:
            return "resumed from a failed run"
        return "config changed since a failed run" if record else "new"
    rerun = sorted(up for up, token in tokens.items() if manifest.get("upstream_tokens", {}).get(up) != token)
    if rerun and manifest.get("config_hash") == section_hash:
        return f"input changed ({', '.join(rerun)} re-ran)"
    return "config changed"


def read_manifest(stage_dir: str) -> dict[str, Any] | None:
    uri = storage.join(stage_dir, MANIFEST)
    if not storage.exists(uri):
        return None
    try:
        return storage.read_json(uri)
    except (ValueError, OSError):
        log.warning("ignoring unreadable manifest %s", uri)
        return None
