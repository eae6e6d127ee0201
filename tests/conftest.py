"""Shared fixtures: one Ray instance, one local S3 endpoint and the sample data, per test session.

Ray start-up costs seconds on two cores, so every test that needs Ray takes the session-scoped
``ray_session`` fixture instead of calling ``ray.init`` itself. Logical CPUs are oversubscribed on
purpose (they are scheduling tokens): Ray Data tasks and train workers share the cluster without
the small-cluster deadlocks described in ../shared/notes/ray-stack.md.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from testlib import SHARED_DATA, RestartableMlflowServer, free_port, require_path

# Set before anything imports ray / torch, so workers inherit them.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("OMP_NUM_THREADS", "2")

@pytest.fixture(scope="session")
def shared_data() -> Path:
    require_path(SHARED_DATA / "cifar10-jpg.tar.xz", "CIFAR-10 sample data")
    require_path(SHARED_DATA / "imagenette-224-subset.tar", "Imagenette sample data")
    return SHARED_DATA


def _extract(archive: Path, dest: Path, members_filter=None) -> Path:
    marker = dest / ".extracted"
    if marker.exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if members_filter is None or members_filter(m.name)]
        tf.extractall(dest, members=members, filter="data")
    marker.touch()
    return dest


CIFAR_TRAIN_PER_CLASS = 400
CIFAR_TEST_PER_CLASS = 100


def _cifar_subset(name: str) -> bool:
    parts = name.split("/")
    if len(parts) < 3:
        return True
    limit = CIFAR_TRAIN_PER_CLASS if parts[0] == "train" else CIFAR_TEST_PER_CLASS
    return int(os.path.splitext(parts[2])[0]) < limit


@pytest.fixture(scope="session")
def cifar10_dir(shared_data, tmp_path_factory) -> Path:
    """A CIFAR-10 subset as ``train/<class>/*.jpg`` (400 a class) and ``test/<class>/*.jpg`` (100 a class).

    Extracting all 60,000 files costs minutes on a loaded 2-core machine; tests need a few thousand."""
    cache = Path(os.environ.get("DINO_RAY_TEST_CACHE", tmp_path_factory.getbasetemp() / "cache"))
    return _extract(shared_data / "cifar10-jpg.tar.xz", cache / "cifar10-subset", _cifar_subset)


@pytest.fixture(scope="session")
def imagenette_dir(shared_data, tmp_path_factory) -> Path:
    """Imagenette 224 px JPEGs as ``train/<wnid>/*`` and ``val/<wnid>/*``."""
    cache = Path(os.environ.get("DINO_RAY_TEST_CACHE", tmp_path_factory.getbasetemp() / "cache"))
    return _extract(shared_data / "imagenette-224-subset.tar", cache / "imagenette")


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray cluster for the whole test session (4 logical CPUs on 2 cores, on purpose).

    It depends on ``s3_endpoint`` because workers only see AWS_* variables that exist before
    ``ray.init``."""
    import ray

    if not ray.is_initialized():
        keys = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "OMP_NUM_THREADS", "AWS_ENDPOINT_URL",
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")
        from dino_ray.ray_utils import DEFAULT_OMP_WAIT_POLICY

        env = {"OMP_WAIT_POLICY": DEFAULT_OMP_WAIT_POLICY, **{k: os.environ[k] for k in keys if k in os.environ}}
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server) on loopback; sets the AWS_* variables for the session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket for one test; yields ``s3://<name>``."""
    import uuid

    import boto3

    name = f"dino-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, served artifacts) on loopback."""
    server = RestartableMlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server.uri
    server.stop()