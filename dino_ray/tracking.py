"""MLflow conventions: where runs go, how they nest, what every run is tagged with.

One parent run per pipeline output root (re-running the same pipeline continues it), one nested
run per stage (a retried stage with the same config continues its run, so step counters never go
backwards), and one nested run per evaluated backbone inside the eval stage. Workers (rank 0 of a
train loop, Tune trials) write to a run by id through ``MlflowClient``.

**An unreachable server.** MLflow's HTTP client retries a failed request with exponential backoff for
minutes by default. That is right for the driver's own calls (a short server restart costs a pause),
wrong where a call sits in the training step path or in an error path: there it runs under
:func:`bounded_requests` (no retry, a short timeout), the train loop keeps its metrics until the server
answers again (``MetricBuffer`` in :mod:`dino_ray.train.metric_buffer`), and an error path records a
failure with :func:`set_status_best_effort`, which never replaces the error being handled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import threading
from importlib import metadata
from typing import Any, Iterator, Mapping

log = logging.getLogger("dino_ray.tracking")

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


# MLflow 3.x reads these per request (``mlflow.utils.rest_utils.http_request`` calls ``.get()`` on them
# each time); its defaults are 7 retries, backoff factor 2 and a 120 s timeout.
_HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
             "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_HTTP_REQUEST_TIMEOUT")
_http_env_lock = threading.RLock()
BOUNDED_TIMEOUT_S = 10


@contextlib.contextmanager
def bounded_requests(timeout_s: int = BOUNDED_TIMEOUT_S, max_retries: int = 0) -> Iterator[None]:
    """MLflow HTTP requests made inside the block give up after ``timeout_s`` (connect and read each),
    with ``max_retries`` retries and no backoff, instead of MLflow's default of minutes.

    For calls whose caller has its own way to try again (the train loop's metric buffer retries at its
    next flush) or must not wait (an error path). MLflow 3.x takes these bounds only from the
    ``MLFLOW_HTTP_REQUEST_*`` environment variables, read at every request, and ``MlflowClient`` has no
    per-client or per-call setting; so they are set for the duration of the block and restored after it.
    Another thread calling MLflow during the block gets the same bounds (a lock serialises the blocks
    themselves); in a Ray Train worker the train loop is the only caller. Non-HTTP stores (sqlite, file)
    ignore them.
    """
    values = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
              "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s))}
    with _http_env_lock:
        old = {k: os.environ.get(k) for k in _HTTP_ENV}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def set_status_best_effort(tracking_uri: str, run_id: str, status: str) -> bool:
    """:func:`set_status` for an error path: bounded (:func:`bounded_requests`), and a failure is logged,
    not raised, so the exception being handled stays the one the caller sees; an unreachable MLflow must
    not turn a stage's own error into an MLflow traceback, nor hold it back for minutes of retries."""
    try:
        with bounded_requests():
            set_status(tracking_uri, run_id, status)
        return True
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.warning("could not mark MLflow run %s as %s at %s (%s: %s)", run_id, status, redact_url(tracking_uri),
                    type(e).__name__, e)
        return False


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


GIT_COMMIT_ENV = "DINO_RAY_GIT_COMMIT"


def git_commit(cwd: str | None = None) -> str | None:
    """``HEAD`` of the git checkout at ``cwd`` (default: the working directory), or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=cwd or os.getcwd())
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def environment_tags() -> dict[str, str]:
    """Git commit and package versions, so a run says exactly what produced it.

    The commit comes from ``DINO_RAY_GIT_COMMIT`` when set (the image bakes it in at build time, and
    ``dino-ray submit`` passes the submitter's, since neither an image nor an uploaded working dir has
    ``.git``), else from ``git rev-parse HEAD`` in the working directory."""
    tags: dict[str, str] = {}
    commit = os.environ.get(GIT_COMMIT_ENV) or git_commit()
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    for pkg in ("dino-ray", "torch", "ray", "deepspeed", "mlflow", "faiss-cpu", "pyarrow"):
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return tags
