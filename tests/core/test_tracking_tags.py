"""Every MLflow run records the code that produced it, also where no .git exists (an image, a Ray job's
uploaded working dir): the commit then travels in ``DINO_RAY_GIT_COMMIT``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dino_ray import tracking

REPO = Path(__file__).resolve().parents[2]


def test_the_commit_comes_from_the_environment_first(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not a checkout
    monkeypatch.setenv(tracking.GIT_COMMIT_ENV, "0123abcd")
    tags = tracking.environment_tags()
    assert tags["git_commit"] == tags["mlflow.source.git.commit"] == "0123abcd"
    monkeypatch.delenv(tracking.GIT_COMMIT_ENV)
    assert "git_commit" not in tracking.environment_tags()


def test_in_a_checkout_the_commit_is_head(monkeypatch):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("an exported tree without .git: no HEAD to compare with")
    monkeypatch.delenv(tracking.GIT_COMMIT_ENV, raising=False)
    monkeypatch.chdir(REPO)
    assert tracking.environment_tags()["git_commit"] == head.stdout.strip()
    assert tracking.git_commit(str(REPO)) == head.stdout.strip()
