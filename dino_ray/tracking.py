"""MLflow conventions: where runs go, how they nest, what every run is tagged with.

One parent run per pipeline output root (re-running the same pipeline continues it), one nested
run per stage (a retried stage with the same config continues its run, so step counters never go
backwards), and one nested run per evaluated backbone inside the eval stage. Workers (rank 0 of a
train loop, Tune trials) reattach to a run by id with :func:`attach`.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from importlib import metadata
from typing import Any, Iterator, Mapping

SECRET_MARKERS = ("key", "secret", "token", "password", "credential", "credentials", "passwd")
# user:password@ inside a URL (https://u:p@host, postgresql://u:p@host/db, s3://KEY:SECRET@bucket).
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s:]*:[^/@\s]*@")
LOCAL_DB = "mlflow.db"
LOCAL_ARTIFACTS = "mlruns"
# The experiment kind MLflow 3's UI writes when it creates an experiment ("Machine learning", not
# "GenAI apps & agents"). The 3.17 UI picks its view from the GenAI / Model training toggle instead
# (default GenAI, remembered per browser; `?workflowType=machine_learning` in the URL selects training).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config value, else ``MLFLOW_TRACKING_URI``, else a sqlite store in the working directory."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{os.path.abspath(LOCAL_DB)}"


def _client_env() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")


def fluent(tracking_uri: str) -> Any:
    """``mlflow`` pointed at ``tracking_uri``: the fluent APIs (runs, ``log_model``, ``register_model``)
    read the tracking and registry URI from the process, not from a client."""
    import mlflow

    _client_env()
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow


def is_secret(key: str) -> bool:
    """A config key whose value is a secret: a marker as a word of its last part (``aws_secret_access_key``,
    ``api_token``) or its ending (``accessKey``); ``num_register_tokens`` or ``keep_on_change`` are not."""
    last = key.rsplit(".", 1)[-1]
    words = re.split(r"[_\-]", last.lower())
    return any(m in words or last.lower().endswith(m) for m in SECRET_MARKERS)


def redact_url(value: str) -> str:
    """The string with any ``user:password@`` of a URL in it replaced by ``***@``."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", value)


def safe_params(flat: Mapping[str, Any]) -> dict[str, str]:
    """MLflow params from a flattened config: secrets dropped, values stringified and truncated."""
    out = {}
    for k, v in flat.items():
        if is_secret(k):
            continue
        s = redact_url(str(v))
        out[k] = s if len(s) <= 6000 else s[:5997] + "..."
    return out


def find_experiment_id(tracking_uri: str, name: str) -> str | None:
    """The id of the experiment called ``name``, or None (never creates one; for links after a run)."""
    try:
        exp = fluent(tracking_uri).MlflowClient(tracking_uri).get_experiment_by_name(name)
    except Exception:  # noqa: BLE001 - a link is a courtesy; an unreachable server already failed the run
        return None
    return exp.experiment_id if exp is not None else None


def experiment_id(tracking_uri: str, name: str) -> str:
    """The experiment called ``name``, created if needed; either way tagged as a model-training one."""
    client = fluent(tracking_uri).MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made before we tagged, or by hand: an explicit kind stays
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_ARTIFACT_ROOT"):
        db = tracking_uri[len("sqlite:///"):]
        location = "file://" + os.path.join(os.path.dirname(os.path.abspath(db)), LOCAL_ARTIFACTS)
    return client.create_experiment(name, artifact_location=location or os.environ.get("MLFLOW_ARTIFACT_ROOT"),
                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def run_exists(tracking_uri: str, run_id: str | None) -> bool:
    if not run_id:
        return False
    import mlflow

    try:
        mlflow.MlflowClient(tracking_uri).get_run(run_id)
        return True
    except Exception:  # noqa: BLE001 - any lookup failure means "start a new run"
        return False


def create_run(tracking_uri: str, exp_id: str, name: str, parent_run_id: str | None = None,
               tags: Mapping[str, str] | None = None) -> str:
    import mlflow

    all_tags = dict(tags or {})
    all_tags["mlflow.runName"] = name
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.MlflowClient(tracking_uri).create_run(exp_id, tags=all_tags, run_name=name)
    return run.info.run_id


def set_status(tracking_uri: str, run_id: str, status: str) -> None:
    """``RUNNING``, ``FINISHED`` or ``FAILED``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=status)


@contextlib.contextmanager
def attach(tracking_uri: str, run_id: str) -> Iterator[Any]:
    """Make ``run_id`` the active run in this process (a worker, a trial) and yield ``mlflow``."""
    mlflow = fluent(tracking_uri)
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield mlflow
        return
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        yield mlflow


def log_params(tracking_uri: str, run_id: str, flat: Mapping[str, Any]) -> None:
    """Log params in batches; values that already exist with the same value are fine on a retry."""
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient(tracking_uri)
    existing = client.get_run(run_id).data.params
    items = [Param(k, v) for k, v in safe_params(flat).items() if k not in existing]
    for i in range(0, len(items), 90):
        client.log_batch(run_id, params=items[i:i + 90])


def log_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    import time

    import mlflow
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if _is_number(v)]
    for i in range(0, len(items), 500):
        mlflow.MlflowClient(tracking_uri).log_batch(run_id, metrics=items[i:i + 500])


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v)[:5000])


def log_artifact_file(tracking_uri: str, run_id: str, path: str, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.MlflowClient(tracking_uri).log_artifact(run_id, path, artifact_path)


def log_bytes(tracking_uri: str, run_id: str, data: bytes, name: str, artifact_path: str | None = None) -> None:
    """Log in-memory bytes (a picture, a file read from S3) as the artifact ``artifact_path/name``."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name)
        with open(path, "wb") as f:
            f.write(data)
        log_artifact_file(tracking_uri, run_id, path, artifact_path)


def log_image_step(tracking_uri: str, run_id: str, png: bytes, key: str, step: int) -> None:
    """Log a PNG as step ``step`` of the image series ``key`` (the run page shows it with a step slider)."""
    import io

    import mlflow
    from PIL import Image

    mlflow.MlflowClient(tracking_uri).log_image(run_id, Image.open(io.BytesIO(png)), key=key, step=step)


def log_text(tracking_uri: str, run_id: str, text: str, artifact_file: str) -> None:
    import mlflow

    mlflow.MlflowClient(tracking_uri).log_text(run_id, text, artifact_file)


def environment_tags() -> dict[str, str]:
    """Git commit and package versions, so a run says exactly what produced it."""
    tags: dict[str, str] = {}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.getcwd())
        if commit.returncode == 0:
            tags["git_commit"] = commit.stdout.strip()
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    for pkg in ("dino-ray", "torch", "ray", "deepspeed", "mlflow", "faiss-cpu", "pyarrow"):
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return tags
