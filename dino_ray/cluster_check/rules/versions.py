"""One image and one Ray version everywhere: manifests, image tag, Dockerfile and pyproject agree.

A Ray head and workers of different versions refuse to connect, and an image tag that does not
name its Ray version makes a mismatch invisible until the pods start.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

from packaging.specifiers import SpecifierSet

from ..images import image_repo_tag
from ..layout import Layout
from ..manifests import Manifest
from ..pyproject import ProjectFacts
from ..ray_spec import all_groups, cluster_specs, container_path
from ..report import Problem, source_name
from ..schema import CRD_FILES
from ..tree import path_str, walk
from .agreement import disagreements

TAG_SCHEME = "<project version>-ray<Ray version>-<7 to 40 hex digits of the commit>"


def _ray_images(m: Manifest) -> Iterator[tuple[Manifest, str, str]]:
    for group in all_groups(m):
        yield m, container_path(group, "image"), str(group.ray_container.get("image", ""))


def _other_image_problems(manifests: list[Manifest], image: str) -> list[Problem]:
    """Other workloads running the project image (the MLflow server) must use the same tag."""
    repo = image_repo_tag(image)[0]
    problems = []
    for m in manifests:
        if m.kind in CRD_FILES:
            continue
        for path, node in walk(m.doc):
            if path and path[-1] == "image" and isinstance(node, str):
                if image_repo_tag(node)[0] == repo and node != image:
                    problems.append(m.problem(path_str(path), f"image {node!r} differs from the Ray image {image!r}"))
    return problems


def _tag_problems(m: Manifest, image: str, ray_version: str, project: ProjectFacts) -> list[Problem]:
    """The tag scheme ``<project version>-ray<Ray version>-<commit>`` ties the image to pyproject, the
    cluster and the code: a new commit is a new tag, so no node runs a stale image cached under an old one."""
    tag = image_repo_tag(image)[1]
    problems = []
    if not re.search(rf"(^|[-_.])ray{re.escape(ray_version)}($|[-_.])", tag):
        problems.append(m.problem("image", f"image tag {tag!r} must name the Ray version as 'ray{ray_version}' "
                                           f"(tag scheme {TAG_SCHEME})"))
    if project.version and not tag.startswith(f"{project.version}-"):
        problems.append(m.problem("image", f"image tag {tag!r} must start with the project version "
                                           f"{project.version!r} from pyproject.toml"))
    if not problems and not re.search(rf"-ray{re.escape(ray_version)}-[0-9a-f]{{7,40}}$", tag):
        problems.append(m.problem("image", f"image tag {tag!r} must end in the git commit of the code it holds "
                                           f"(tag scheme {TAG_SCHEME}); cluster/build.sh builds and pins it"))
    return problems


def _ray_requirement_problems(ray_version: str, project: ProjectFacts, layout: Layout) -> list[Problem]:
    source = source_name(layout.pyproject)
    if project.ray is None:
        return [Problem(source, "project.dependencies", "no ray requirement")]
    if not project.ray.specifier.contains(ray_version, prereleases=True):
        return [Problem(source, "project.dependencies", f"ray requirement {str(project.ray)!r} excludes "
                                                        f"rayVersion {ray_version} used by the cluster")]
    return []


def _dockerfile_ray_problems(docker: dict[str, Any], ray_version: str, layout: Layout) -> list[Problem]:
    return [Problem(source_name(layout.dockerfile), f"line {line}",
                    f"Ray {v} in the Dockerfile differs from rayVersion {ray_version}")
            for line, v in docker["ray_versions"] if v != ray_version]


def version_problems(manifests: list[Manifest], layout: Layout, docker: dict[str, Any],
                     project: ProjectFacts) -> list[Problem]:
    """The first rayVersion and Ray image found are the reference every other file is compared with."""
    versions = [(m, path_str(p + ("rayVersion",)), str(c.get("rayVersion")))
                for m in manifests for p, c in cluster_specs(m) if c.get("rayVersion")]
    images = [found for m in manifests for found in _ray_images(m)]
    if not versions or not images:
        return []
    ray_version, (image_m, _, image) = versions[0][2], images[0]
    problems = disagreements(versions, lambda v, ref, ref_file: f"rayVersion {v!r} differs from {ref!r} in {ref_file}")
    problems += disagreements(images, lambda img, ref, ref_file: f"image {img!r} differs from {ref!r} used in "
                                                                 f"{ref_file}: every Ray container must run the one "
                                                                 "project image")
    problems += _other_image_problems(manifests, image)
    problems += _tag_problems(image_m, image, ray_version, project)
    problems += _ray_requirement_problems(ray_version, project, layout)
    return problems + _dockerfile_ray_problems(docker, ray_version, layout)


def python_problems(layout: Layout, docker: dict[str, Any], project: ProjectFacts) -> list[Problem]:
    """The base image's Python (``-py311`` in its tag) must satisfy ``requires-python``."""
    match = re.search(r"-py(\d)(\d+)\b", image_repo_tag(docker["base"])[1])
    if not match:
        return []
    python = f"{match.group(1)}.{match.group(2)}"
    spec = SpecifierSet(project.requires_python or "")
    if python not in spec:
        return [Problem(source_name(layout.dockerfile), "FROM", f"base image Python {python} is outside "
                                                                f"requires-python {str(spec)!r}")]
    return []


def workdir_problems(manifests: list[Manifest], workdir: str | None) -> list[Problem]:
    """A pod's workingDir other than the image WORKDIR would break the relative jobs/ entrypoints."""
    problems = []
    for m in manifests:
        for group in all_groups(m):
            wd = group.ray_container.get("workingDir")
            if wd is not None and wd != workdir:
                problems.append(m.problem(container_path(group, "workingDir"), f"{wd!r} differs from the image "
                                                                              f"WORKDIR {workdir!r}"))
    return problems
