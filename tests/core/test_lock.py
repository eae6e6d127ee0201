"""The lock is what we test and ship: complete, consistent with pyproject.toml, used everywhere."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from testlib import REPO, in_ci

LOCKS = {name: REPO / "requirements" / f"{name}.lock" for name in ("cpu", "gpu")}


def _pins(path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)", line)
        assert match, f"{path.name}: {line!r} is not an exact pin"
        pins[canonicalize_name(match.group(1))] = match.group(3)
    return pins


def _project_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


@pytest.mark.parametrize("lock, extras", [("cpu", ("dev",)), ("gpu", ())])
def test_lock_satisfies_every_pyproject_requirement(lock, extras):
    pins = _pins(LOCKS[lock])
    for req in _project_requirements(extras):
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock}.lock does not pin {req.name} (pyproject.toml asks for {req})"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (
            f"{lock}.lock pins {req.name}=={pins[name]}, outside pyproject.toml's {req}")


def test_locks_agree_with_each_other_and_the_image():
    cpu, gpu = _pins(LOCKS["cpu"]), _pins(LOCKS["gpu"])
    assert cpu["torch"] == gpu["torch"] + "+cpu", "CPU and GPU locks must pin the same torch release"
    for name in ("ray", "deepspeed", "mlflow", "s3fs", "faiss-cpu", "numpy", "pyarrow"):
        assert cpu[name] == gpu[name], f"{name}: cpu.lock {cpu[name]} vs gpu.lock {gpu[name]}"
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    ray_arg = re.search(r"ARG RAY_VERSION=(\S+)", dockerfile).group(1)
    assert gpu["ray"] == ray_arg, f"gpu.lock pins ray {gpu['ray']}, the image's base is Ray {ray_arg}"
    assert "requirements/gpu.lock" in dockerfile
    assert "requirements/cpu.lock" in (REPO / "scripts" / "setup.sh").read_text()


def test_installed_environment_is_the_lock():
    """Under CI the venv is new and built from cpu.lock, so every pinned version must be installed."""
    if not in_ci():
        pytest.skip("checked under CI=true, where the venv is built from requirements/cpu.lock")
    wrong = []
    for name, version in _pins(LOCKS["cpu"]).items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong.append(f"{name}: locked {version}, installed {installed}")
    assert not wrong, "the environment differs from requirements/cpu.lock:\n" + "\n".join(wrong)
