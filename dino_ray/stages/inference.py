"""Frozen-backbone batch inference on Ray Data: images in, vectors out, bad images counted.

Used by curation (L2-normalised CLS embeddings) and evaluation (CLS + average-pooled patch tokens of
the last four blocks). Work is split into shards that are written one by one, so an interrupted
stage resumes at the first missing shard instead of re-embedding everything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from dino_ray import feature_store, storage

log = logging.getLogger("dino_ray.inference")


@dataclass(frozen=True)
class BackboneRef:
    """An exported backbone dir, or a random initialisation of a ViT config (the "random" baseline)."""

    uri: str | None = None
    random_vit: dict | None = None
    seed: int = 0

    def load(self):
        import torch

        from dino_ray import backbone_io
        from dino_ray.models import DinoVisionTransformer, ViTConfig

        if self.uri:
            return backbone_io.load_backbone(self.uri)
        torch.manual_seed(self.seed)
        return DinoVisionTransformer(ViTConfig(**{**self.random_vit, "drop_path_rate": 0.0}))


@dataclass(frozen=True)
class InferenceSpec:
    backbone: BackboneRef | None  # None: raw-pixel features
    image_size: int
    mode: str  # "embed" (normalised CLS) | "eval" (cls_i / avgpool_i) | "pixels"
    decode: Any  # DecodeConfig
    pixel_size: int = 32
    threads: int | None = None
    flip_invariant: bool = False  # embed: CLS(x) + CLS(mirror(x)), so mirrored copies embed identically


class FeatureMaker:
    """Ray Data callable: rows (id, uri, label) -> the same rows with vectors and a skip reason."""

    def __init__(self, spec: InferenceSpec):
        import torch

        self.spec = spec
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = spec.backbone.load().to(self.device).eval() if spec.backbone else None

    def _decode(self, uri: str) -> tuple[np.ndarray | None, str]:
        from dino_ray.data.decode import DecodeError, decode_image
        from dino_ray.data.sources import read_image_bytes

        cfg = self.spec.decode
        try:
            return decode_image(read_image_bytes(uri), draft_size=self.spec.image_size * 2, max_pixels=cfg.max_pixels,
                                min_size=cfg.min_size, max_bytes=cfg.max_bytes), ""
        except DecodeError as e:
            return None, e.reason
        except FileNotFoundError:
            return None, "missing"
        # anything else (StorageError after its retries) fails the shard: an outage is not a bad image, and
        # the shard is redone when the stage runs again

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from dino_ray.data.eval_transform import eval_view

        images, reasons = [], []
        for uri in batch["uri"]:
            img, reason = self._decode(str(uri))
            images.append(img)
            reasons.append(reason)
        good = [i for i, r in enumerate(reasons) if not r]
        out = {k: batch[k] for k in ("id", "uri", "label")}
        out["skip_reason"] = np.asarray(reasons, dtype=object)
        n = len(reasons)
        if self.spec.mode == "pixels":
            from dino_ray.evals.baselines import raw_pixel_features

            feats = {"cls_1": np.zeros((n, 3 * self.spec.pixel_size ** 2), np.float32)}
            if good:
                feats["cls_1"][good] = raw_pixel_features(np.stack([
                    np.asarray(_square(images[i], self.spec.pixel_size * 2)) for i in good]), self.spec.pixel_size)
            return {**out, **feats}
        d = self.model.embed_dim
        blocks = min(4, len(self.model.blocks))  # DINOv2 probes read the last 4 blocks; small students have fewer
        keys = ["embedding"] if self.spec.mode == "embed" else [
            f"{p}_{i}" for p in ("cls", "avgpool") for i in range(1, blocks + 1)]
        feats = {k: np.zeros((n, d), np.float32) for k in keys}
        if good:
            x = torch.from_numpy(np.stack([eval_view(images[i], self.spec.image_size) for i in good]))
            if self.spec.mode == "embed":
                # fp32 on purpose, even where bf16 is fast: copy detection compares cosines to 4 decimals
                # (demo threshold 0.9998), below bf16's rounding.
                with torch.inference_mode():
                    x = x.to(self.device)
                    cls = self.model(x).float()
                    if self.spec.flip_invariant:
                        cls = cls + self.model(x.flip(-1)).float()
                    feats["embedding"][good] = torch.nn.functional.normalize(cls, dim=-1).cpu().numpy()
            else:
                from dino_ray.evals.features import extract_features

                got = extract_features(self.model, x, n_last_blocks=blocks)
                for k in keys:
                    feats[k][good] = got[k]
        return {**out, **feats}


def _square(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


@dataclass
class ShardedRun:
    """Rows split into shards of ``shard_size``; each shard is one parquet file under ``out_uri``."""

    rows: Sequence[dict]
    out_uri: str
    shard_size: int = 4096
    written: list[str] = field(default_factory=list)

    def shard_uri(self, i: int) -> str:
        return storage.join(self.out_uri, f"shard_{i:05d}.parquet")

    @property
    def n_shards(self) -> int:
        return max(1, -(-len(self.rows) // self.shard_size))


def in_input_order(chunk: Sequence[dict], meta: dict[str, list], feats: dict[str, np.ndarray]
                   ) -> tuple[dict[str, list], dict[str, np.ndarray]]:
    """Rows back in the order of ``chunk`` (matched by id, then uri).

    Ray Data returns blocks as actors finish them, so without this a shard's row order, and everything
    trained on it by row index (the linear probe's minibatches), changes from run to run."""
    position = {(str(r["id"]), str(r["uri"])): j for j, r in enumerate(chunk)}
    order = np.argsort([position[(str(i), str(u))] for i, u in zip(meta["id"], meta["uri"])], kind="stable")
    return {k: [v[j] for j in order] for k, v in meta.items()}, {k: v[order] for k, v in feats.items()}


def image_rows(source: Any, unlisted: list[tuple[str, str]]) -> list[dict]:
    """The rows :func:`run_inference` reads: every image of a source (id, URI, label), in listing order;
    what the listing could not list is appended to ``unlisted``."""
    from dino_ray.data.sources import list_images

    return [{"id": r.id, "uri": r.uri, "label": r.label} for r in list_images(source, unlisted=unlisted)]


def run_inference(rows: Sequence[dict], spec: InferenceSpec, out_uri: str, *, num_actors: int = 1,
                  cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, batch_size: int = 64,
                  shard_size: int = 4096, task: str = "inference") -> tuple[list[str], int]:
    """Embed ``rows`` shard by shard (skipping shards already written); returns (shard uris, n computed).

    ``task`` names this call in the console's progress line."""
    import ray
    from ray.data import ActorPoolStrategy

    from dino_ray.progress import Reporter

    run = ShardedRun(rows, out_uri, shard_size)
    computed = 0
    progress = Reporter(task, len(rows), "images")
    for i in range(run.n_shards):
        uri = run.shard_uri(i)
        if storage.exists(uri):
            run.written.append(uri)
            continue
        chunk = [{"id": str(r["id"]), "uri": str(r["uri"]), "label": int(r.get("label", -1))}
                 for r in rows[i * shard_size:(i + 1) * shard_size]]
        ds = ray.data.from_items(chunk, override_num_blocks=max(1, min(len(chunk) // batch_size, 64)))
        ds = ds.map_batches(FeatureMaker, fn_constructor_kwargs={"spec": spec}, batch_size=batch_size,
                            compute=ActorPoolStrategy(min_size=1, max_size=num_actors), num_cpus=cpus_per_actor,
                            num_gpus=gpus_per_actor, batch_format="numpy")
        meta: dict[str, list] = {k: [] for k in feature_store.META_COLUMNS}
        feats: dict[str, list] = {}
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            progress.update(i * shard_size + len(meta["id"]) + len(batch["id"]))
            for k in meta:
                meta[k].extend(batch[k].tolist())
            for k, v in batch.items():
                if k not in meta:
                    feats.setdefault(k, []).append(np.stack(list(v)).astype(np.float32))
        meta, stacked = in_input_order(chunk, meta, {k: np.concatenate(v) for k, v in feats.items()})
        feature_store.write_features(uri, meta, stacked)
        run.written.append(uri)
        computed += len(chunk)
        log.info("wrote %s (%d rows)", uri, len(chunk))
    return run.written, computed
