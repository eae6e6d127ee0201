"""Curation core at scale: dedup + hierarchical k-means + balanced sampling on synthetic embeddings.

Two measurements, each in its own subprocess so that peak RSS (faiss allocates outside Python,
tracemalloc cannot see it) belongs to one run:
* ours vs baseline at the smallest size, interleaved in one process (the headline): ours = the
  product at its default settings (``CurationConfig()``), with the kNN graph's recall against the
  exact graph and the share of planted copies it resolves; baseline = the straightforward exact
  approach, IndexFlatIP k=64 graph + connected components + flat faiss k-means over all points +
  flat water-filling sample. Throughput in embeddings/s;
* scaling: our pipeline at each size (100k and 1M; --quick: 20k and 100k), with the IVF index
  forced at every size so the growth with N compares like with like (the defaults switch to IVF at
  200k rows).

Data: unit vectors around 2,000 fine centres in 40 groups, Zipf-skewed sizes (noise 0.06 per dim
as in notes/curation.md Sec. 6) plus 5% planted near-copies (cosine ~0.98) of random pool images.
Balance is scored against the known fine centres: the share of the 10% most populous ones in
the pool versus in the sample.
The last stdout line is one JSON object.

``--distributed`` measures the Ray path instead (`dino_ray.curation.distributed_plan`): a clustered
pool of ``--pool`` x ``--dim`` embeddings with planted copies is written as parquet shards chunk by chunk
(never whole in one process), curated by ``--workers`` Ray workers at the product's defaults, and the
driver's peak RSS (getrusage of the driver process; Ray workers are separate processes) and images/s
are reported, with the recall of planted copies; on a ``--subset`` pool both paths run, for images/s,
driver RSS, recall and the k-means objective side by side. Each ``--pool`` size is one entry of
``details.distributed.runs`` in ``benchmarks/results/curate.json`` (other sizes are kept), and
``--update-readme curate-distributed`` renders them between the README's markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIM = 384
N_GROUPS = 40  # coarse concepts, each with CENTRES_PER_GROUP fine ones: a real hierarchy
CENTRES_PER_GROUP = 50
GROUP_SPREAD = 0.05  # fine centres sit at cosine ~0.7 to their group centre
SPREAD = 0.06  # per-dim image noise around a fine centre (notes/curation.md Sec. 6)
DUP_FRACTION = 0.05
DUP_NOISE = 0.01  # planted copies at cosine ~0.98
CHUNK = 100_000


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_pool(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n unit vectors, the last DUP_FRACTION near-copies of earlier ones.

    Fine centres get Zipf weights (1/rank, in random order across groups), so a few concepts
    dominate the pool as on the web. Returns (x, fine-centre label per row, copy pairs [P, 2]).
    """
    rng = np.random.default_rng(seed)
    groups = _unit(rng.standard_normal((N_GROUPS, DIM), dtype=np.float32))
    n_centres = N_GROUPS * CENTRES_PER_GROUP
    centres = _unit(np.repeat(groups, CENTRES_PER_GROUP, axis=0)
                    + GROUP_SPREAD * rng.standard_normal((n_centres, DIM), dtype=np.float32))
    weights = 1.0 / rng.permutation(np.arange(1, n_centres + 1))
    n_dup = int(n * DUP_FRACTION)
    n_base = n - n_dup
    labels = rng.choice(n_centres, size=n_base, p=weights / weights.sum())
    x = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n_base, CHUNK):
        stop = min(start + CHUNK, n_base)
        noise = SPREAD * rng.standard_normal((stop - start, DIM), dtype=np.float32)
        x[start:stop] = _unit(centres[labels[start:stop]] + noise)
    originals = np.sort(rng.choice(n_base, size=n_dup, replace=False))
    for start in range(0, n_dup, CHUNK):
        stop = min(start + CHUNK, n_dup)
        noise = DUP_NOISE * rng.standard_normal((stop - start, DIM), dtype=np.float32)
        x[n_base + start:n_base + stop] = _unit(x[originals[start:stop]] + noise)
    pairs = np.stack([originals, np.arange(n_base, n)], axis=1)
    return x, np.r_[labels, labels[originals]], pairs


def _head_centres(labels: np.ndarray, n_centres: int) -> np.ndarray:
    """The 10% most populous fine centres of the whole pool."""
    return np.argsort(-np.bincount(labels, minlength=n_centres))[: n_centres // 10]


def ours_config(force_ivf: bool):
    """The product's defaults (``CurationConfig()``: exact index below 200k rows, IVF above); the scaling
    runs force IVF at every size so the growth with N compares like with like."""
    from dino_ray.curation.config import CurationConfig, IndexConfig

    return CurationConfig(index=IndexConfig(exact_threshold=1)) if force_ivf else CurationConfig()


def run_ours(x: np.ndarray, labels: np.ndarray, pairs: np.ndarray, seed: int, force_ivf: bool) -> dict:
    from dino_ray.curation.plan import curate_arrays

    start, cpu_start = time.perf_counter(), time.process_time()
    result = curate_arrays(x, ours_config(force_ivf), seed=seed)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    s = result.summary
    clean = result.cluster_ids[:, 0] >= 0
    head = _head_centres(labels, N_GROUPS * CENTRES_PER_GROUP)
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "embeddings_per_s": round(x.shape[0] / wall, 1),
        "timings_s": s["timings_s"],
        "index_type": s["index_type"],
        "index_nlist": s.get("index_nlist"),
        "index_nprobe": s.get("index_nprobe"),
        "ivf_search_recall_at_64": round(s["index_recall"], 4),
        "knn_graph_recall_at_64": round(s["graph_recall"], 4),
        "n_duplicates_removed": s["n_duplicates_removed"],
        "n_planted_duplicates": int(pairs.shape[0]),
        "planted_pairs_resolved": round(float(np.mean(~(clean[pairs[:, 0]] & clean[pairs[:, 1]]))), 4),
        "n_kept": s["n_kept"],
        "head_10pct_concepts_share_pool": round(float(np.isin(labels, head).mean()), 4),
        "head_10pct_concepts_share_sample": round(float(np.isin(labels[result.keep], head).mean()), 4),
        "removed": np.flatnonzero(~clean),
    }


def run_baseline(x: np.ndarray, seed: int) -> dict:
    """Exact graph, components, one flat k-means on every point, flat balanced sample."""
    import faiss

    from dino_ray.curation.config import ClusteringConfig
    from dino_ray.curation.dedup import connected_components
    from dino_ray.curation.knn_graph import knn_edges
    from dino_ray.curation.sampling import balanced_sample

    cfg = ours_config(force_ivf=False)
    start, cpu_start = time.perf_counter(), time.process_time()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    edges = knn_edges(index, x, cfg.dedup.k, cfg.dedup.threshold)
    component = connected_components(x.shape[0], edges.src, edges.dst)
    keep = np.unique(component, return_index=True)[1]
    k = ClusteringConfig().n_clusters[0]
    km = faiss.Kmeans(x.shape[1], k, niter=cfg.clustering.n_iter, seed=seed, max_points_per_centroid=x.shape[0])
    km.train(x[keep])
    _, assignment = km.index.search(x[keep], 1)
    target = round(cfg.sampling.target_fraction * keep.size)
    balanced_sample(assignment[:, 0], target, strategy="flat", seed=seed)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    removed = np.setdiff1d(np.arange(x.shape[0]), keep)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "embeddings_per_s": round(x.shape[0] / wall, 1),
            "removed": removed}


def worker(mode: str, n: int, threads: int, rounds: int) -> dict:
    import faiss

    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    x, labels, pairs = synthetic_pool(n, seed=0)
    out = {"n": n, "data_gen_s": round(time.perf_counter() - t0, 2)}
    if mode == "scale":
        ours = run_ours(x, labels, pairs, seed=0, force_ivf=True)
        ours.pop("removed")
        out.update(ours)
    else:
        ours_runs, base_runs = [], []
        for r in range(rounds):
            ours_runs.append(run_ours(x, labels, pairs, seed=r, force_ivf=False))
            base_runs.append(run_baseline(x, seed=r))
        best_ours = max(ours_runs, key=lambda d: d["embeddings_per_s"])
        best_base = max(base_runs, key=lambda d: d["embeddings_per_s"])
        exact_removed, ivf_removed = base_runs[0]["removed"], ours_runs[0]["removed"]
        out.update(
            ours_embeddings_per_s=best_ours["embeddings_per_s"],
            baseline_embeddings_per_s=best_base["embeddings_per_s"],
            ours_wall_s=[d["wall_s"] for d in ours_runs],
            baseline_wall_s=[d["wall_s"] for d in base_runs],
            ours_cpu_s=[d["cpu_s"] for d in ours_runs],
            baseline_cpu_s=[d["cpu_s"] for d in base_runs],
            ours_timings_s=best_ours["timings_s"],
            ours_index_type=best_ours["index_type"],
            knn_graph_recall_at_64=best_ours["knn_graph_recall_at_64"],
            planted_pairs_resolved=best_ours["planted_pairs_resolved"],
            dedup_removed_exact=int(exact_removed.size),
            dedup_removed_ivf=int(ivf_removed.size),
            exact_removals_also_found_by_ivf=round(
                float(np.isin(exact_removed, ivf_removed).mean()) if exact_removed.size else 1.0, 4),
        )
    out["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return out


def spawn(mode: str, n: int, threads: int, rounds: int) -> dict:
    env = dict(os.environ)
    # Spinning OpenMP waits collapse throughput when other jobs share the two cores.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--worker", mode, "--n", str(n), "--threads", str(threads),
           "--rounds", str(rounds)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {mode} n={n} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


RESULT = Path(__file__).resolve().parent / "results" / "curate.json"


def write_pool_shards(out: str, n: int, dim: int, shard_rows: int, seed: int) -> dict:
    """The synthetic pool at any dimension, one shard at a time: the noise scales with 1/sqrt(dim) so
    that pair cosines match the 384-d data; each shard's last DUP_FRACTION rows are near-copies of
    rows of the previous shard (so copies cross shard borders). Returns the copy pairs' file."""
    import pyarrow as pa

    from dino_ray import storage

    scale = np.sqrt(DIM / dim)
    rng = np.random.default_rng(seed)
    groups = _unit(rng.standard_normal((N_GROUPS, dim), dtype=np.float32))
    n_centres = N_GROUPS * CENTRES_PER_GROUP
    centres = _unit(np.repeat(groups, CENTRES_PER_GROUP, axis=0)
                    + GROUP_SPREAD * scale * rng.standard_normal((n_centres, dim), dtype=np.float32))
    weights = 1.0 / rng.permutation(np.arange(1, n_centres + 1))
    weights /= weights.sum()
    pairs, labels, previous = [], [], None
    for i, start in enumerate(range(0, n, shard_rows)):
        rows = min(shard_rows, n - start)
        n_dup = int(rows * DUP_FRACTION) if previous is not None else 0
        label = rng.choice(n_centres, size=rows - n_dup, p=weights)
        x = _unit(centres[label] + SPREAD * scale * rng.standard_normal((rows - n_dup, dim), dtype=np.float32))
        if n_dup:
            src = np.sort(rng.choice(previous[0].shape[0], size=n_dup, replace=False))
            copies = _unit(previous[0][src] + DUP_NOISE * scale * rng.standard_normal((n_dup, dim), dtype=np.float32))
            x = np.concatenate([x, copies])
            label = np.r_[label, previous[1][src]]
            pairs.append(np.stack([previous[2] + src, start + rows - n_dup + np.arange(n_dup)], axis=1))
        storage.write_parquet(f"{out}/shard-{i:05d}.parquet", pa.table(
            {"embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)}))
        labels.append(label.astype(np.int32))
        previous = (x, label, start)
    np.save(f"{out}/pairs.npy", np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64))
    np.save(f"{out}/labels.npy", np.concatenate(labels))
    return {"n": n, "dim": dim, "planted_pairs": int(sum(p.shape[0] for p in pairs))}


def _pair_recall(dropped: np.ndarray, pairs: np.ndarray) -> float:
    """Share of planted copy pairs of which one image was removed as a duplicate."""
    dup = dropped == "duplicate"
    return round(float(np.mean(dup[pairs[:, 0]] | dup[pairs[:, 1]])), 4) if pairs.size else 1.0


def distributed_worker(path: str, shards: str, workers: int, shard_rows: int | None = None) -> dict:
    """One curation of the pool in `shards`, on one path, in this (fresh) process."""
    import faiss

    from dino_ray.curation.config import CurationConfig, ExecutionConfig
    from dino_ray.curation.shards import open_shards

    files = sorted(str(p) for p in Path(shards).glob("shard-*.parquet"))
    cfg = CurationConfig(execution=ExecutionConfig(mode=path, workers=workers,
                                                   shard_rows=shard_rows or ExecutionConfig().shard_rows))
    start = time.perf_counter()
    if path == "local":
        from dino_ray.feature_store import read_features
        from dino_ray.curation.plan import curate_arrays

        faiss.omp_set_num_threads(workers)
        x = read_features(files)[1]["embedding"]
        result = curate_arrays(x, cfg, seed=0)
        del x
        dropped, summary = result.dropped.astype(str), result.summary
    else:
        import ray

        from dino_ray.curation.distributed_plan import RayRunner, count_rows, curate_shards
        from dino_ray.curation.shard_ops import read_decisions

        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}})
        runner = RayRunner(workers)
        store, _ = count_rows(open_shards(files, cfg.execution.shard_rows), runner)
        result = curate_shards(store, cfg, str(Path(shards) / "out"), seed=0, runner=runner)
        summary = result.summary
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        wall = time.perf_counter() - start
        dropped = read_decisions(result.decisions)["dropped"].astype(str)  # after the RSS reading: O(N) strings
        ray.shutdown()
    wall = time.perf_counter() - start if path == "local" else wall
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if path == "local" else rss_mb
    n = summary["pool_size"]
    return {"path": path, "n": n, "wall_s": round(wall, 1), "images_per_s": round(n / wall, 1),
            "driver_peak_rss_mb": round(rss_mb, 1), "planted_pairs_resolved": _pair_recall(dropped, np.load(
                Path(shards) / "pairs.npy")), "n_duplicates_removed": summary["n_duplicates_removed"],
            "kmeans_objective": round(summary["kmeans_objective"], 2), "n_kept": summary["n_kept"],
            "index_type": summary.get("index_type"), "graph_recall": summary.get("graph_recall"),
            "buckets": summary.get("buckets"), "shards": summary.get("shards"),
            "timings_s": summary["timings_s"], "load_avg_1m": round(os.getloadavg()[0], 2)}


def _spawn_json(args: list[str]) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def distributed_main(args: argparse.Namespace) -> None:
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="curate-bench-"))
    result = json.loads(RESULT.read_text()) if RESULT.exists() else {"name": "curate", "details": {}}
    dist = result.setdefault("details", {}).setdefault("distributed", {"runs": []})
    old = [r for r in dist["runs"] if r["pool"] == args.pool]
    run: dict = {**(old[0] if old else {}), "pool": args.pool, "subset": args.subset, "dim": args.dim,
                 "workers": args.workers}
    for name, n in (("subset", args.subset), ("pool", args.pool)):
        if (name == "subset" and not n) or (args.only and args.only != name):
            continue
        shards = work / f"{name}-{n}"
        if not (shards / "pairs.npy").exists():
            _spawn_json(["--write-shards", str(shards), "--n", str(n), "--dim", str(args.dim)])
        paths = ("local", "distributed") if name == "subset" else ("distributed",)
        for path in paths:
            # the subset runs as 4 shards (and 8 buckets), so the comparison covers the sharded code paths
            rows = [] if name == "pool" else ["--shard-rows", str(max(1, n // 4))]
            got = _spawn_json(["--dist-worker", path, "--shards", str(shards), "--workers", str(args.workers), *rows])
            print(json.dumps({name: got}), file=sys.stderr, flush=True)
            run[f"{name}_{path}"] = got
    if "subset_local" in run:
        a, b = run["subset_local"]["kmeans_objective"], run["subset_distributed"]["kmeans_objective"]
        run["subset_kmeans_objective_delta"] = round((b - a) / a, 5)
    dist["runs"] = sorted([r for r in dist["runs"] if r["pool"] != args.pool] + [run], key=lambda r: r["pool"])
    dist["notes"] = ("product defaults (CurationConfig(), execution.mode set per path); synthetic pool "
                     f"{N_GROUPS} groups x {CENTRES_PER_GROUP} Zipf centres, noise scaled to the dimension, "
                     f"{DUP_FRACTION:.0%} planted copies of the previous shard's rows; driver RSS = getrusage "
                     "maxrss of the driver process; python " + platform.python_version())
    from quality import finish  # the benchmarks' shared ending (README markers)

    finish(result, render_distributed, str(RESULT), args.update_readme)


def _saved_distributed() -> dict:
    """{"distributed": ...} of the saved result, or {}: the in-memory runs must not drop the Ray runs."""
    saved = json.loads(RESULT.read_text()).get("details", {}) if RESULT.exists() else {}
    return {"distributed": saved["distributed"]} if "distributed" in saved else {}


def render_distributed(result: dict) -> str:
    runs = result.get("details", {}).get("distributed", {}).get("runs", [])
    lines = ["| pool x dim | path | workers | shards / buckets | wall | images/s | driver peak RSS | "
             "planted copies resolved | k-means objective |", "|---|---|---|---|---|---|---|---|---|"]
    rows = [(r, r[key]) for key in ("subset_local", "subset_distributed") for r in runs if key in r]
    for r, m in rows + [(r, r["pool_distributed"]) for r in runs if "pool_distributed" in r]:
        split = f"{m['shards']} / {m['buckets']}" if m.get("shards") else "-"
        lines.append(f"| {m['n']:,} x {r['dim']} | {m['path']} | {r['workers']} | {split} | {m['wall_s']:,.0f} s | "
                     f"{m['images_per_s']:,.0f} | {m['driver_peak_rss_mb'] / 1024:.2f} GB | "
                     f"{m['planted_pairs_resolved']} | {m['kmeans_objective']:,.1f} |")
    deltas = [f"{r['subset']:,}: {100 * r['subset_kmeans_objective_delta']:+.3f} %" for r in runs
              if "subset_kmeans_objective_delta" in r]
    if deltas:
        lines.append("")
        lines.append("- k-means objective, distributed vs in-memory on the same subset: " + "; ".join(deltas) + ".")
    lines += _projection([r["pool_distributed"] | {"workers": r["workers"]} for r in runs if "pool_distributed" in r])
    return "\n".join(lines)


def _projection(runs: list[dict], target: int = 142_000_000) -> list[str]:
    """Straight lines through the two largest measured pools (time and driver RSS against N), at `target`."""
    if len(runs) < 2:
        return []
    (n1, t1, m1), (n2, t2, m2) = [(r["n"], r["wall_s"], r["driver_peak_rss_mb"]) for r in runs[-2:]]
    w = runs[-1]["workers"]
    dt, dm = (t2 - t1) / (n2 - n1), (m2 - m1) / (n2 - n1)
    t, m = t1 + dt * (target - n1), m1 + dm * (target - n1)
    return ["", f"- Growth with the pool (distributed, {w} workers, {n1:,} -> {n2:,} images): wall-clock "
                f"{t1:,.0f} s -> {t2:,.0f} s, i.e. {1e6 * dt:,.1f} s per million images; driver peak RSS "
                f"{m1:,.0f} MB -> {m2:,.0f} MB, i.e. {1e6 * dm:,.1f} MB per million images.",
            f"- Projected to {target / 1e6:,.0f}M images on {w} workers of this size: {t1:,.0f} s + "
            f"{1e6 * dt:,.1f} s x {(target - n1) / 1e6:,.1f}M = {t:,.0f} s ({t / 3600:,.1f} h); with W workers "
            f"the task rounds divide by W / {w} (k-means, bucket joins and assignment are one task per shard or "
            f"bucket; only 2 workers were measured), so about {t / 3600 * w / 64:,.2f} h on 64 workers. Driver: "
            f"{m1:,.0f} MB + {1e6 * dm:,.1f} MB x {(target - n1) / 1e6:,.1f}M = {m / 1024:,.1f} GB, whatever the "
            "number of workers (per-image integer arrays and masks; no embeddings)."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--distributed", action="store_true", help="measure the Ray path (see the module doc)")
    parser.add_argument("--pool", type=int, default=3_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--subset", type=int, default=200_000, help="pool size both paths run (0: none)")
    parser.add_argument("--work", help="folder for the shards (default: a new temporary folder)")
    parser.add_argument("--update-readme", metavar="NAME")
    parser.add_argument("--render", action="store_true", help="run nothing: render the saved distributed runs")
    parser.add_argument("--write-shards", help=argparse.SUPPRESS)
    parser.add_argument("--dist-worker", choices=["local", "distributed"], help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--shard-rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=["subset", "pool"], help="run one part; keep the saved other part")
    parser.add_argument("--quick", action="store_true", help="20k and 100k instead of 100k and 1M")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=["scale", "compare"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        from quality import publish

        publish(json.loads(RESULT.read_text()), args.update_readme, render_distributed)
        return
    if args.write_shards:
        print(json.dumps(write_pool_shards(args.write_shards, args.n, args.dim, 50_000, seed=0)))
        return
    if args.dist_worker:
        print(json.dumps(distributed_worker(args.dist_worker, args.shards, args.workers, args.shard_rows)))
        return
    if args.distributed:
        distributed_main(args)
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.threads, args.rounds)))
        return

    import faiss

    sizes = [20_000, 100_000] if args.quick else [100_000, 1_000_000]
    rounds = 2 if args.quick else 1
    compare = spawn("compare", sizes[0], args.threads, rounds)
    print(json.dumps({"compare": compare}), flush=True)
    scaling = []
    for n in sizes:
        scaling.append(spawn("scale", n, args.threads, 1))
        print(json.dumps({"scale": scaling[-1]}), flush=True)
    ours, base = compare["ours_embeddings_per_s"], compare["baseline_embeddings_per_s"]
    print(json.dumps({
        "name": "curate_dedup_hkmeans_sampling",
        "unit": "embeddings/s",
        "headline": (f"dedup + hierarchical k-means + balanced sampling of {sizes[0]:,} x {DIM}-d embeddings at the "
                     "product's default settings vs the exact straightforward pipeline (flat index graph, flat "
                     f"k-means); graph recall@64 vs exact {compare['knn_graph_recall_at_64']}, planted copies "
                     f"resolved {compare['planted_pairs_resolved']}"),
        "ours": ours,
        "baseline": base,
        "ratio": round(ours / base, 3),
        "details": {
            "comparison": (f"n={sizes[0]}, interleaved in one process, best of {rounds}; ours = the product's "
                           "defaults: exact index below 200k rows, else IVF (nlist 4 sqrt(N), nprobe 16), "
                           "list-blocked GEMM k=64 graph + components dedup + "
                           "3-level spherical hierarchical k-means (1000/100/10, resampling 3/10/10, k-means++ on 8192 "
                           "points) + hierarchical sampling of 10%; baseline = exact IndexFlatIP k=64 graph + "
                           "components + flat faiss k-means (k=1000, random init, all points) + flat sampling; "
                           "both 25 Lloyd iterations"),
            "compare": compare,
            "scaling": scaling,
            "dim": DIM,
            "data": (f"{N_GROUPS} groups x {CENTRES_PER_GROUP} Zipf-weighted centres, noise {SPREAD}/dim, "
                     f"{DUP_FRACTION:.0%} planted copies"),
            "threads": args.threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE (set for workers)"),
            "faiss": faiss.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            # the --distributed runs live in the same file (suite.py rewrites it): keep them
            **_saved_distributed(),
        },
    }))


if __name__ == "__main__":
    main()
