"""Loading the YAML documents of the checked directory, each tagged with where it came from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from .report import Problem, source_name

YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader reads the 1.4 MB CRDs ~5x faster


# What `kubectl apply -f DIR` reads from a directory; anything else there is never applied by mistake.
KUBECTL_SUFFIXES = (".yaml", ".yml", ".json")
# Checked like a manifest but never applied from a directory (kubectl skips the suffix): Secret templates.
TEMPLATE_SUFFIX = ".yaml.template"


def display_name(path: Path, root: Path | None) -> str:
    """``cluster/jobs/rayjob-eval.yaml``: a file as the README and the kubectl commands name it."""
    if root is not None and path.is_relative_to(root.parent):
        return path.relative_to(root.parent).as_posix()
    return source_name(path)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """One YAML document of a file in the checked directory (or a folder below it)."""

    path: Path
    index: int
    doc: dict
    root: Path | None = None  # the checked directory; names the file relative to its parent

    @property
    def source(self) -> str:
        return display_name(self.path, self.root)

    @property
    def kubectl_applies_with_directory(self) -> bool:
        """True when ``kubectl apply -f <checked dir>/`` (not recursive) would apply this document."""
        return self.path.name.endswith(KUBECTL_SUFFIXES) and (self.root is None or self.path.parent == self.root)

    @property
    def kind(self) -> str:
        return str(self.doc.get("kind", ""))

    @property
    def name(self) -> str:
        meta = self.doc.get("metadata") or {}
        return str(meta.get("name") or meta.get("generateName") or "?")

    @property
    def spec(self) -> dict:
        spec = self.doc.get("spec")
        return spec if isinstance(spec, dict) else {}

    def problem(self, where: str, message: str) -> Problem:
        """A finding located at ``file[document index] Kind/name``, so a multi-document file stays readable."""
        return Problem(f"{self.source}[{self.index}] {self.kind}/{self.name}", where, message)


def manifest_files(cluster_dir: Path) -> list[Path]:
    """The manifest files under ``cluster_dir``, its sub-folders (``jobs/``) and the Secret templates included;
    sorted by path, so the output is stable run to run."""
    root = Path(cluster_dir)
    suffixes = KUBECTL_SUFFIXES + (TEMPLATE_SUFFIX,)
    return sorted((p for p in root.rglob("*") if p.is_file() and p.name.endswith(suffixes)),
                  key=lambda p: p.relative_to(root).as_posix())


def load_manifests(cluster_dir: Path) -> tuple[list[Manifest], list[Problem]]:
    """Every YAML document of :func:`manifest_files`; parse errors as problems."""
    manifests, problems = [], []
    root = Path(cluster_dir).resolve()
    for path in manifest_files(root):
        try:
            docs = list(yaml.load_all(path.read_text(), Loader=YAML_LOADER))
        except yaml.YAMLError as exc:
            problems.append(Problem(display_name(path, root), "", f"not valid YAML: {exc}"))
            continue
        for index, doc in enumerate(d for d in docs if d is not None):
            if not isinstance(doc, dict):
                problems.append(Problem(f"{display_name(path, root)}[{index}]", "", "a manifest must be a mapping"))
                continue
            manifests.append(Manifest(path, index, doc, root))
    return manifests, problems
