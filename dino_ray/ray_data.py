"""Ray Data plumbing: sources -> robust decode -> multi-crop + masks -> training batches.

The only Ray-aware module of the data path; everything it runs per batch lives in the pure modules
of ``dino_ray.data``. Choices forced by measurements (../shared/notes/ray-stack.md section 3):
- Files are read as bytes (``read_binary_files`` / ``read_parquet``) and decoded in our own
  ``map_batches``: ``read_images`` fails the whole dataset on one corrupt file.
- Every Data operator asks for a fraction of a CPU (``num_cpus_per_task``, default 0.25): Ray Data
  defaults to 1 CPU per task and deadlocks small clusters shared with training workers.
- The multi-crop output holds only fixed-shape numeric columns (one per crop and mask, plus
  ``label`` and ``sample_index``): string or ragged columns break ``iter_torch_batches``.
"""

from __future__ import annotations

import json
import posixpath
from typing import Iterator, NamedTuple

import numpy as np
import ray
import torch

from dino_ray import storage
from dino_ray.data.decode import DecodeConfig, SkipReport, decode_batch, keep_decoded, report_batch
from dino_ray.data.masking import MaskingConfig
from dino_ray.data.allocator import reduce_allocator_churn
from dino_ray.data.multicrop import MultiCrop, MultiCropConfig, normalize_batch
from dino_ray.data.row_batches import rows_from_files, rows_from_manifest, rows_from_parquet, rows_from_tar
from dino_ray.data.sources import (
    Listing, SourceConfig, class_names, list_images, parquet_files, parquet_subset, path_of, scan, stable_index,
    tar_files,
)


class ImageDataset(NamedTuple):
    """Decoded images of a source, and how to account for the files that were skipped.

    ``skip_report()`` runs the decode once more (images are dropped right after it). For small
    data, decode once instead: ``m = with_reasons.materialize()``, then ``skip_report(m)`` and
    ``m.map_batches(keep_decoded, batch_format="numpy")``.
    """

    dataset: ray.data.Dataset  # good rows only: id, uri, label, image (uint8 [H, W, 3], variable shape)
    with_reasons: ray.data.Dataset  # every input row, with its skip_reason ("" = decoded)
    class_names: list[str]

    def skip_report(self) -> SkipReport:
        """Exact per-reason counts over every input row."""
        return skip_report(self.with_reasons)


# ----------------------------------------------------------------------------------------------
# Reading: rows {id, uri, label, bytes}


def read_source(source: SourceConfig, *, num_cpus_per_task: float = 0.25, override_num_blocks: int | None = None,
                listing: Listing | None = None) -> tuple[ray.data.Dataset, list[str]]:
    """Rows ``{id, uri, label, bytes}`` of any source as a Ray Dataset, and the class names.

    The file listing (and the ``max_images`` subset) is computed once on the driver; the per-batch
    work is done by the pure adapters in ``dino_ray.data.row_batches``.
    """
    listing = listing or scan(source)
    classes = class_names(source, listing)
    prefix = "s3://" if source.uri.startswith("s3://") else ""
    cpus = {"num_cpus": num_cpus_per_task}
    read = dict(cpus, override_num_blocks=override_num_blocks)
    if listing.format in ("folder", "imagefolder"):
        refs = list_images(source, listing)
        if not refs:
            raise ValueError(f"no images found under {source.uri!r}")
        fs = storage.filesystem(source.uri)[0]
        ds = ray.data.read_binary_files([storage.filesystem(r.uri)[1] for r in refs], include_paths=True,
                                        filesystem=fs, **read)
        return ds.map_batches(rows_from_files, fn_kwargs={"root": listing.root, "prefix": prefix, "classes": classes},
                              batch_format="numpy", **cpus), classes
    if listing.format == "tar":
        archives = tar_files(listing, source)
        keep = {r.id for r in list_images(source, listing)} if source.max_images is not None else None
        ds = ray.data.read_binary_files([storage.filesystem(a)[1] for a in archives], include_paths=True,
                                        filesystem=storage.filesystem(archives[0])[0], **read)
        return ds.map_batches(rows_from_tar, batch_size=1, batch_format="numpy", fn_kwargs={
            "archives": archives, "root": listing.root, "prefix": prefix, "classes": classes, "cfg": source,
            "keep": keep}, **cpus), classes
    files = parquet_files(listing, source)
    fs = storage.filesystem(files[0])[0]
    paths = [storage.filesystem(f)[1] for f in files]
    if listing.format == "parquet":
        columns = [c for c in (source.image_column, source.id_column, source.label_column) if c]
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=columns, include_paths=True, **read)
        return ds.map_batches(rows_from_parquet, batch_format="numpy", fn_kwargs={
            "cfg": source, "classes": classes, "keep": parquet_subset(listing, source)}, **cpus), classes
    if listing.format == "manifest":
        keep = {r.id for r in list_images(source, listing)} if source.max_images is not None else None
        columns = [c for c in (source.uri_column, source.id_column, source.label_column) if c]
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=columns, **read)
        base = posixpath.dirname(path_of(files[0]))
        return ds.map_batches(rows_from_manifest, batch_format="numpy", fn_kwargs={
            "cfg": source, "base": base, "classes": classes, "keep": keep}, **cpus), classes
    raise ValueError(f"SourceConfig.format={listing.format!r} has no Ray reader")


# ----------------------------------------------------------------------------------------------
# Decoding and the skip report


def image_dataset(source: SourceConfig, decode: DecodeConfig, *, num_cpus_per_task: float = 0.25,
                  override_num_blocks: int | None = None) -> ImageDataset:
    """Decoded images of ``source``: good rows ``{id, uri, label, image}`` plus the skip accounting.

    ``override_num_blocks`` caps the read parallelism (each concurrent task may start a worker
    process; small inputs on small machines want few).
    """
    decode.validate()
    raw, classes = read_source(source, num_cpus_per_task=num_cpus_per_task, override_num_blocks=override_num_blocks)
    with_reasons = raw.map_batches(decode_batch, fn_kwargs={"cfg": decode}, batch_format="numpy", batch_size=32,
                                   num_cpus=num_cpus_per_task)
    good = with_reasons.map_batches(keep_decoded, batch_format="numpy", num_cpus=num_cpus_per_task)
    return ImageDataset(good, with_reasons, classes)


def skip_report(with_reasons: ray.data.Dataset) -> SkipReport:
    """Merge per-batch reports of a dataset with ``skip_reason`` and ``uri`` columns into one exact report."""
    parts = with_reasons.select_columns(["skip_reason", "uri"]).map_batches(
        report_batch, batch_format="numpy", num_cpus=0.25).take_all()
    total = SkipReport()
    for part in parts:
        total = total.merge(SkipReport.from_dict(json.loads(part["report"])))
    return total


# ----------------------------------------------------------------------------------------------
# Multi-crop


@ray.remote(num_cpus=0)
class EpochCounter:
    """The current epoch, shared by the multi-crop actors of a long-lived dataset.

    A Ray Train dataset is built once and re-executed every epoch; the training loop sets the
    epoch here (rank 0, before the ranks start iterating: put a barrier after ``set``) so each
    epoch draws new views while staying reproducible.
    """

    def __init__(self, epoch: int = 0):
        self.epoch = int(epoch)

    def set(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def get(self) -> int:
        return self.epoch


class _MultiCropUDF:
    """Actor-side multi-crop: one MultiCrop per actor, per-sample seeds from the stable row id."""

    def __init__(self, crop_cfg: MultiCropConfig, mask_cfg: MaskingConfig | None, seed: int, epoch):
        reduce_allocator_churn()  # a dedicated actor process: see the function's docstring
        torch.set_num_threads(1)
        self.multicrop = MultiCrop(crop_cfg, mask_cfg, seed)
        self.epoch = epoch

    def _current_epoch(self) -> int:
        return int(self.epoch) if isinstance(self.epoch, int) else int(ray.get(self.epoch.get.remote()))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        epoch = self._current_epoch()
        indices = np.array([stable_index(str(i)) for i in batch["id"]], dtype=np.int64)
        views = [self.multicrop(np.asarray(image), int(index), epoch) for image, index in zip(batch["image"], indices)]
        out = {name: np.stack([v[name] for v in views]) for name in views[0]} if views else {}
        out["label"] = np.asarray(batch["label"], dtype=np.int64)
        out["sample_index"] = indices
        return out


def multicrop_dataset(
    ds: ray.data.Dataset,
    crop_cfg: MultiCropConfig,
    mask_cfg: MaskingConfig | None,
    seed: int,
    epoch: int | ray.actor.ActorHandle = 0,
    *,
    num_cpus: float = 0.25,
    pool_size: tuple[int, int] = (1, 2),
    batch_size: int = 16,
) -> ray.data.Dataset:
    """Views of every image: uint8 ``global_i`` / ``local_i``, bool ``mask_i``, int64 ``label``, ``sample_index``.

    ``epoch`` is an int (fixed views) or an ``EpochCounter`` handle (views change with the epoch
    the training loop sets). ``sample_index`` is a 63-bit hash of the row id, so a sample's views
    do not depend on block boundaries, shuffling or the number of actors.
    """
    crop_cfg.validate()
    if mask_cfg is not None:
        mask_cfg.validate()
    if epoch is None or (isinstance(epoch, int) and epoch < 0):
        raise ValueError(f"epoch must be an int >= 0 or an EpochCounter handle, got {epoch!r}")
    return ds.map_batches(
        _MultiCropUDF,
        fn_constructor_kwargs={"crop_cfg": crop_cfg, "mask_cfg": mask_cfg, "seed": seed, "epoch": epoch},
        compute=ray.data.ActorPoolStrategy(min_size=pool_size[0], max_size=pool_size[1]),
        batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus,
    )


def iter_ssl_batches(shard, batch_size: int, device: str | torch.device, crop_cfg: MultiCropConfig, *,
                     drop_last: bool = True, prefetch_batches: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Training batches from a multi-crop dataset or a Ray Train shard.

    Yields ``normalize_batch`` output plus ``labels`` and ``sample_index`` [B] (of image ``b``).
    Crops travel as uint8 and are normalised on ``device``: 4x less host-to-device traffic.
    """
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=device, drop_last=drop_last,
                                          prefetch_batches=prefetch_batches):
        out = normalize_batch(batch, crop_cfg)
        out["labels"] = batch["label"]
        out["sample_index"] = batch["sample_index"]
        yield out


__all__ = ["EpochCounter", "ImageDataset", "image_dataset", "iter_ssl_batches", "multicrop_dataset", "read_source",
           "skip_report"]
