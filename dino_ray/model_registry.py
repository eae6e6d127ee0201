"""Exported backbones as MLflow Models, one registered model per stage or student.

A backbone is logged with the ``mlflow.pytorch`` flavour in MLflow 3's default ``pt2`` format: a
``torch.export`` graph of :class:`TokenFeatures`, which loads with plain torch (no dino_ray, no
unpickling of Python code) and is also served by the pyfunc flavour. Each logging registers a new
version, tagged with what produced it (stage, stage key, git commit, weights fingerprint), so the eval
stage can find the version of the weights it judged and tag it with the results.
``backbone.pth`` stays the tool-independent export; the MLflow model is the same weights, ready to call.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any, Mapping

import torch

from dino_ray import backbone_io, tracking

log = logging.getLogger("dino_ray.model_registry")

MAX_MODEL_BYTES = 8 * 2**30  # default of tracking.max_model_gb: bigger weights get a pointer file instead
WEIGHTS_KEY_TAG = "dino_ray.weights_key"  # backbone_io.weights_key of the exported weights
RUN_TAGS = ("dino_ray.key", "git_commit")  # copied from the producing run onto the version
EXAMPLE_BATCH = 2  # torch.export turns a batch of 1 into a fixed size; 2 keeps the batch dimension free


class TokenFeatures(torch.nn.Module):
    """What a registered backbone computes: images [B, C, S, S] at the backbone's ``img_size`` ->
    [B, 1 + N, D], the normalised CLS token then the N patch tokens (registers left out), i.e.
    ``forward_features``' ``x_norm_clstoken`` and ``x_norm_patchtokens`` in one tensor, which is what
    the pyfunc flavour can serve."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.backbone.forward_features(images)
        return torch.cat([out["x_norm_clstoken"].unsqueeze(1), out["x_norm_patchtokens"]], dim=1)


def registered_name(experiment: str, stage: str, student: str | None = None) -> str:
    """``<experiment>-<stage>`` (``<experiment>-distill-<student>`` for a student), with characters that
    registry names or ``models:/`` URIs cannot hold replaced by '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(p for p in (experiment, stage, student) if p))


def _example_and_signature(model: TokenFeatures) -> tuple[Any, Any]:
    """A zero image batch at the backbone's size (torch.export traces the graph on it) and the tensor
    signature: any batch size, fixed channels and side."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    cfg = model.backbone.config
    image = (cfg.in_chans, cfg.img_size, cfg.img_size)
    f32 = np.dtype(np.float32)
    signature = ModelSignature(inputs=Schema([TensorSpec(f32, (-1, *image))]),
                               outputs=Schema([TensorSpec(f32, (-1, 1 + cfg.grid_size ** 2, cfg.embed_dim))]))
    return np.zeros((EXAMPLE_BATCH, *image), dtype=np.float32), signature


def _torch_requirement() -> str:
    """The one package a ``pt2`` graph needs, pinned without a local label (``+cpu``, ``+cu124``) so pip
    can install it anywhere; given explicitly, MLflow neither guesses requirements in a subprocess nor
    warns about the label."""
    return f"torch=={torch.__version__.split('+')[0]}"


def _ensure_cwd() -> None:
    """``torch.export`` (through its ``torch._dynamo`` config) reads ``os.getcwd()`` on import. A driver
    started by ``ray job submit -- jobs/x.yaml`` can find its working directory (the job's unpacked
    working_dir package) already removed by the time a stage exports, which would fail the stage after
    training succeeded. Every path the pipeline uses is absolute (resolved when the job file is loaded),
    so moving to the temp dir changes nothing else."""
    try:
        os.getcwd()
    except FileNotFoundError:
        log.warning("the working directory no longer exists; exporting from %s", tempfile.gettempdir())
        os.chdir(tempfile.gettempdir())


def log_and_register(tracking_uri: str, run_id: str, backbone_dir: str, name: str,
                     tags: Mapping[str, str], max_bytes: int | None = None) -> Any:
    """Log the backbone exported under ``backbone_dir`` as an MLflow model of run ``run_id`` and register
    it as a new version of ``name``. Returns the ``ModelVersion``, or None when the weights are too big
    to copy into MLflow (the run then gets ``backbones/<name>/LOCATION.txt`` pointing at them)."""
    info = backbone_io.weights_info(backbone_dir)
    if info is not None and info.size > (MAX_MODEL_BYTES if max_bytes is None else max_bytes):
        log.warning("%s: %.1f GiB of weights, not copied into MLflow nor registered as %s", backbone_dir,
                    info.size / 2**30, name)
        tracking.log_text(tracking_uri, run_id, f"{backbone_dir}\n", f"backbones/{name}/LOCATION.txt")
        return None
    mlflow = tracking.fluent(tracking_uri)
    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    all_tags = {**{k: run.data.tags[k] for k in RUN_TAGS if k in run.data.tags}, **tags,
                WEIGHTS_KEY_TAG: backbone_io.weights_key(backbone_dir), "dino_ray.backbone_uri": backbone_dir,
                "dino_ray.vit": backbone_io.describe(backbone_dir)}
    _ensure_cwd()
    model = TokenFeatures(backbone_io.load_backbone(backbone_dir)).eval()
    example, signature = _example_and_signature(model)
    # The LoggedModel is created explicitly so that it lands in the run's experiment: log_model alone
    # would pick the process's active (or default) experiment when no run is active.
    logged = mlflow.initialize_logged_model(name=name, source_run_id=run_id, experiment_id=run.info.experiment_id,
                                            tags=all_tags)
    model_info = mlflow.pytorch.log_model(model, name=name, model_id=logged.model_id, run_id=run_id,
                                          input_example=example, signature=signature, serialization_format="pt2",
                                          pip_requirements=[_torch_requirement()])
    # register_model prints "Registered model ... already exists" / "Created version ..." to stderr; keep
    # them out of the console (it says what each stage did) and in the log (--verbose shows them).
    import contextlib
    import io

    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        version = mlflow.register_model(model_info.model_uri, name, tags=all_tags)
    for line in said.getvalue().splitlines():
        log.info("%s", line)
    return version


def tag_versions(tracking_uri: str, weights_key: str, tags: Mapping[str, Any]) -> list[Any]:
    """Tag every registered version of the weights with fingerprint ``weights_key`` (normally one; none
    for a backbone that was not registered, e.g. a path given to eval) and return them."""
    client = tracking.fluent(tracking_uri).MlflowClient(tracking_uri)
    versions = list(client.search_model_versions(f"tags.`{WEIGHTS_KEY_TAG}` = '{weights_key}'"))
    for v in versions:
        for key, value in tags.items():
            client.set_model_version_tag(v.name, v.version, key, str(value))
    return versions
