"""Exported backbones as registered MLflow models, against a real MLflow server.

The model is loaded back in a fresh process that cannot import dino_ray, exactly as a user would
(``mlflow.pytorch.load_model("models:/NAME/VERSION")``), and must compute the features of ``backbone.pth``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import torch

from dino_ray import backbone_io, tracking
from dino_ray.config.schema import JobConfig
from dino_ray.models import DinoVisionTransformer, ViTConfig
from dino_ray.pipeline import StageContext
from dino_ray.stages.eval import Candidate, tag_registered_version
from dino_ray.stages.inference import BackboneRef
from dino_ray.stages.training import log_backbone

TINY = ViTConfig(embed_dim=48, depth=2, num_heads=3, patch_size=4, img_size=32, num_register_tokens=1)

LOAD = textwrap.dedent("""
    import sys
    sys.modules["dino_ray"] = None  # the registered model must not need our code
    import mlflow, numpy as np, torch
    uri, x_path, out_path = sys.argv[1:]
    x = np.load(x_path)
    model = mlflow.pytorch.load_model(uri)
    with torch.no_grad():
        tokens = model(torch.from_numpy(x)).numpy()
    served = mlflow.pyfunc.load_model(uri).predict(x)
    np.save(out_path, np.stack([tokens, served]))
""")


def stage_context(tmp_path, uri: str, stage: str) -> StageContext:
    """The context a pipeline stage gets, with a stage run tagged like the pipeline tags it."""
    job = JobConfig()
    job.tracking.experiment = f"registry-{uuid.uuid4().hex[:8]}"
    exp_id = tracking.experiment_id(uri, job.tracking.experiment)
    run_id = tracking.create_run(uri, exp_id, stage, tags={"dino_ray.stage": stage, "dino_ray.key": "key-1",
                                                            "git_commit": "c0ffee"})
    return StageContext(stage=stage, job=job, stage_dir=str(tmp_path), upstream={}, tracking_uri=uri,
                        run_id=run_id, parent_run_id=run_id, ensure_ray=lambda: None)


def load_in_fresh_process(tracking_uri: str, model_uri: str, x: np.ndarray, tmp_path) -> tuple[np.ndarray, ...]:
    """(mlflow.pytorch output, pyfunc output) of the registered model on ``x``, computed in a new interpreter."""
    np.save(tmp_path / "x.npy", x)
    subprocess.run([sys.executable, "-c", LOAD, model_uri, str(tmp_path / "x.npy"), str(tmp_path / "out.npy")],
                   check=True, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, timeout=300)
    tokens, served = np.load(tmp_path / "out.npy")
    return tokens, served


def test_exported_backbone_is_a_registered_model_with_the_same_features(mlflow_server, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(mlflow_server)
    ctx = stage_context(tmp_path, mlflow_server, "pretrain")
    out = str(tmp_path / "teacher")
    torch.manual_seed(0)
    backbone_io.save_backbone(DinoVisionTransformer(TINY), out)

    log_backbone(ctx, out)

    name = f"{ctx.job.tracking.experiment}-pretrain"
    [v1] = client.search_model_versions(f"name = '{name}'")
    assert v1.version == "1" and v1.run_id == ctx.run_id
    assert v1.tags["dino_ray.stage"] == "pretrain" and v1.tags["dino_ray.key"] == "key-1"
    assert v1.tags["git_commit"] == "c0ffee"
    assert v1.tags["dino_ray.weights_key"] == backbone_io.weights_key(out)
    exp = client.get_experiment_by_name(ctx.job.tracking.experiment)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND

    x = torch.randn(3, 3, TINY.img_size, TINY.img_size)
    with torch.no_grad():
        ref = backbone_io.load_backbone(out).eval().forward_features(x)
    expected = torch.cat([ref["x_norm_clstoken"][:, None], ref["x_norm_patchtokens"]], dim=1).numpy()
    tokens, served = load_in_fresh_process(mlflow_server, f"models:/{name}/1", x.numpy(), tmp_path)
    assert tokens.shape == (3, 1 + (TINY.img_size // TINY.patch_size) ** 2, TINY.embed_dim)
    np.testing.assert_allclose(tokens, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)

    # a re-run of the stage writes new weights: a second version; eval then tags only the version it judged
    torch.manual_seed(1)
    backbone_io.save_backbone(DinoVisionTransformer(TINY), out)
    log_backbone(ctx, out)
    versions = {v.version: v for v in client.search_model_versions(f"name = '{name}'")}
    assert sorted(versions) == ["1", "2"]
    cand = Candidate("pretrain", BackboneRef(uri=out), backbone_io.weights_key(out))
    tag_registered_version(cand, "digits", {"knn_k20_top1": 0.5}, "eval-run", ctx)
    assert client.get_model_version(name, "2").tags["eval.digits.knn_k20_top1"] == "0.5"
    assert client.get_model_version(name, "2").tags["eval.digits.run_id"] == "eval-run"
    assert "eval.digits.knn_k20_top1" not in client.get_model_version(name, "1").tags


def test_distilled_students_get_one_registered_model_each(mlflow_server, tmp_path):
    import mlflow

    ctx = stage_context(tmp_path, mlflow_server, "distill")
    out = str(tmp_path / "vit:mini")
    backbone_io.save_backbone(DinoVisionTransformer(TINY), out)
    log_backbone(ctx, out, "vit:mini")
    name = f"{ctx.job.tracking.experiment}-distill-vit-mini"  # ':' is not allowed in a registered name
    [version] = mlflow.MlflowClient(mlflow_server).search_model_versions(f"name = '{name}'")
    assert version.tags["dino_ray.student"] == "vit:mini"


def test_too_big_backbone_leaves_a_pointer_and_no_version(mlflow_server, tmp_path, monkeypatch):
    import mlflow

    ctx = stage_context(tmp_path, mlflow_server, "highres")
    ctx.job.tracking.max_model_gb = 1e-6  # ~1 KiB: the tiny ViT is "too big" for this job
    out = str(tmp_path / "teacher")
    backbone_io.save_backbone(DinoVisionTransformer(TINY), out)
    log_backbone(ctx, out)
    client = mlflow.MlflowClient(mlflow_server)
    name = f"{ctx.job.tracking.experiment}-highres"
    assert client.search_model_versions(f"name = '{name}'") == []
    pointer = client.download_artifacts(ctx.run_id, f"backbones/{name}/LOCATION.txt", str(tmp_path))
    assert open(pointer).read().strip() == out


def test_existing_experiment_is_tagged_as_model_training(mlflow_server):
    import mlflow

    client = mlflow.MlflowClient(mlflow_server)
    name = f"old-{uuid.uuid4().hex[:8]}"
    exp_id = client.create_experiment(name)
    assert tracking.experiment_id(mlflow_server, name) == exp_id
    assert client.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND
