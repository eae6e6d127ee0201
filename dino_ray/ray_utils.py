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
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
)
# OpenMP threads that finish a parallel region spin for a while before sleeping (the ACTIVE default).
# A trainer's torch threads share their cores with Ray Data's crop and decode actors, which then wait
# for the spinning threads: on 2 cores, PASSIVE measured +18 % training images/s (40.3 -> 47.8 on the
# CPU preset) and 6 s less start-up. A value set by the user wins.
DEFAULT_OMP_WAIT_POLICY = "PASSIVE"


# What keeps a worker's log (in Ray's session folder) readable: no progress bars redrawn into it, no
# deprecation warnings of the stack repeated by every process. ``--verbose`` leaves workers as they are.
QUIET_WORKER_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore",
                    "MLFLOW_LOGGING_LEVEL": "WARNING"}


def worker_env(verbose: bool = True) -> dict[str, str]:
    env = {k: os.environ[k] for k in PROPAGATED_ENV if k in os.environ}
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("OMP_WAIT_POLICY", DEFAULT_OMP_WAIT_POLICY)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not verbose:
        env.update({k: v for k, v in QUIET_WORKER_ENV.items() if k not in env})
    return env


def init_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = True) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``, as set inside a Ray job); else start a local Ray.

    The local instance advertises ``num_cpus`` logical CPUs (default: the machine's cores). Logical CPUs
    are scheduling tokens, so a small machine may advertise more than it has so that data
    preprocessing and training workers can be scheduled side by side.

    ``verbose=False`` keeps workers' output and Ray's progress bars off the driver's console: they
    stay in Ray's session folder (:func:`logs_dir`).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    output = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, **output)
    else:
        cpus = num_cpus or os.cpu_count() or 1
        log.info("starting a local Ray instance with %d logical CPUs", cpus)
        ray.init(num_cpus=cpus, include_dashboard=False, runtime_env={"env_vars": worker_env(verbose)}, **output)
    if not verbose:
        quiet_ray_libraries()


def quiet_ray_libraries() -> None:
    """Keep Ray Data and Tune, as used from the driver, off the console.

    Ray Data: no progress bars and no per-dataset "execution started / finished" lines (nor the notice
    that progress bars are off); errors still show, and it writes everything to ``ray-data.log`` in the
    session folder. Tune: its new output engine prints an experiment box and result paths even at
    ``verbose=0``; the classic one is silent at 0 (results stay in the stage's ``tune`` folder).
    """
    import ray.data

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":  # the handler Ray Data's logging config names so
            handler.setLevel(logging.ERROR)


def logs_dir() -> str | None:
    """Ray's log folder of this session (``/tmp/ray/session_*/logs`` by default), if Ray runs here."""
    try:
        from ray._private.worker import _global_node  # no public API gives the session folder

        return os.path.join(_global_node.get_session_dir_path(), "logs")
    except Exception:  # noqa: BLE001 - a connected client may have no local node
        return None
