"""``dino-ray report OUTPUT_ROOT``: what a finished (or partly finished) run wrote, as one page.

Everything comes from the files the stages write (each stage's ``_manifest.json``, the eval stage's
``results.json``), never from memory or MLflow, so a report can be made on any machine that can read
the output root, long after the run. The README's result tables are this command's output, pasted
between ``<!-- report:NAME -->`` markers by ``--update-readme`` so no figure is typed by hand.
"""

from __future__ import annotations

import dataclasses
import platform
import re
from pathlib import Path
from typing import Any

from dino_ray import storage
from dino_ray.config.schema import STAGE_NAMES
from dino_ray.evals.report import format_value

MANIFEST = "_manifest.json"  # the pipeline's name for a completed stage's record
STAGE_ORDER = STAGE_NAMES

# (column title, key in an eval results row) for the headline table; missing keys show as "-".
RESULT_COLUMNS = (("kNN@20 top-1", "knn_k20_top1"), ("kNN@20 on pooled patches", "knn_avgpool_k20_top1"),
                  ("linear top-1", "linear_test_top1"), ("retrieval mAP", "retrieval_mAP"))
# Stage summary figures worth a column in the timings table, in this order, when a stage has them.
STAGE_FIGURES = ("pool_files", "pool_skipped", "duplicates_removed", "decontaminated", "kept",
                 "images", "steps", "train_images_per_s", "stage_start_to_first_step_s", "monitor_share",
                 "collapse_alarms")



def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{max(s, 0)} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"

@dataclasses.dataclass
class RunReport:
    output_root: str
    stages: dict[str, dict[str, Any]]  # stage name -> its manifest
    results: list[dict[str, Any]]  # eval rows (dataset, backbone, metrics...), empty without eval

    @property
    def total_seconds(self) -> float:
        return float(sum(m.get("seconds", 0.0) for m in self.stages.values()))


def load_report(output_root: str) -> RunReport:
    """Read the manifests under ``output_root``; fails with the path when there is nothing to report."""
    if not storage.exists(output_root):
        raise FileNotFoundError(f"{output_root}: no such output root")
    stages: dict[str, dict[str, Any]] = {}
    for child in storage.list_children(output_root):
        uri = storage.join(child, MANIFEST)
        if storage.exists(uri):
            manifest = storage.read_json(uri)
            stages[str(manifest.get("stage") or child.rstrip("/").rsplit("/", 1)[-1])] = manifest
    if not stages:
        raise FileNotFoundError(f"{output_root}: no completed stage (no */{MANIFEST}) to report on")
    ordered = {name: stages[name] for name in sorted(stages, key=_stage_rank)}
    results: list[dict[str, Any]] = []
    eval_results = ordered.get("eval", {}).get("outputs", {}).get("results")
    if eval_results and storage.exists(eval_results):
        results = list(storage.read_json(eval_results))
    return RunReport(output_root=output_root, stages=ordered, results=results)


def _stage_rank(name: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER), name)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float) and 0.0 <= value <= 1.0 and not float(value).is_integer():
        return f"{100 * value:.1f} %"
    return format_value(value)


def results_table(report: RunReport) -> str:
    """One row per (dataset, backbone): the headline metrics of the eval stage."""
    if not report.results:
        return "(no eval results under this output root)"
    datasets = {r.get("dataset") for r in report.results}
    header = (["dataset"] if len(datasets) > 1 else []) + ["backbone"] + [t for t, _ in RESULT_COLUMNS]
    rows = [([r.get("dataset")] if len(datasets) > 1 else []) + [r.get("backbone")] +
            [r.get(key) for _, key in RESULT_COLUMNS] for r in report.results]
    return _table(header, rows)


def verdict(report: RunReport, metric: str = "knn_k20_top1") -> str:
    """One plain sentence per dataset: does the best trained backbone beat the baselines?"""
    lines = []
    for dataset in dict.fromkeys(r.get("dataset") for r in report.results):
        rows = [r for r in report.results if r.get("dataset") == dataset and r.get(metric) is not None]
        trained = [r for r in rows if r.get("backbone") not in ("pixels", "random")]
        if not trained:
            continue
        best = max(trained, key=lambda r: r[metric])
        parts = []
        for name, label in (("pixels", "raw pixels"), ("random", "a randomly initialised ViT")):
            base = next((r for r in rows if r.get("backbone") == name), None)
            if base is None:
                continue
            value = base[metric]
            if name == "random":  # fair: a fresh ViT's CLS is nearly constant, its pooled patches are not
                value = max(value, base.get(metric.replace("knn_", "knn_avgpool_")) or 0.0)
                label += " (the better of its CLS and pooled patches)"
            gap = 100 * (best[metric] - value)
            parts.append(f"{'beats' if gap > 0 else 'loses to'} {label} by {abs(gap):.1f} points "
                         f"({_cell(best[metric])} vs {_cell(value)})")
        if parts:
            lines.append(f"{dataset}: the best trained backbone ({best.get('backbone')}) " + " and ".join(parts)
                         + f" in {metric}." + _why_pixels_win(rows, best, metric))
    return "\n".join(lines)


def _why_pixels_win(rows: list[dict[str, Any]], best: dict[str, Any], metric: str,
                    linear: str = "linear_test_top1") -> str:
    """When raw pixels win the neighbour metric, say what the other figures show about why (or nothing)."""
    pixels = next((r for r in rows if r.get("backbone") == "pixels"), None)
    if pixels is None or best[metric] >= pixels[metric]:
        return ""
    if best.get(linear) is not None and pixels.get(linear) is not None and best[linear] > pixels[linear]:
        return (f" Why: its linear probe beats raw pixels' ({_cell(best[linear])} vs {_cell(pixels[linear])}), so"
                " the features hold the class information, but their cosine neighbourhoods do not show it yet;"
                " longer training moves the neighbours (docs/small-compute.md).")
    return (" Why: raw pixels win when a dataset's images barely vary in position, scale and colour, so pixel"
            " distances already separate its classes (as in small centred digits); a backbone trained for"
            " minutes on CPU has learned less than that. Self-supervised features are made to ignore crops and"
            " colour changes, which pays off on photographs with longer training (docs/small-compute.md).")


def stages_table(report: RunReport) -> str:
    """Wall-clock seconds and the key counts of every completed stage."""
    figures = [f for f in STAGE_FIGURES if any(f in m.get("summary", {}) for m in report.stages.values())]
    rows = [[name, format_duration(m.get("seconds", 0.0))] + [m.get("summary", {}).get(f) for f in figures]
            for name, m in report.stages.items()]
    rows.append(["**total**", format_duration(report.total_seconds)] + [None] * len(figures))
    return _table(["stage", "wall-clock"] + [f.replace("_", " ") for f in figures], rows)


def machine_line() -> str:
    """Where the figures were measured: timings depend on it, accuracies should not (see README)."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for pkg in ("torch", "ray", "deepspeed"):
        try:
            from importlib import metadata

            versions.append(f"{pkg} {metadata.version(pkg)}")
        except Exception:  # noqa: BLE001 - a missing package is simply not named
            continue
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, " + ", ".join(versions)


def compare(report: RunReport, other: RunReport) -> str:
    """How far a second run of the same job landed from this one: curation counts and every eval metric.

    For the reproducibility claim in the README: same seed, same machine, two output roots."""
    lines = [f"Compared with `{other.output_root}`:"]
    counts = ("duplicates_removed", "decontaminated", "kept")
    a, b = report.stages.get("curate", {}).get("summary", {}), other.stages.get("curate", {}).get("summary", {})
    if a and b:
        same = all(a.get(k) == b.get(k) for k in counts)
        lines.append(f"- curation counts ({', '.join(counts)}): "
                     + ("identical" if same else ", ".join(f"{k} {a.get(k)} vs {b.get(k)}" for k in counts)))
    theirs = {(r.get("dataset"), r.get("backbone")): r for r in other.results}
    for prefix, label in (("knn_", "kNN"), ("linear_test_", "linear probe"), ("retrieval_", "retrieval")):
        worst, where = 0.0, ""
        for row in report.results:
            twin = theirs.get((row.get("dataset"), row.get("backbone")), {})
            for key, value in row.items():
                if key.startswith(prefix) and isinstance(value, (int, float)) and isinstance(twin.get(key), (int, float)):
                    gap = abs(float(value) - float(twin[key]))
                    if gap > worst:
                        worst, where = gap, f" ({row.get('backbone')} {key}: {_cell(value)} vs {_cell(twin[key])})"
        lines.append(f"- {label} metrics: " + (f"largest difference {100 * worst:.2f} points{where}" if worst
                                                else "identical"))
    return "\n".join(lines)


def render(report: RunReport, other: RunReport | None = None) -> str:
    return "\n\n".join([
        f"Output root `{report.output_root}`; measured on: {machine_line()}.",
        results_table(report),
        *([verdict(report)] if verdict(report) else []),
        stages_table(report),
        *([compare(report, other)] if other is not None else []),
    ]) + "\n"


def update_readme(readme: str | Path, name: str, text: str) -> None:
    """Replace what stands between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``."""
    path = Path(readme)
    content = path.read_text()
    start, end = f"<!-- report:{name} -->", f"<!-- /report:{name} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(content):
        raise ValueError(f"{path}: no '{start} ... {end}' markers to put the report between")
    path.write_text(pattern.sub(lambda _: f"{start}\n{text.rstrip()}\n{end}", content, count=1))
