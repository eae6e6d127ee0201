"""Credentials never reach MLflow params, resolved.yaml or the console; ordinary keys are not dropped."""

from __future__ import annotations

import pytest

from dino_ray.console import mlflow_hint
from dino_ray.pipeline_runs import redact as _redact
from dino_ray.tracking import is_secret, redact_url, safe_params


@pytest.mark.parametrize("key", ["aws_secret_access_key", "tracking.api_token", "db.password", "s3.accessKey",
                                 "storage.credentials", "AWS_SESSION_TOKEN", "x.key"])
def test_secret_keys(key):
    assert is_secret(key)


@pytest.mark.parametrize("key", ["pretrain.model.num_register_tokens", "pretrain.keep_on_change",
                                 "eval.sort_keys", "curate.tokenizer_free", "pretrain.loss.koleo_loss_weight"])
def test_ordinary_keys_are_kept(key):
    assert not is_secret(key)
    assert key in safe_params({key: 1})


@pytest.mark.parametrize("url, shown", [
    ("https://user:pa55@mlflow.example.com:5000/", "https://***@mlflow.example.com:5000/"),
    ("postgresql://u:p@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    ("s3://bucket/data", "s3://bucket/data"),
    ("http://host@x", "http://host@x"),  # a user without a password is not a secret
])
def test_urls_lose_their_credentials(url, shown):
    assert redact_url(url) == shown


def test_params_resolved_yaml_and_console_hide_url_credentials():
    uri = "https://alice:hunter2@mlflow.example.com"
    assert "hunter2" not in safe_params({"tracking.uri": uri})["tracking.uri"]
    tree = _redact({"tracking": {"uri": uri, "password": "x"}, "stages": ["pretrain"],
                    "pretrain": {"model": {"num_register_tokens": 4}}})
    assert tree["tracking"] == {"uri": "https://***@mlflow.example.com", "password": "***"}
    assert tree["pretrain"]["model"]["num_register_tokens"] == 4
    assert "hunter2" not in mlflow_hint(uri, "3")
