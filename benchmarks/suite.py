"""Run the speed benchmarks, save each one's JSON in `benchmarks/results/`, and render the README's table.

    python benchmarks/suite.py [--quick] [--only ssl_step eval_sweep] [--peer lightly --peer-python PY]
    python benchmarks/suite.py --render-only --update-readme benchmarks    # table from the saved results

Each benchmark's last stdout line is its JSON (`ours`, `baseline`, `ratio`, a `headline` that says what
is compared); the table is made from those files only, so no figure in it is typed by hand. The quality
(`quality.py`) and memory-plan (`memory_plan.py`) benchmarks have README sections of their own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# name -> (extra args, the headline for results saved before benchmarks carried one)
SUITE = {
    "vit_forward": ([], "vit_small/14 forward at 224 px, fp32: ours vs transformers' Dinov2Model (sdpa), same weights"),
    "ssl_step": ([], None),
    "multicrop": ([], "2x224 + 8x98 crops + iBOT masks per image, images/s per core: ours vs a PIL DataLoader"),
    "train_step": ([], None),
    "eval_sweep": ([], None),
    "curate": ([], None),
}


def run(name: str, quick: bool, peer: list[str]) -> dict:
    cmd = [sys.executable, str(HERE / f"{name}.py"), *(["--quick"] if quick else []),
           *(peer if name == "train_step" else [])]
    print(f"[suite] {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"[suite] {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.setdefault("details", {})["quick"] = quick
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:,.3g}" if isinstance(value, float) and value < 100 else f"{value:,.0f}" if isinstance(
        value, (int, float)) else str(value)


def table(results: dict[str, dict]) -> str:
    lines = ["| benchmark | what is compared | ours | baseline | ratio | unit |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        headline = r.get("headline") or SUITE[name][1] or r.get("name", name)
        quick = " (`--quick`)" if r.get("details", {}).get("quick") else ""
        lines.append(f"| `{name}.py`{quick} | {headline} | {fmt(r.get('ours'))} | {fmt(r.get('baseline'))} | "
                     f"{fmt(r.get('ratio'))} | {r.get('unit', '')} |")
    scaling = results.get("curate", {}).get("details", {}).get("scaling") or []
    if scaling:  # how curation grows with the pool (IVF index forced at every size)
        lines += ["", "`curate.py` scaling (IVF index at every size): " + "; ".join(
            f"{s['n']:,} embeddings in {s['wall_s']} s, {s['max_rss_mb'] / 1024:.1f} GB peak RSS, graph recall@64 "
            f"{s.get('knn_graph_recall_at_64')}" for s in scaling) + "."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="+", choices=list(SUITE), help="run these; the table uses saved results for the rest")
    p.add_argument("--render-only", action="store_true", help="run nothing, render the saved results")
    p.add_argument("--peer", choices=["lightly"], default=None)
    p.add_argument("--peer-python", default="")
    p.add_argument("--update-readme", metavar="NAME")
    args = p.parse_args()
    RESULTS.mkdir(exist_ok=True)
    peer = ["--peer", args.peer, "--peer-python", args.peer_python] if args.peer else []
    results = {}
    for name in SUITE:
        saved = RESULTS / f"{name}.json"
        if not args.render_only and (args.only is None or name in args.only):
            results[name] = run(name, args.quick, peer)
        elif saved.exists():
            results[name] = json.loads(saved.read_text())
    text = table(results)
    print(text)
    if args.update_readme:
        sys.path.insert(0, str(HERE.parent))
        from dino_ray.run_report import update_readme

        update_readme(HERE.parent / "README.md", args.update_readme, text)


if __name__ == "__main__":
    main()
