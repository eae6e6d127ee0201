"""The live monitor: how good a training model's features are, measured on a small labeled set
every N steps while the run trains.

What one monitor point costs is one forward pass of the backbone over the monitor images (a few
thousand small images, no gradients) and two probes on the resulting CLS features:

- weighted kNN (the eval stage's protocol, :func:`dino_ray.evals.knn.knn_classify`);
- a closed-form linear probe: ridge regression onto one-hot labels, one linear solve instead of an SGD
  sweep. It ranks representations like the full probe does at a tiny fraction of the cost; the eval
  stage still runs the real linear-probe grid at the end.

Raw pixels get the same two probes once, as the reference line a useful backbone must rise above.

Under ZeRO-3 the teacher's parameters are partitioned, so every rank must take part in each forward:
:func:`sharded_features` gives each rank an equal share of the images (the same number of forward
calls everywhere) and all-gathers the features. A patch-PCA picture of a few fixed images shows how
the features sharpen over the run. Pure torch/numpy: the train loop decides when and what to log.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from typing import Any, Callable, Sequence

import numpy as np
import torch

log = logging.getLogger("dino_ray.monitor")


@dataclasses.dataclass
class MonitorData:
    """Decoded, normalised monitor images (float32 [N, 3, S, S]) and labels, plus raw-pixel features."""

    train_x: torch.Tensor
    train_y: np.ndarray
    test_x: torch.Tensor
    test_y: np.ndarray
    train_pixels: np.ndarray
    test_pixels: np.ndarray
    skipped: int  # images that did not decode (counted, never fatal)

    @property
    def pca_x(self) -> torch.Tensor:
        return self.test_x


def load_split(source: Any, image_size: int, pixel_size: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray, int]:
    """(views, labels, raw-pixel features, skipped) of a labeled source (a folder per class)."""
    from PIL import Image

    from dino_ray.data.decode import decode_image
    from dino_ray.data.eval_transform import eval_view
    from dino_ray.data.sources import list_images, read_image_bytes
    from dino_ray.evals.baselines import raw_pixel_features

    views, labels, pil, skipped = [], [], [], 0
    for ref in list_images(source):
        try:
            image = decode_image(read_image_bytes(ref.uri))
        except Exception as e:  # noqa: BLE001 - a bad monitor image is a counted skip
            log.warning("monitor: skipping %s (%s)", ref.uri, e)
            skipped += 1
            continue
        if ref.label is None or int(ref.label) < 0:
            raise ValueError(f"monitor image {ref.uri} has no label: a monitor set needs one sub-folder per class "
                             f"(labels_from_folders: true) or a label column")
        views.append(eval_view(image, image_size))
        labels.append(int(ref.label))
        pil.append(Image.fromarray(image))
    if not views:
        raise ValueError(f"monitor set {source.uri} has no decodable images")
    return (torch.from_numpy(np.stack(views)), np.asarray(labels, dtype=np.int64),
            raw_pixel_features(pil, pixel_size), skipped)


def load_monitor_data(train: Any, test: Any, image_size: int, pixel_size: int = 32) -> MonitorData:
    tx, ty, tp, s1 = load_split(train, image_size, pixel_size)
    vx, vy, vp, s2 = load_split(test, image_size, pixel_size)
    return MonitorData(tx, ty, vx, vy, tp, vp, s1 + s2)


def ridge_probe_top1(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, test_y: np.ndarray,
                     ridge: float = 1e-2) -> float:
    """Top-1 of a least-squares linear classifier on L2-normalised features (with bias).

    The penalty is ``ridge`` times the mean eigenvalue of the Gram matrix, so it means the same for
    features of any width or scale."""
    def prep(f: np.ndarray) -> torch.Tensor:
        x = torch.nn.functional.normalize(torch.as_tensor(f, dtype=torch.float64), dim=-1)
        return torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)

    x, z = prep(train_f), prep(test_f)
    classes = np.unique(train_y)
    y = torch.as_tensor(train_y[:, None] == classes[None, :], dtype=torch.float64)
    pred = classes[(z @ ridge_weights(x, y, ridge)).argmax(1).numpy()]
    return float((pred == test_y).mean())


def ridge_weights(x: torch.Tensor, y: torch.Tensor, ridge: float, dual: bool | None = None) -> torch.Tensor:
    """``(X^T X + lam I)^-1 X^T Y`` with ``lam = ridge * trace(X^T X) / dim``.

    With fewer rows than columns (raw pixels: 3,073 columns, a monitor set of ~1,400 images) the same
    weights come from the n x n system, ``X^T (X X^T + lam I)^-1 Y``, several times cheaper to form and
    solve. ``dual`` forces a form (tests)."""
    n, d = x.shape
    lam = ridge * float((x * x).sum()) / d
    if dual is None:
        dual = n < d
    if dual:
        k = x @ x.T
        return x.T @ torch.linalg.solve(k + lam * torch.eye(n, dtype=x.dtype), y)
    gram = x.T @ x
    return torch.linalg.solve(gram + lam * torch.eye(d, dtype=x.dtype), x.T @ y)


def knn_top1(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, test_y: np.ndarray, k: int) -> float:
    from dino_ray.evals.knn import knn_classify

    k = min(k, len(train_y))
    return float(knn_classify(train_f, train_y, test_f, test_y, ks=(k,))["metrics"][f"k{k}_top1"])


def _shard(n: int, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s indices r, r+world, ...; padded with its last index so every rank has
    ceil(n / world) rows (equal forward calls on every rank)."""
    per = -(-n // world)
    idx = np.arange(rank, n, world)
    if idx.size == 0:
        idx = np.array([n - 1])
    return np.concatenate([idx, np.full(per - idx.size, idx[-1])])


@torch.no_grad()
def sharded_features(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int,
                     rank: int = 0, world: int = 1) -> np.ndarray:
    """CLS features [N, D] of ``x``, the work split over ranks and all-gathered (see module doc)."""
    idx = _shard(x.shape[0], rank, world)
    parts = [forward(x[idx[i:i + batch_size]]).float().cpu() for i in range(0, idx.size, batch_size)]
    mine = torch.cat(parts)
    if world == 1:
        return mine.numpy()
    import torch.distributed as dist

    device = _comm_device()  # NCCL gathers CUDA tensors only: inputs and outputs both on it
    gathered = [torch.empty_like(mine, device=device) for _ in range(world)]
    dist.all_gather(gathered, mine.to(device))
    out = torch.empty((x.shape[0], mine.shape[1]), dtype=mine.dtype)
    for r, feats in enumerate(gathered):
        ridx = _shard(x.shape[0], r, world)
        out[ridx] = feats.cpu()  # padded rows write the same row twice
    return out.numpy()


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pca_picture_png(images: torch.Tensor, patch_tokens: torch.Tensor, scale: int) -> bytes:
    """PNG bytes: each image beside its patch-PCA picture (the eval stage's drawing)."""
    from dino_ray.evals.pca import patch_pca_rgb, side_by_side, to_uint8_images

    picture = side_by_side(to_uint8_images(images), patch_pca_rgb(patch_tokens.float().cpu()), scale=scale)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


@dataclasses.dataclass
class MonitorPoint:
    metrics: dict[str, float]
    picture: bytes | None


class Monitor:
    """Measures a backbone on the monitor set; one instance per training run (on every rank)."""

    def __init__(self, data: MonitorData, *, k: int = 20, ridge: float = 1e-2, batch_size: int = 256,
                 pca_images: int = 4):
        self.data, self.k, self.ridge, self.batch_size = data, k, ridge, batch_size
        self.pca_images = min(pca_images, data.test_x.shape[0])

    def reference(self) -> dict[str, float]:
        """Raw pixels through the same probes: the line a useful backbone must rise above."""
        d = self.data
        return {"monitor/pixels_knn_top1": knn_top1(d.train_pixels, d.train_y, d.test_pixels, d.test_y, self.k),
                "monitor/pixels_linear_top1": ridge_probe_top1(d.train_pixels, d.train_y, d.test_pixels, d.test_y,
                                                               self.ridge)}

    def measure(self, backbone: torch.nn.Module, *, rank: int = 0, world: int = 1,
                autocast: Any = None, with_picture: bool = True) -> MonitorPoint:
        """kNN and closed-form probe top-1 of ``backbone``'s CLS features (a collective under ZeRO-3:
        call on every rank). Metrics and the picture are complete on rank 0 (others get them too)."""
        import contextlib

        device = next(backbone.parameters()).device
        ctx = autocast if autocast is not None else contextlib.nullcontext()

        def cls(x: torch.Tensor) -> torch.Tensor:
            with ctx:  # a module call, so ZeRO-3 gathers the backbone's own parameters
                return backbone(x.to(device), None, is_training=True)["x_norm_clstoken"]

        was_training = backbone.training
        backbone.eval()
        try:
            d = self.data
            train_f = sharded_features(cls, d.train_x, self.batch_size, rank, world)
            test_f = sharded_features(cls, d.test_x, self.batch_size, rank, world)
            picture = None
            if with_picture and self.pca_images:
                x = d.pca_x[: self.pca_images]
                with torch.no_grad(), ctx:
                    tokens = backbone(x.to(device), None, is_training=True)["x_norm_patchtokens"]
                if rank == 0:
                    picture = pca_picture_png(x, tokens, scale=max(1, 128 // x.shape[-1]))
        finally:
            backbone.train(was_training)
        if rank != 0:
            return MonitorPoint({}, None)
        metrics = {"monitor/knn_top1": knn_top1(train_f, d.train_y, test_f, d.test_y, self.k),
                   "monitor/linear_top1": ridge_probe_top1(train_f, d.train_y, test_f, d.test_y, self.ridge)}
        return MonitorPoint(metrics, picture)


def monitor_steps(every: int, start: int, total: int) -> Sequence[int]:
    """Steps at which the monitor runs: 0 (the untrained reference), every ``every``, and the last."""
    if every <= 0:
        return []
    return sorted({s for s in range(0, total + 1, every) if s >= start} | ({total} if total >= start else set()))
