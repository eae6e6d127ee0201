"""How one image collection is read: ``SourceConfig``, the ``source`` of every stage's data section.

The dataclass and its static checks, kept apart from the listing and reading code of ``sources`` (which
imports it, so ``from dino_ray.data.sources import SourceConfig`` keeps working).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from dino_ray import storage
from dino_ray.config.fields import Checked, bounded

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
Format = Literal["auto", "folder", "imagefolder", "parquet", "tar", "manifest"]
FORMATS: tuple[str, ...] = get_args(Format)


@dataclass
class SourceConfig(Checked):
    """One image collection and how to read it."""

    # Local folder, s3://bucket/prefix, a .parquet file or folder of them, a .tar archive (or a
    # folder of .tar shards), or a curated manifest (parquet with a column of image URIs). Empty in a
    # training stage's data: the upstream stage's output.
    uri: str = bounded(uri=True, input="optional")
    # "auto" infers: image files present -> "folder" ("imagefolder" with labels_from_folders);
    # else parquet -> "manifest" if the schema has ``uri_column`` but not ``image_column``, else
    # "parquet"; else .tar archives -> "tar".
    format: Format = "auto"
    # Parquet: column with encoded image bytes (binary, or a struct with a "bytes" field as written
    # by Hugging Face datasets).
    image_column: str = "image"
    # Parquet / manifest: integer or string class column; None = no labels (-1).
    label_column: str | None = None
    # Parquet / manifest: column with stable row ids; None = ``<file>#<row>`` / the image URI.
    id_column: str | None = None
    # Manifest: column with image URIs (absolute, s3://, or relative to the manifest's folder).
    uri_column: str = "uri"
    # File name extensions that count as images (case-insensitive) for folders and tar archives.
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    # Deterministic subset size (see module doc); None = everything.
    max_images: int | None = bounded(None, ge=1)
    subset_seed: int = 0
    # Folder / tar: class = name of the file's parent folder (root/<class>/<file>). Implied by
    # format="imagefolder".
    labels_from_folders: bool = False

    def validate(self, check_exists: bool = False) -> "SourceConfig":
        """Static checks; ``check_exists`` also requires ``uri`` to be set and to exist (I/O).

        Per-field rules (``format``, ``max_images``) are declared on the fields, checked on construction.
        Config loading validates without I/O: a job file may name a bucket only the cluster can
        reach, or leave ``uri`` empty for the pipeline to fill in with an upstream stage's output.
        """
        if not isinstance(self.uri, str):
            raise ValueError(f"SourceConfig.uri must be a string, got {self.uri!r}")
        if check_exists and not self.uri:
            raise ValueError("SourceConfig.uri is empty: set it to a folder, s3:// prefix, parquet or tar file")
        if check_exists and not storage.exists(self.uri):
            raise FileNotFoundError(f"SourceConfig.uri={self.uri!r} does not exist")
        if not self.extensions:
            raise ValueError("SourceConfig.extensions must not be empty")
        return self

    @property
    def wants_folder_labels(self) -> bool:
        return self.labels_from_folders or self.format == "imagefolder"
