"""Where images come from: folders (local or s3://), ImageFolder trees, tar archives, parquet files of image
bytes, and manifests (parquet with a column of image URIs).

The one data path of every stage: ``list_images`` turns a source into refs ``ImageRef(id, uri, label)``, and
``read_image_bytes(ref.uri)`` gives one image's encoded bytes (training's ``data/ssl_stream.py``, curate's and
eval's ``stages/inference.py``, the training monitor).
- ``id`` is stable across runs and machines: the path relative to the source root for folders;
  ``<member>`` (or ``<shard>/<member>`` when there are several archives) for tar; the ``id_column`` value
  (else ``<file>#<row>``, the file relative to the source root) for parquet; the ``id_column`` value (else
  the image URI) for manifests.
- ``uri`` says where the bytes are: the file's URI, ``<archive>#<member>`` for a tar member, or
  ``<file.parquet>#row=<i>&column=<image column>`` for a parquet row (``data/archives.py``).
- ``label`` is a class index (-1 when unknown): sorted folder names for ImageFolder trees, or the
  label column (integers as they are, strings mapped to their index in sorted order).

Refs come sorted by id, except parquet rows, which keep file and row order: a row read costs its whole row
group, and in that order consecutive images share one.

``max_images`` takes a deterministic subset: a uniform sample of N ids drawn with
``subset_seed`` from the sorted id list. It therefore keeps classes balanced in expectation, and the same
(source, N, seed) always gives the same images.

Pure module (pyarrow and ``dino_ray.storage``); the readers of tar members and parquet rows are in
``dino_ray.data.archives``.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow.fs as pafs

from dino_ray import storage
from dino_ray.data import archives
from dino_ray.data.archives import TAR_SUFFIXES, is_tar, read_column
from dino_ray.data.source_config import SourceConfig


@dataclass(frozen=True)
class ImageRef:
    """One image: its stable id, the URI of its bytes (a file, tar member or parquet row), its class index
    (-1 = none)."""

    id: str
    uri: str
    label: int = -1


log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Format inference and listings


@dataclass(frozen=True)
class Listing:
    """The source's files, listed once (a remote listing can take a while)."""

    format: str
    files: tuple[str, ...]  # file URIs, sorted (a single-file source lists itself)
    root: str  # ids of folder, tar and parquet sources are relative to this
    # what could not be listed, as (name, reason): logged by scan() as a warning, never silently dropped
    unlisted: tuple[tuple[str, str], ...] = ()


def has_extension(name: str, extensions: Iterable[str]) -> bool:
    suffix = posixpath.splitext(name)[1].lower().lstrip(".")
    return suffix in {e.lower().lstrip(".") for e in extensions}


def path_of(uri: str) -> str:
    """Absolute local path, or the s3:// URI unchanged: the form ids are made relative in."""
    return uri.rstrip("/") if storage.is_remote(uri) else storage.filesystem(uri)[1]


def relative_id(uri: str, root: str) -> str:
    path = path_of(uri)
    return path[len(root) + 1:] if path.startswith(root + "/") else posixpath.basename(path)


def scan(cfg: SourceConfig) -> Listing:
    """Validate ``cfg``, list its files and resolve "auto" (by names and, for parquet, the schema)."""
    cfg.validate(check_exists=True)
    fs, path = storage.filesystem(cfg.uri)
    unlisted: list[tuple[str, str]] = []
    if fs.get_file_info(path).type == pafs.FileType.File:
        files, root = [cfg.uri], posixpath.dirname(path_of(cfg.uri))
    else:
        files, root = storage.list_files(cfg.uri, unlisted=unlisted), path_of(cfg.uri)
    if unlisted:
        reasons = sorted({r.split(":")[0] for _, r in unlisted})
        log.warning("%s: %d entries could not be listed (%s), e.g. %s", cfg.uri, len(unlisted), ", ".join(reasons),
                    unlisted[0][0])
    return Listing(_infer_format(cfg, files), tuple(files), root, tuple(unlisted))


def _infer_format(cfg: SourceConfig, files: list[str]) -> str:
    if cfg.format != "auto":
        return cfg.format
    if any(has_extension(f, cfg.extensions) for f in files):
        return "imagefolder" if cfg.labels_from_folders else "folder"
    parquets = [f for f in files if f.lower().endswith(".parquet")]
    if parquets:
        names = set(archives.column_names(parquets[0]))
        if cfg.uri_column in names and cfg.image_column not in names:
            return "manifest"
        if cfg.image_column in names:
            return "parquet"
        raise ValueError(f"{parquets[0]!r} has neither image_column={cfg.image_column!r} nor "
                         f"uri_column={cfg.uri_column!r}; its columns are {sorted(names)}")
    if any(is_tar(f) for f in files):
        return "tar"
    raise ValueError(f"no images (extensions {cfg.extensions}), parquet or tar files found under {cfg.uri!r}")


def resolve_format(cfg: SourceConfig) -> str:
    """The concrete format of ``cfg``."""
    return scan(cfg).format


def parquet_files(listing: Listing, cfg: SourceConfig) -> list[str]:
    files = [f for f in listing.files if f.lower().endswith(".parquet")]
    if not files:
        raise ValueError(f"no .parquet files found at SourceConfig.uri={cfg.uri!r}")
    return files


def tar_files(listing: Listing, cfg: SourceConfig) -> list[str]:
    files = [f for f in listing.files if is_tar(f)]
    if not files:
        raise ValueError(f"no tar archives ({TAR_SUFFIXES}) found at SourceConfig.uri={cfg.uri!r}")
    return files


def folder_class(rel_path: str) -> str | None:
    """ImageFolder class of a relative path: its parent folder's name (None at the root)."""
    parent = posixpath.dirname(rel_path)
    return posixpath.basename(parent) if parent else None


def _paths(listing: Listing, cfg: SourceConfig, unlisted: list[tuple[str, str]] | None = None
           ) -> list[tuple[str, str]]:
    """(id, uri) of every image of a folder tree or of the tar archive(s), sorted by id."""
    if listing.format == "tar":
        return sorted(_tar_paths(listing, cfg, unlisted))
    return sorted((relative_id(uri, listing.root), uri) for uri in listing.files
                  if has_extension(uri, cfg.extensions))


def class_names(cfg: SourceConfig, listing: Listing | None = None) -> list[str]:
    """Class names in label-index order (empty when the source has no labels)."""
    listing = listing or scan(cfg)
    if listing.format in ("folder", "imagefolder", "tar"):
        if not cfg.wants_folder_labels:
            return []
        return sorted({c for c in (folder_class(i) for i, _ in _paths(listing, cfg)) if c is not None})
    if cfg.label_column is None:
        return []
    values = [v for v in read_column(parquet_files(listing, cfg), cfg.label_column) if v is not None]
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return [str(i) for i in range(max(values) + 1)] if values else []
    return sorted({v.decode() if isinstance(v, bytes) else str(v) for v in values})


def label_index(value, names: list[str]) -> int:
    """Class index of a label value (ints kept, strings looked up in ``names``; None -> -1)."""
    if value is None:
        return -1
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    text = value.decode() if isinstance(value, bytes) else str(value)
    try:
        return names.index(text)
    except ValueError:
        raise ValueError(f"label {text!r} is not among the {len(names)} class names") from None


def select_subset(ids: list[str], max_images: int | None, seed: int) -> list[int]:
    """Indices of the deterministic subset of ``ids`` (module doc), in ascending id order."""
    order = sorted(range(len(ids)), key=ids.__getitem__)
    if max_images is None or max_images >= len(ids):
        return order
    picked = np.random.default_rng(seed).choice(len(ids), size=max_images, replace=False)
    return [order[i] for i in sorted(picked)]


def list_images(cfg: SourceConfig, listing: Listing | None = None,
                unlisted: list[tuple[str, str]] | None = None) -> list[ImageRef]:
    """Every image of any source, as refs (module doc: ids, URIs, labels, order, ``max_images``).

    What could not be listed (see :class:`Listing`, and tar shards cut off mid-way) is appended to
    ``unlisted`` as ``(name, reason)``, for the stage summary."""
    listing = listing or scan(cfg)
    if unlisted is not None:
        unlisted.extend(listing.unlisted)
    names = class_names(cfg, listing)
    if listing.format == "manifest":
        refs = _manifest_refs(listing, cfg, names)
    elif listing.format == "parquet":
        refs = _parquet_refs(listing, cfg, names)
    else:
        refs = [ImageRef(i, uri, names.index(folder_class(i)) if names and folder_class(i) is not None else -1)
                for i, uri in _paths(listing, cfg, unlisted)]
    ids = [r.id for r in refs]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"duplicate image id {dup!r} in {cfg.uri!r}")
    keep = select_subset(ids, cfg.max_images, cfg.subset_seed)
    return [refs[i] for i in (sorted(keep) if listing.format == "parquet" else keep)]


def resolve_uri(uri: str, base: str) -> str:
    """A manifest entry as an absolute URI (relative entries are relative to the manifest's folder)."""
    if storage.is_remote(uri) or uri.startswith(("/", "file://")):
        return uri
    return storage.join(base, uri)


def _manifest_refs(listing: Listing, cfg: SourceConfig, names: list[str]) -> list[ImageRef]:
    files = parquet_files(listing, cfg)
    base = posixpath.dirname(path_of(files[0]))
    uris = read_column(files, cfg.uri_column)
    ids = read_column(files, cfg.id_column) if cfg.id_column else None
    labels = read_column(files, cfg.label_column) if cfg.label_column else [None] * len(uris)
    refs = []
    for i, uri in enumerate(uris):
        if uri is None:
            raise ValueError(f"manifest {cfg.uri!r} row {i} has no {cfg.uri_column!r}")
        full = resolve_uri(str(uri), base)
        refs.append(ImageRef(str(ids[i]) if ids is not None else full, full, label_index(labels[i], names)))
    return refs


def _parquet_refs(listing: Listing, cfg: SourceConfig, names: list[str]) -> list[ImageRef]:
    """One ref per row of the parquet file(s), in file and row order; the image bytes are not read here."""
    refs = []
    for file in parquet_files(listing, cfg):
        n, values = archives.parquet_columns(file, [c for c in (cfg.id_column, cfg.label_column) if c],
                                             required=(cfg.image_column,))
        labels = values[cfg.label_column] if cfg.label_column else [None] * n
        for row in range(n):
            refs.append(ImageRef(_row_id(file, row, values, listing, cfg),
                                 archives.row_uri(file, row, cfg.image_column), label_index(labels[row], names)))
    return refs


def _row_id(file: str, row: int, values: dict[str, list], listing: Listing, cfg: SourceConfig) -> str:
    """A parquet row's id: its ``id_column`` value, else ``<file relative to the root>#<row>`` (module doc)."""
    if cfg.id_column is None:
        return f"{relative_id(file, listing.root)}#{row}"
    value = values[cfg.id_column][row]
    if value is None:
        raise ValueError(f"{file!r} row {row} has no id: id_column={cfg.id_column!r} is null")
    return value.decode() if isinstance(value, bytes) else str(value)


def tar_member_id(archive_uri: str, member: str, shards: list[str], root: str) -> str:
    """``member`` for a single archive, ``<archive path relative to root>/<member>`` for shards."""
    return member if len(shards) == 1 else f"{relative_id(archive_uri, root)}/{member}"


def _tar_paths(listing: Listing, cfg: SourceConfig, unlisted: list[tuple[str, str]] | None = None
               ) -> list[tuple[str, str]]:
    """(id, uri) of the image members of the tar archive(s). A damaged shard keeps the members read before
    the damage and goes to ``unlisted`` as ``damaged_archive``."""
    shards = tar_files(listing, cfg)
    paths = []
    for shard in shards:
        members, damage = archives.tar_members(shard, lambda name: has_extension(name, cfg.extensions))
        paths += [(tar_member_id(shard, m, shards, listing.root), f"{shard}#{m}") for m in members]
        if damage is not None:
            log.warning("%s: tar listing stopped after %d images: %s: %s", shard, len(members),
                        type(damage).__name__, damage)
            if unlisted is not None:
                unlisted.append((shard, f"damaged_archive: after {len(members)} images: {damage}"))
    return paths


def read_image_bytes(uri: str) -> bytes:
    """Bytes of one image URI (module doc): a file (local or s3://), a tar member or a parquet row.

    ``FileNotFoundError`` when the file, member or row is gone (a counted ``missing`` skip for callers);
    :class:`~dino_ray.storage.StorageError` when the store keeps failing (the stage fails); ``ValueError``
    for a parquet row URI that is malformed or names a column the file does not have."""
    row = archives.parse_row_uri(uri)
    if row is not None:
        return archives.read_parquet_row(*row)
    archive, sep, member = uri.rpartition("#")
    if sep and is_tar(archive):
        return archives.read_tar_member(archive, member)
    return storage.read_bytes(uri)


def unlisted_summary(unlisted: Iterable[tuple[str, str]], prefix: str = "", samples: int = 20) -> dict:
    """Stage-summary entries for what a listing could not list: a count, counts by reason, a few names."""
    unlisted = list(unlisted)
    by_reason: dict[str, int] = {}
    for _, reason in unlisted:
        key = reason.split(":")[0]
        by_reason[key] = by_reason.get(key, 0) + 1
    out: dict = {f"{prefix}unlisted": len(unlisted)}
    if unlisted:
        out[f"{prefix}unlisted_by_reason"] = dict(sorted(by_reason.items()))
        out[f"{prefix}unlisted_samples"] = [f"{name} ({reason})" for name, reason in unlisted[:samples]]
    return out
