"""Batch adapters for Ray Data ``map_batches``: reader output in, rows ``{id, uri, label, bytes}`` out.

Pure numpy functions over numpy batches (no Ray import), kept apart from ``dino_ray.ray_data`` so
Data task workers import nothing heavier than pyarrow and numpy (not torch: each new worker
process pays its imports). Ids, URIs and labels follow ``dino_ray.data.sources`` exactly.
"""

from __future__ import annotations

import numpy as np

from dino_ray.data.sources import (
    SourceConfig, folder_class, iter_tar_members, label_index, parquet_row, read_image_bytes, relative_id,
    resolve_uri, tar_member_id,
)


def _columns(rows: list[dict], extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    out = {k: np.array([r[k] for r in rows], dtype=object) for k in ("id", "uri", "bytes") + extra}
    out["label"] = np.array([r["label"] for r in rows], dtype=np.int64)
    return out


def with_scheme(path: str, prefix: str) -> str:
    """A filesystem path from Ray's ``path`` column as a URI (``s3://`` put back)."""
    return prefix + path if prefix and not path.startswith(prefix) else path


def rows_from_files(batch: dict[str, np.ndarray], root: str, prefix: str, classes: list[str]) -> dict[str, np.ndarray]:
    """``read_binary_files`` rows (path, bytes): the id is the path relative to the source root."""
    rows = []
    for path, data in zip(batch["path"], batch["bytes"]):
        uri = with_scheme(str(path), prefix)
        image_id = relative_id(uri, root)
        cls = folder_class(image_id) if classes else None
        rows.append({"id": image_id, "uri": uri, "label": classes.index(cls) if cls is not None else -1, "bytes": data})
    return _columns(rows)


def rows_from_tar(batch: dict[str, np.ndarray], archives: list[str], root: str, prefix: str, classes: list[str],
                  cfg: SourceConfig, keep: set[str] | None) -> dict[str, np.ndarray]:
    """Whole archives (one per input row) expanded into one row per image member."""
    rows = []
    for path, data in zip(batch["path"], batch["bytes"]):
        archive_uri = with_scheme(str(path), prefix)
        for member, payload in iter_tar_members(bytes(data), cfg):
            member_id = tar_member_id(archive_uri, member, archives, root)
            if keep is not None and member_id not in keep:
                continue
            cls = folder_class(member_id) if classes else None
            rows.append({"id": member_id, "uri": f"{archive_uri}#{member}",
                         "label": classes.index(cls) if cls is not None else -1, "bytes": payload})
    return _columns(rows)


def rows_from_parquet(batch: dict[str, np.ndarray], cfg: SourceConfig, classes: list[str],
                      keep: set[str] | None) -> dict[str, np.ndarray]:
    """``read_parquet(include_paths=True)`` rows of a parquet source of image bytes."""
    n = len(batch[cfg.image_column])
    ids = batch[cfg.id_column] if cfg.id_column else [None] * n
    labels = batch[cfg.label_column] if cfg.label_column else [None] * n
    rows = [parquet_row(str(path), data, image_id, label, cfg, classes)
            for path, data, image_id, label in zip(batch["path"], batch[cfg.image_column], ids, labels)]
    return _columns([r for r in rows if keep is None or r["id"] in keep])


def rows_from_manifest(batch: dict[str, np.ndarray], cfg: SourceConfig, base: str, classes: list[str],
                       keep: set[str] | None) -> dict[str, np.ndarray]:
    """Manifest rows with each image's bytes fetched; a file that is gone gets skip_reason "missing" (a store
    that keeps failing raises ``StorageError``: not a bad image)."""
    n = len(batch[cfg.uri_column])
    ids = batch[cfg.id_column] if cfg.id_column else [None] * n
    labels = batch[cfg.label_column] if cfg.label_column else [None] * n
    rows = []
    for uri, image_id, label in zip(batch[cfg.uri_column], ids, labels):
        full = resolve_uri(str(uri), base)
        row_id = str(image_id) if cfg.id_column else full
        if keep is not None and row_id not in keep:
            continue
        try:
            data, reason = read_image_bytes(full), ""
        except FileNotFoundError:
            data, reason = b"", "missing"
        rows.append({"id": row_id, "uri": full, "label": label_index(label, classes), "bytes": data,
                     "skip_reason": reason})
    return _columns(rows, extra=("skip_reason",))
