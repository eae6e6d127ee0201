"""Where images come from: folders (local or s3://), ImageFolder trees, parquet bytes, tar archives, manifests.

Every source turns into rows ``{id: str, uri: str, label: int, bytes: bytes}``:
- ``id`` is stable across runs and machines: the path relative to the source root for folders;
  ``<member>`` (or ``<shard>/<member>`` when there are several archives) for tar; the
  ``id_column`` value (else a content hash ``sha1:<16 hex>``) for parquet; the ``id_column`` value
  (else the image URI) for manifests.
- ``uri`` says where to look at the file: the file URI, ``<archive>#<member>``, ``<parquet>#<id>``.
- ``label`` is a class index (-1 when unknown): sorted folder names for ImageFolder trees, or the
  label column (integers as they are, strings mapped to their index in sorted order).

``max_images`` takes a deterministic subset: a uniform sample of N ids drawn with
``subset_seed`` from the sorted id list, returned in sorted order. It therefore keeps classes
balanced in expectation, and the same (source, N, seed) always gives the same images.

Pure module (pyarrow / tarfile / ``dino_ray.storage``); the Ray Data readers (``dino_ray.ray_data``
with the batch adapters of ``row_batches``) reuse the helpers below so both paths produce
identical rows.
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dino_ray import storage

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
FORMATS = ("auto", "folder", "imagefolder", "parquet", "tar", "manifest")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass
class SourceConfig:
    """One image collection and how to read it."""

    # Local folder, s3://bucket/prefix, a .parquet file or folder of them, a .tar archive (or a
    # folder of .tar shards), or a curated manifest (parquet with a column of image URIs).
    uri: str
    # "auto" infers: image files present -> "folder" ("imagefolder" with labels_from_folders);
    # else parquet -> "manifest" if the schema has ``uri_column`` but not ``image_column``, else
    # "parquet"; else .tar archives -> "tar".
    format: str = "auto"
    # Parquet: column with encoded image bytes (binary, or a struct with a "bytes" field as written
    # by Hugging Face datasets).
    image_column: str = "image"
    # Parquet / manifest: integer or string class column; None = no labels (-1).
    label_column: str | None = None
    # Parquet / manifest: column with stable row ids; None = content hash / the URI.
    id_column: str | None = None
    # Manifest: column with image URIs (absolute, s3://, or relative to the manifest's folder).
    uri_column: str = "uri"
    # File name extensions that count as images (case-insensitive) for folders and tar archives.
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    # Deterministic subset size (see module doc); None = everything.
    max_images: int | None = None
    subset_seed: int = 0
    # Folder / tar: class = name of the file's parent folder (root/<class>/<file>). Implied by
    # format="imagefolder".
    labels_from_folders: bool = False

    def validate(self, check_exists: bool = False) -> "SourceConfig":
        """Static checks; ``check_exists`` also requires ``uri`` to be set and to exist (I/O).

        Config loading validates without I/O: a job file may name a bucket only the cluster can
        reach, or leave ``uri`` empty for the pipeline to fill in with an upstream stage's output.
        """
        if not isinstance(self.uri, str):
            raise ValueError(f"SourceConfig.uri must be a string, got {self.uri!r}")
        if self.format not in FORMATS:
            raise ValueError(f"SourceConfig.format={self.format!r} is not one of {FORMATS}")
        if check_exists and not self.uri:
            raise ValueError("SourceConfig.uri is empty: set it to a folder, s3:// prefix, parquet or tar file")
        if check_exists and not storage.exists(self.uri):
            raise FileNotFoundError(f"SourceConfig.uri={self.uri!r} does not exist")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"SourceConfig.max_images must be None or >= 1, got {self.max_images}")
        if not self.extensions:
            raise ValueError("SourceConfig.extensions must not be empty")
        return self

    @property
    def wants_folder_labels(self) -> bool:
        return self.labels_from_folders or self.format == "imagefolder"


@dataclass(frozen=True)
class ImageRef:
    """One image file: its stable id, where it lives, and its class index (-1 = none)."""

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
    root: str  # ids of folder / tar sources are relative to this
    # what could not be listed, as (name, reason): logged by scan() as a warning, never silently dropped
    unlisted: tuple[tuple[str, str], ...] = ()


def has_extension(name: str, extensions: Iterable[str]) -> bool:
    suffix = posixpath.splitext(name)[1].lower().lstrip(".")
    return suffix in {e.lower().lstrip(".") for e in extensions}


def is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


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
        names = set(_parquet_schema(parquets[0]).names)
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


def _parquet_schema(uri: str) -> pa.Schema:
    fs, path = storage.filesystem(uri)
    return pq.read_schema(path, filesystem=fs)


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


def read_column(files: list[str], column: str) -> list:
    """One column of parquet files, concatenated; a clear error names a missing column."""
    values: list = []
    for uri in files:
        fs, path = storage.filesystem(uri)
        schema = pq.read_schema(path, filesystem=fs)
        if column not in schema.names:
            raise ValueError(f"column {column!r} not found in {uri!r}; its columns are {schema.names}")
        values.extend(pq.read_table(path, columns=[column], filesystem=fs).column(column).to_pylist())
    return values


def _paths(listing: Listing, cfg: SourceConfig, unlisted: list[tuple[str, str]] | None = None
           ) -> list[tuple[str, str]]:
    """(id, uri) of every image of a folder tree or of the tar archive(s), sorted by id."""
    if listing.format == "tar":
        return sorted((ref.id, ref.uri) for ref in list_tar_members(listing, cfg, unlisted))
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
    """Every image of a folder, ImageFolder tree, tar archive(s) or manifest, as refs sorted by id.

    What could not be listed (see :class:`Listing`, and tar shards cut off mid-way) is appended to
    ``unlisted`` as ``(name, reason)``, for the stage summary. Parquet sources hold bytes, not files: read
    them with ``iter_parquet_rows``.
    """
    listing = listing or scan(cfg)
    if unlisted is not None:
        unlisted.extend(listing.unlisted)
    if listing.format == "parquet":
        raise ValueError(f"{cfg.uri!r} is a parquet source of image bytes: use iter_parquet_rows / iter_rows")
    names = class_names(cfg, listing)
    if listing.format == "manifest":
        refs = _manifest_refs(listing, cfg, names)
    else:
        refs = [ImageRef(i, uri, names.index(folder_class(i)) if names and folder_class(i) is not None else -1)
                for i, uri in _paths(listing, cfg, unlisted)]
    ids = [r.id for r in refs]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"duplicate image id {dup!r} in {cfg.uri!r}")
    return [refs[i] for i in select_subset(ids, cfg.max_images, cfg.subset_seed)]


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


# ----------------------------------------------------------------------------------------------
# Row readers


def content_id(data: bytes) -> str:
    """Stable id for a parquet row without an id column: a hash of the image bytes."""
    return "sha1:" + hashlib.sha1(data).hexdigest()[:16]


def stable_index(image_id: str) -> int:
    """A non-negative 63-bit integer derived from an id, for per-sample seeding independent of order."""
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def image_bytes(value) -> bytes | None:
    """Encoded bytes from a parquet cell: binary, or a struct with a "bytes" field (HF datasets)."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("bytes")
        if value is None:
            return None
    if isinstance(value, np.ndarray):
        return value.tobytes()
    return bytes(value)


def iter_tar_members(data: bytes | io.BufferedIOBase, cfg: SourceConfig) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of every image file in one tar archive, in archive order."""
    fileobj = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with tarfile.open(fileobj=fileobj, mode="r:*") as archive:
        for member in archive:
            if member.isfile() and has_extension(member.name, cfg.extensions):
                handle = archive.extractfile(member)
                yield member.name, handle.read() if handle is not None else b""


def tar_member_id(archive_uri: str, member: str, archives: list[str], root: str) -> str:
    """``member`` for a single archive, ``<archive path relative to root>/<member>`` for shards."""
    return member if len(archives) == 1 else f"{relative_id(archive_uri, root)}/{member}"


def list_tar_members(listing: Listing, cfg: SourceConfig, unlisted: list[tuple[str, str]] | None = None
                     ) -> list[ImageRef]:
    """Image members of the tar archive(s): headers only, seeking over the data where possible. A damaged
    shard keeps the members read before the damage and goes to ``unlisted`` as ``damaged_archive``."""
    archives = tar_files(listing, cfg)
    refs = []
    for archive_uri in archives:
        fs, path = storage.filesystem(archive_uri)
        found = len(refs)
        try:
            with fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:*") as archive:
                for member in archive:
                    if member.isfile() and has_extension(member.name, cfg.extensions):
                        refs.append(ImageRef(tar_member_id(archive_uri, member.name, archives, listing.root),
                                             f"{archive_uri}#{member.name}"))
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:  # a truncated or corrupt shard
            # keep the members read before the damage: one bad shard must not hide all the others
            log.warning("%s: tar listing stopped after %d images: %s: %s", archive_uri, len(refs) - found,
                        type(e).__name__, e)
            if unlisted is not None:
                unlisted.append((archive_uri, f"damaged_archive: after {len(refs) - found} images: {e}"))
    return refs


def parquet_subset(listing: Listing, cfg: SourceConfig) -> set[str] | None:
    """Ids kept by ``max_images`` in a parquet source (None = all rows)."""
    if cfg.max_images is None:
        return None
    if cfg.id_column is None:
        raise ValueError(f"SourceConfig.max_images on the parquet source {cfg.uri!r} needs id_column: without "
                         "it row ids are content hashes and subsetting would read every image")
    ids = [str(v) for v in read_column(parquet_files(listing, cfg), cfg.id_column)]
    return {ids[i] for i in select_subset(ids, cfg.max_images, cfg.subset_seed)}


def parquet_row(uri: str, data, image_id, label, cfg: SourceConfig, names: list[str]) -> dict:
    """One parquet row as ``{id, uri, label, bytes}`` (shared by the plain and the Ray reader)."""
    raw = image_bytes(data) or b""
    row_id = str(image_id) if cfg.id_column else content_id(raw)
    return {"id": row_id, "uri": f"{uri}#{row_id}", "label": label_index(label, names) if cfg.label_column else -1,
            "bytes": raw}


def iter_parquet_rows(cfg: SourceConfig, listing: Listing | None = None) -> Iterator[dict]:
    """Rows of a parquet source with an image-bytes column, in file and row order."""
    listing = listing or scan(cfg)
    names = class_names(cfg, listing)
    keep = parquet_subset(listing, cfg)
    columns = [c for c in (cfg.image_column, cfg.id_column, cfg.label_column) if c]
    for uri in parquet_files(listing, cfg):
        fs, path = storage.filesystem(uri)
        for record in pq.read_table(path, columns=columns, filesystem=fs).to_pylist():
            row = parquet_row(uri, record[cfg.image_column], record.get(cfg.id_column or ""),
                              record.get(cfg.label_column or ""), cfg, names)
            if keep is None or row["id"] in keep:
                yield row


def iter_rows(cfg: SourceConfig) -> Iterator[dict]:
    """Rows ``{id, uri, label, bytes}`` of any source, in one process (Ray Data has its own readers)."""
    listing = scan(cfg)
    if listing.format == "parquet":
        yield from iter_parquet_rows(cfg, listing)
        return
    refs = list_images(cfg, listing)
    if listing.format != "tar":
        for ref in refs:
            yield {"id": ref.id, "uri": ref.uri, "label": ref.label, "bytes": storage.read_bytes(ref.uri)}
        return
    by_id = {r.id: r for r in refs}
    archives = tar_files(listing, cfg)
    for archive_uri in archives:
        for member, data in iter_tar_members(storage.read_bytes(archive_uri), cfg):
            ref = by_id.get(tar_member_id(archive_uri, member, archives, listing.root))
            if ref is not None:
                yield {"id": ref.id, "uri": ref.uri, "label": ref.label, "bytes": data}


def read_image_bytes(uri: str) -> bytes:
    """Bytes of one image ref URI: a file (local or s3://) or a tar member ``<archive>#<member>``.

    ``FileNotFoundError`` when the file or member is gone (a counted ``missing`` skip for callers);
    :class:`~dino_ray.storage.StorageError` when the store keeps failing (the stage fails)."""
    archive, sep, member = uri.rpartition("#")
    if not sep or not is_tar(archive):
        return storage.read_bytes(uri)
    fs, path = storage.filesystem(archive)

    def read() -> bytes:
        with fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            try:
                handle = tar.extractfile(member)
            except KeyError:
                raise FileNotFoundError(f"no member {member!r} in the archive {archive!r}") from None
            if handle is None:
                raise FileNotFoundError(f"{member!r} in {archive!r} is not a regular file")
            return handle.read()

    return storage.with_retries(read, f"reading {uri}")


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
