"""Reading a RayJob entrypoint as the dino-ray command it runs: which job YAML, which overrides."""

from __future__ import annotations

import dataclasses
import shlex

# The command prefixes that run a job YAML; anything else is not a dino-ray stage.
JOB_RUNNERS = (("dino-ray", "run"), ("python", "-m", "dino_ray.cli", "run"),
               ("python3", "-m", "dino_ray.cli", "run"))


@dataclasses.dataclass(frozen=True)
class JobCommand:
    """A RayJob entrypoint that runs a dino-ray job YAML: ``dino-ray run jobs/x.yaml k=v ...``."""

    job_yaml: str
    overrides: list[str]
    direct: bool  # ``jobs/x.yaml k=v``: the YAML itself is executed through its shebang

    @property
    def output_root(self) -> str | None:
        """The last ``output_root=`` override (later overrides win, as in the CLI), or None."""
        roots = [o.split("=", 1)[1] for o in self.overrides if o.startswith("output_root=")]
        return roots[-1] if roots else None


def parse_entrypoint(entrypoint: str) -> JobCommand:
    """Split a RayJob entrypoint into its job YAML and ``key=value`` overrides.

    Accepted: ``dino-ray run jobs/x.yaml k=v ...``, ``python -m dino_ray.cli run jobs/x.yaml ...``
    and ``jobs/x.yaml ...`` (an executable job YAML with a shebang). Raises ValueError otherwise."""
    try:
        argv = shlex.split(entrypoint)
    except ValueError as exc:
        raise ValueError(f"entrypoint {entrypoint!r} is not a valid shell command: {exc}") from exc
    for prefix in JOB_RUNNERS:
        if tuple(argv[: len(prefix)]) == prefix and len(argv) > len(prefix):
            return JobCommand(argv[len(prefix)], argv[len(prefix) + 1:], direct=False)
    if argv and argv[0].endswith((".yaml", ".yml")):
        return JobCommand(argv[0], argv[1:], direct=True)
    raise ValueError(f"entrypoint {entrypoint!r} must be `dino-ray run jobs/<name>.yaml key=value ...` "
                     "or `jobs/<name>.yaml key=value ...`")
