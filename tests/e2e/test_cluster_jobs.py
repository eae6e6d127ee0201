"""A real two-node Ray cluster on loopback (head + worker node), driven through its job server.

``ray job submit -- jobs/pretrain.yaml`` and ``dino-ray submit`` must both complete a tiny pretrain and
report the job's status as their exit code. The cluster is started with ``ray start`` in its own temp
dir and torn down by the PIDs that carry that dir, so the session's other Ray instance is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from testlib import REPO, free_port

pytestmark = pytest.mark.slow


def _cluster_pids(marker: str) -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info.get("cmdline") or [])):
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def _stop(markers: list[str]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in set(pid for m in markers for pid in _cluster_pids(m)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)


@pytest.fixture(scope="module")
def ray_cluster():
    temp = tempfile.mkdtemp(prefix="dray_")  # short: Ray's socket paths have a length limit
    # Ray >= 2.59 starts clusters with token auth; every node and client must send the token.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    markers = [temp, f"127.0.0.1:{gcs}"]
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    try:
        for cmd in ([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                     "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                     "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats",
                     # other Ray instances on this machine (the session's own) hold the default agent port
                     f"--dashboard-agent-listen-port={free_port()}"],
                    [ray_bin, "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1",
                     "--num-cpus=2", '--resources={"data_node": 1}', "--disable-usage-stats",
                     f"--dashboard-agent-listen-port={free_port()}"]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        address = f"http://127.0.0.1:{dash}"
        _wait_until_jobs_run(address)
        yield {"address": address, "env": env, "ray": ray_bin}
    finally:
        _stop(markers)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_until_jobs_run(address: str, timeout_s: float = 180) -> None:
    """The job server answers before its agent can start jobs: wait for a trivial job to succeed."""
    os.environ["RAY_AUTH_MODE"] = "token"  # this test process is a client of the token-auth cluster
    from ray.job_submission import JobStatus, JobSubmissionClient

    deadline = time.time() + timeout_s
    while True:
        try:
            client = JobSubmissionClient(address)
            sid = client.submit_job(entrypoint="echo ready")
            break
        except Exception:  # noqa: BLE001 - not ready yet
            if time.time() > deadline:
                raise
            time.sleep(2)
    while client.get_job_status(sid) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.time() > deadline:
            raise TimeoutError("the cluster's first job did not finish")
        time.sleep(1)


def tiny_pretrain(images: Path, out: Path) -> list[str]:
    return [f"output_root={out}", f"pretrain.data.source.uri={images}",
            f"tracking.tracking_uri=sqlite:///{out.parent}/mlflow.db", "pretrain.schedule.total_iters=3",
            "pretrain.schedule.warmup_iters=1", "pretrain.schedule.warmup_teacher_temp_iters=1",
            "pretrain.schedule.freeze_last_layer_iters=1", "pretrain.train.checkpoint_every=3",
            "pretrain.train.batch_size_per_worker=8", "pretrain.train.scaling.cpus_per_worker=1.0",
            # the demo preset's monitor reads outputs/demo-data; here it watches CIFAR-10 instead
            f"pretrain.monitor.train.uri={images}", "pretrain.monitor.train.max_images=100",
            f"pretrain.monitor.test.uri={images.parent / 'test'}", "pretrain.monitor.test.max_images=50",
            "pretrain.monitor.every=3"]


def test_ray_job_submit_runs_the_job_yaml(ray_cluster, cifar10_dir, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [ray_cluster["ray"], "job", "submit", "--address", ray_cluster["address"], "--working-dir", str(REPO),
         "--", "jobs/pretrain.yaml", *tiny_pretrain(cifar10_dir / "train", out)],
        cwd=REPO, env=ray_cluster["env"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout.lower()
    manifest = json.loads((out / "pretrain" / "_manifest.json").read_text())
    assert manifest["summary"]["steps"] == 3
    assert (out / "pretrain" / "teacher" / "backbone.pth").exists()


def test_dino_ray_submit_streams_and_returns_the_job_status(ray_cluster, cifar10_dir, tmp_path):
    out = tmp_path / "sdk"
    cmd = [sys.executable, "-m", "dino_ray.cli", "submit", "jobs/pretrain.yaml", "--address", ray_cluster["address"],
           *tiny_pretrain(cifar10_dir / "train", out)]
    env = dict(ray_cluster["env"])
    env.pop("RAY_AUTH_MODE", None)  # dino-ray submit must find the token itself
    ok = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "pretrain  running: new" in ok.stdout  # the job's console was streamed back
    assert "SUCCEEDED" in ok.stdout
    assert (out / "pretrain" / "_manifest.json").exists()

    bad = subprocess.run(cmd + ["--force", "no_such_stage"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-3000:]
    assert "FAILED" in bad.stdout
