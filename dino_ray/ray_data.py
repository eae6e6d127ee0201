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
from typing import Iterator, NamedTuple

import numpy as np
import ray
import torch

from dino_ray import storage
from dino_ray.data.decode import DecodeConfig, SkipReport, decode_batch, keep_decoded
from dino_ray.data.masking import MaskingConfig
from dino_ray.data.multicrop import MultiCrop, MultiCropConfig, normalize_batch, reduce_allocator_churn
from dino_ray.data.sources import (
    Listing, SourceConfig, class_names, folder_class, iter_tar_members, label_index, list_images, parquet_files,
    parquet_row, parquet_subset, relative_id, resolve_uri, scan, stable_index, tar_files, tar_member_id,
)


class ImageDataset(NamedTuple):
    """Decoded images of a source, and how to account for the files that were skipped."""

    dataset: ray.data.Dataset  # good rows only: id, uri, label, image (uint8 [H, W, 3], variable shape)
    with_reasons: ray.data.Dataset  # every input row, with its skip_reason ("" = decoded)
    class_names: list[str]

    def skip_report(self) -> SkipReport:
        """Exact per-reason counts (one extra pass over the decode; images are dropped right away)."""
        return skip_report(self.with_reasons)


# ----------------------------------------------------------------------------------------------
# Reading: rows {id, uri, label, bytes}


def _scheme_prefix(uri: str) -> str:
    return "s3://" if uri.startswith("s3://") else ""


def _file_rows(batch: dict[str, np.ndarray], root: str, prefix: str, classes: list[str]) -> dict[str, np.ndarray]:
    """Rows of read_binary_files: the id is the path relative to the source root."""
    uris = [prefix + str(p) if prefix and not str(p).startswith(prefix) else str(p) for p in batch["path"]]
    ids = [relative_id(u, root) for u in uris]
    labels = [classes.index(c) if classes and (c := folder_class(i)) is not None else -1 for i in ids]
    return {"id": np.array(ids, dtype=object), "uri": np.array(uris, dtype=object),
            "label": np.array(labels, dtype=np.int64), "bytes": batch["bytes"]}


def _tar_rows(batch: dict[str, np.ndarray], archives: list[str], root: str, prefix: str, classes: list[str],
              cfg: SourceConfig, keep: set[str] | None) -> dict[str, list]:
    """Expand whole archives (one per input row) into one row per image member."""
    out: dict[str, list] = {"id": [], "uri": [], "label": [], "bytes": []}
    for path, data in zip(batch["path"], batch["bytes"]):
        archive_uri = prefix + str(path) if prefix and not str(path).startswith(prefix) else str(path)
        for member, payload in iter_tar_members(bytes(data), cfg):
            member_id = tar_member_id(archive_uri, member, archives, root)
            if keep is not None and member_id not in keep:
                continue
            cls = folder_class(member_id) if classes else None
            out["id"].append(member_id)
            out["uri"].append(f"{archive_uri}#{member}")
            out["label"].append(classes.index(cls) if cls is not None else -1)
            out["bytes"].append(payload)
    return {"id": np.array(out["id"], dtype=object), "uri": np.array(out["uri"], dtype=object),
            "label": np.array(out["label"], dtype=np.int64), "bytes": np.array(out["bytes"], dtype=object)}


def _parquet_rows(batch: dict[str, np.ndarray], cfg: SourceConfig, classes: list[str],
                  keep: set[str] | None) -> dict[str, np.ndarray]:
    n = len(batch[cfg.image_column])
    ids = batch[cfg.id_column] if cfg.id_column else [None] * n
    labels = batch[cfg.label_column] if cfg.label_column else [None] * n
    rows = [parquet_row(str(path), data, image_id, label, cfg, classes)
            for path, data, image_id, label in zip(batch["path"], batch[cfg.image_column], ids, labels)]
    rows = [r for r in rows if keep is None or r["id"] in keep]
    return {"id": np.array([r["id"] for r in rows], dtype=object), "uri": np.array([r["uri"] for r in rows], dtype=object),
            "label": np.array([r["label"] for r in rows], dtype=np.int64),
            "bytes": np.array([r["bytes"] for r in rows], dtype=object)}


def _manifest_rows(batch: dict[str, np.ndarray], cfg: SourceConfig, base: str, classes: list[str],
                   keep: set[str] | None) -> dict[str, np.ndarray]:
    """Fetch every manifest entry's bytes; an unreadable file becomes a row skipped as "other"."""
    out: dict[str, list] = {"id": [], "uri": [], "label": [], "bytes": [], "skip_reason": []}
    n = len(batch[cfg.uri_column])
    ids = batch[cfg.id_column] if cfg.id_column else [None] * n
    labels = batch[cfg.label_column] if cfg.label_column else [None] * n
    for uri, image_id, label in zip(batch[cfg.uri_column], ids, labels):
        full = resolve_uri(str(uri), base)
        row_id = str(image_id) if cfg.id_column else full
        if keep is not None and row_id not in keep:
            continue
        try:
            data, reason = storage.read_bytes(full), ""
        except OSError:
            data, reason = b"", "other"
        out["id"].append(row_id)
        out["uri"].append(full)
        out["label"].append(label_index(label, classes))
        out["bytes"].append(data)
        out["skip_reason"].append(reason)
    return {"id": np.array(out["id"], dtype=object), "uri": np.array(out["uri"], dtype=object),
            "label": np.array(out["label"], dtype=np.int64), "bytes": np.array(out["bytes"], dtype=object),
            "skip_reason": np.array(out["skip_reason"], dtype=object)}


def read_source(source: SourceConfig, *, num_cpus_per_task: float = 0.25,
                listing: Listing | None = None) -> tuple[ray.data.Dataset, list[str]]:
    """Rows ``{id, uri, label, bytes}`` of any source as a Ray Dataset, and the class names."""
    listing = listing or scan(source)
    classes = class_names(source, listing)
    prefix = _scheme_prefix(source.uri)
    cpus = {"num_cpus": num_cpus_per_task}
    if listing.format in ("folder", "imagefolder"):
        refs = list_images(source, listing)
        if not refs:
            raise ValueError(f"no images found under {source.uri!r}")
        fs, _ = storage.filesystem(source.uri)
        paths = [storage.filesystem(r.uri)[1] for r in refs]
        ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs, **cpus)
        ds = ds.map_batches(_file_rows, fn_kwargs={"root": listing.root, "prefix": prefix, "classes": classes},
                            batch_format="numpy", **cpus)
    elif listing.format == "tar":
        archives = tar_files(listing, source)
        keep = {r.id for r in list_images(source, listing)} if source.max_images is not None else None
        fs, _ = storage.filesystem(archives[0])
        ds = ray.data.read_binary_files([storage.filesystem(a)[1] for a in archives], include_paths=True,
                                        filesystem=fs, **cpus)
        ds = ds.map_batches(_tar_rows, batch_size=1, batch_format="numpy", fn_kwargs={
            "archives": archives, "root": listing.root, "prefix": prefix, "classes": classes, "cfg": source,
            "keep": keep}, **cpus)
    elif listing.format == "parquet":
        files = parquet_files(listing, source)
        fs, _ = storage.filesystem(files[0])
        columns = [c for c in (source.image_column, source.id_column, source.label_column) if c]
        ds = ray.data.read_parquet([storage.filesystem(f)[1] for f in files], filesystem=fs, columns=columns,
                                   include_paths=True, **cpus)
        ds = ds.map_batches(_parquet_rows, batch_format="numpy", fn_kwargs={
            "cfg": source, "classes": classes, "keep": parquet_subset(listing, source)}, **cpus)
    elif listing.format == "manifest":
        files = parquet_files(listing, source)
        fs, path0 = storage.filesystem(files[0])
        keep = {r.id for r in list_images(source, listing)} if source.max_images is not None else None
        columns = [c for c in (source.uri_column, source.id_column, source.label_column) if c]
        ds = ray.data.read_parquet([storage.filesystem(f)[1] for f in files], filesystem=fs, columns=columns, **cpus)
        base = prefix + path0.rsplit("/", 1)[0] if prefix else path0.rsplit("/", 1)[0]
        ds = ds.map_batches(_manifest_rows, batch_format="numpy", fn_kwargs={
            "cfg": source, "base": base, "classes": classes, "keep": keep}, **cpus)
    else:
        raise ValueError(f"SourceConfig.format={listing.format!r} has no Ray reader")
    return ds, classes


# ----------------------------------------------------------------------------------------------
# Decoding and the skip report


def _decode_keeping_read_errors(batch: dict[str, np.ndarray], cfg: DecodeConfig) -> dict[str, np.ndarray]:
    """decode_batch, but rows that already failed to be read keep their reason."""
    earlier = batch.pop("skip_reason", None)
    out = decode_batch(batch, cfg)
    if earlier is not None:
        out["skip_reason"] = np.array([e or r for e, r in zip(earlier, out["skip_reason"])], dtype=object)
    return out


def image_dataset(source: SourceConfig, decode: DecodeConfig, *, num_cpus_per_task: float = 0.25) -> ImageDataset:
    """Decoded images of ``source``: good rows ``{id, uri, label, image}`` plus the skip accounting."""
    decode.validate()
    raw, classes = read_source(source, num_cpus_per_task=num_cpus_per_task)
    with_reasons = raw.map_batches(_decode_keeping_read_errors, fn_kwargs={"cfg": decode}, batch_format="numpy",
                                   batch_size=32, num_cpus=num_cpus_per_task)
    good = with_reasons.map_batches(keep_decoded, batch_format="numpy", num_cpus=num_cpus_per_task)
    return ImageDataset(good, with_reasons, classes)


def _partial_report(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    report = SkipReport.from_columns(batch["skip_reason"], batch["uri"])
    return {"report": np.array([json.dumps(report.to_dict())], dtype=object)}


def skip_report(with_reasons: ray.data.Dataset) -> SkipReport:
    """Merge per-batch reports of a dataset with a ``skip_reason`` column into one exact report."""
    parts = with_reasons.select_columns(["skip_reason", "uri"]).map_batches(
        _partial_report, batch_format="numpy", num_cpus=0.25).take_all()
    total = SkipReport()
    for part in parts:
        d = json.loads(part["report"])
        total = total.merge(SkipReport(d["n_inputs"], d["n_decoded"], d["counts"], d["samples"]))
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
    """Training batches from a multi-crop dataset or a Ray Train shard: ``normalize_batch`` output + ``labels``.

    Crops travel as uint8 and are normalised on ``device`` (4x less host-to-device traffic).
    """
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=device, drop_last=drop_last,
                                          prefetch_batches=prefetch_batches):
        out = normalize_batch(batch, crop_cfg)
        out["labels"] = batch["label"]
        yield out


__all__ = ["EpochCounter", "ImageDataset", "image_dataset", "iter_ssl_batches", "multicrop_dataset", "read_source",
           "skip_report"]
