"""Put the bundled demo data where cluster jobs can read it (a bucket), and name the overrides that read it.

Why this exists: the shipped job YAMLs inherit ``jobs/presets/demo.yaml``, whose data URIs are local
folders under ``outputs/demo-data`` (what ``scripts/demo.sh`` writes on a laptop). A pod has no such
folder: the image leaves ``outputs/`` out (``.dockerignore``), every RayJob runs on a fresh cluster, and
``ray job submit`` does not upload git-ignored folders. So the data is written to S3 once, by this script
(``cluster/jobs/prepare-demo-data.yaml`` runs it inside the cluster), and every RayJob passes the
overrides of :func:`data_overrides`, which move the preset's data URIs there.

    python cluster/prepare_demo_data.py s3://BUCKET/dino-ray/demo-data                  # write it
    python cluster/prepare_demo_data.py --print-overrides s3://BUCKET/dino-ray/demo-data  # the overrides

Idempotent, and safe to run twice at once: the ``.complete`` marker is written last, after every image,
and a destination holding it is left alone; an interrupted run leaves no marker, so the next run writes
everything again (the fixed seed writes the same bytes).
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
from pathlib import Path
from typing import Any

import yaml

from dino_ray import demo_data, storage
from dino_ray.config.loader import load_raw

REPO = Path(__file__).resolve().parent.parent  # /app in the image, the checkout on a laptop
DEMO_PRESET = REPO / "jobs" / "presets" / "demo.yaml"
LOCAL_ROOT = "outputs/demo-data"  # where the preset expects the data
MARKER = ".complete"


def prepare(uri: str, seed: int = 0) -> bool:
    """Write the demo data under ``uri`` (``s3://...`` or a local folder); False if it was already complete."""
    uri = uri.rstrip("/")
    marker = storage.join(uri, MARKER)
    if storage.exists(marker):
        return False
    with tempfile.TemporaryDirectory(prefix="dino-ray-demo-") as tmp:
        local = demo_data.prepare(Path(tmp) / "demo-data", seed=seed)
        (local / MARKER).unlink(missing_ok=True)  # the destination gets its own marker, after the images
        storage.upload_dir(str(local), uri)
    storage.write_bytes(marker, b"")
    return True


def _mentions_local_root(node: Any) -> bool:
    if isinstance(node, str):
        return node == LOCAL_ROOT or node.startswith(LOCAL_ROOT + "/")
    if isinstance(node, dict):
        return any(map(_mentions_local_root, node.values()))
    if isinstance(node, list):
        return any(map(_mentions_local_root, node))
    return False


def _moved(node: Any, root: str) -> Any:
    if isinstance(node, str) and _mentions_local_root(node):
        return root + node[len(LOCAL_ROOT):]
    if isinstance(node, dict):
        return {k: _moved(v, root) for k, v in node.items()}
    if isinstance(node, list):
        return [_moved(v, root) for v in node]
    return node


def _flow(node: Any) -> str:
    """YAML flow style with no quotes (``[{uri: s3://b/x, labels_from_folders: true}]``): the override then
    survives the shells between a RayJob's entrypoint and the driver (KubeRay's submitter runs it through
    bash, ``ray job submit`` re-quotes it, the head runs it through sh) inside one pair of double quotes."""
    if isinstance(node, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in node.items()) + "}"
    if isinstance(node, list):
        return "[" + ", ".join(map(_flow, node)) + "]"
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


def _overrides(node: Any, path: tuple[str, ...], root: str, out: list[str]) -> None:
    """Descend mappings to the values naming the local root; a list holding one is replaced whole (an
    override cannot index into a list)."""
    if isinstance(node, dict):
        for key, value in node.items():
            _overrides(value, path + (str(key),), root, out)
    elif _mentions_local_root(node):
        moved = _moved(node, root)
        text = _flow(moved)
        if yaml.safe_load(text) != moved:  # e.g. a comma in a URI: refuse rather than pass a wrong value
            raise ValueError(f"cannot write {'.'.join(path)}={moved!r} as an unquoted YAML override")
        out.append(f"{'.'.join(path)}={text}")


def data_overrides(uri: str, preset: Path = DEMO_PRESET) -> list[str]:
    """The ``key.path=value`` overrides that move every data URI of the demo preset from ``outputs/demo-data``
    to ``uri``; the same for every job of a run, so each stage's config (and so its skip key) agrees."""
    raw, _ = load_raw(preset)
    out: list[str] = []
    _overrides(raw, (), uri.rstrip("/"), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python cluster/prepare_demo_data.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("uri", help="where the data goes: s3://BUCKET/PREFIX (or a local folder)")
    parser.add_argument("--print-overrides", action="store_true",
                        help="write nothing; print the job overrides that read the data from URI, shell-quoted")
    args = parser.parse_args(argv)
    if args.print_overrides:
        print(shlex.join(data_overrides(args.uri)))
    elif prepare(args.uri):
        print(f"demo data written to {args.uri}")
    else:
        print(f"demo data already complete at {args.uri} ({MARKER} found); nothing written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
