"""Connecting to Ray: an embedded local instance by default, an existing cluster when one is named."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("dino_ray")

# Variables the driver passes on to every Ray worker: S3 endpoint/credentials and the MLflow server.
# They must reach workers through the runtime env: variables set after ray.init do not.
PROPAGATED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "OMP_NUM_THREADS", "DINO_RAY_TEST_FAULT",
)


def worker_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in PROPAGATED_ENV if k in os.environ}
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``, as set inside a Ray job); else start a local Ray.

    The local instance advertises ``num_cpus`` logical CPUs (default: the machine's cores). Logical CPUs
    are scheduling tokens, so a small machine may advertise more than it has so that data
    preprocessing and training workers can be scheduled side by side.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    cpus = num_cpus or os.cpu_count() or 1
    log.info("starting a local Ray instance with %d logical CPUs", cpus)
    ray.init(num_cpus=cpus, include_dashboard=False, runtime_env={"env_vars": worker_env()})
