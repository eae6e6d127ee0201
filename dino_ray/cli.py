"""``dino-ray``: run, validate or submit a job YAML.

    dino-ray run jobs/pipeline.yaml [key.path=value ...] [--force STAGE] [--resume-from-checkpoint STAGE]
    dino-ray validate jobs/pretrain.yaml train.lr=1e-4
    dino-ray submit jobs/pretrain.yaml --address http://HOST:8265 [key.path=value ...]
    dino-ray report outputs/demo [--update-readme demo]
    dino-ray plan jobs/presets/vitg14.yaml --gpus 256 --gpu-memory 80GB

Job YAMLs start with ``#!/usr/bin/env -S dino-ray run``, so ``jobs/pretrain.yaml`` is itself a command
(which is what ``ray job submit --working-dir . -- jobs/pretrain.yaml`` runs).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

from dino_ray.config.typed import ConfigError
from dino_ray.pipeline import StageFailed

log = logging.getLogger("dino_ray")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dino-ray", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the stages of a job YAML (local Ray unless RAY_ADDRESS is set)")
    run.add_argument("job", help="path to a job YAML, e.g. jobs/pipeline.yaml")
    run.add_argument("overrides", nargs="*", help="key.path=value overrides")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="re-run STAGE even if its manifest is up to date (repeatable)")
    run.add_argument("--resume-from-checkpoint", action="append", default=[], metavar="STAGE", dest="resume",
                     help="a training STAGE whose config changed continues from its last checkpoint (weights, "
                          "optimizer, EMA teacher, step) under the new config instead of starting over")
    run.add_argument("--verbose", action="store_true",
                     help="show everything on the console: workers' output, Ray Data progress bars, INFO logs")

    val = sub.add_parser("validate", help="load and validate a job YAML, print the resolved config")
    val.add_argument("job")
    val.add_argument("overrides", nargs="*")

    rp = sub.add_parser("report", help="print the results and stage timings a run wrote under its output root")
    rp.add_argument("output_root", help="the job's output_root, e.g. outputs/demo or s3://bucket/runs/r1")
    rp.add_argument("--update-readme", metavar="NAME",
                    help="also put the report between <!-- report:NAME --> markers in README.md")
    rp.add_argument("--readme", default="README.md", help="the file --update-readme edits (default: README.md)")
    rp.add_argument("--compare", metavar="OTHER_ROOT",
                    help="also say how far a second run of the same job (same seed) landed from this one")
    rp.set_defaults(overrides=[])

    pl = sub.add_parser("plan", help="per-GPU memory, largest batch and step time of each training stage, "
                                     "before anything runs (exit code 1 when a stage does not fit)")
    pl.add_argument("job")
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--gpus", type=int, default=None,
                    help="workers (one GPU each) for every training stage (default: each stage's num_workers)")
    pl.add_argument("--gpu-memory", default="80GB", help="memory per GPU, e.g. 80GB, 40GiB (default 80GB)")
    pl.add_argument("--peak-tflops", type=float, default=312.0, help="dense bf16 peak per GPU (A100: 312)")
    pl.add_argument("--utilisation", type=float, default=0.4, help="share of the peak a step reaches (default 0.4)")
    pl.add_argument("--reserve", default="2GiB", help="per-GPU memory kept for CUDA context and allocator slack")
    pl.add_argument("--cpu", action="store_true", help="plan CPU workers of this machine instead of GPUs")

    sm = sub.add_parser("submit", help="submit a job YAML to a Ray cluster's job server and stream its logs")
    sm.add_argument("job")
    sm.add_argument("overrides", nargs="*")
    sm.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
                    help="job server, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")
    sm.add_argument("--submission-id", default=None, help="fixed id, so a resubmitted job is recognisable")
    sm.add_argument("--force", action="append", default=[], metavar="STAGE")
    sm.add_argument("--resume-from-checkpoint", action="append", default=[], metavar="STAGE", dest="resume")
    sm.add_argument("--working-dir", default=".", help="uploaded as the job's working dir (default: .)")
    sm.add_argument("--no-wait", action="store_true", help="return after submission")
    sm.add_argument("--verbose", action="store_true", help="the job runs `dino-ray run --verbose`")
    return p


def _split_args(args: argparse.Namespace) -> None:
    # argparse puts "--force X" after positionals fine; overrides must look like key=value.
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override(s) {bad} must look like key.path=value")


def cmd_run(args: argparse.Namespace) -> int:
    from dino_ray.config.loader import load_job

    job = load_job(args.job, args.overrides)
    _check_plan(job, args.job)
    from dino_ray import tracking
    from dino_ray.console import Console
    from dino_ray.pipeline import Pipeline
    from dino_ray.ray_utils import init_ray, logs_dir

    console = Console(verbose=args.verbose)

    def ensure_ray() -> None:
        init_ray(job.ray.address, job.ray.num_cpus, verbose=args.verbose)
        console.attach_ray(logs_dir())

    start = time.time()
    try:
        Pipeline(job, ensure_ray=ensure_ray, events=console).run(force=args.force, resume=args.resume)
    finally:
        console.close()
    tracking_uri = tracking.resolve_tracking_uri(job.tracking.tracking_uri)
    console.finish(time.time() - start, job.output_root, tracking_uri, with_results="eval" in job.stages,
                   experiment_id=tracking.find_experiment_id(tracking_uri, job.tracking.experiment))
    return 0


def _check_plan(job, source: str) -> None:
    """Stages that declare train.scaling.gpu_memory are planned; one that does not fit is a config error.
    Only then is the planner (and torch) imported: validating any other job stays torch-free."""
    from dino_ray.config.schema import TRAINING_STAGES

    if any(s in job.stages and getattr(job, s).train.scaling.gpu_memory for s in TRAINING_STAGES):
        from dino_ray.plan import check_job_fits

        check_job_fits(job, source)


def cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    from dino_ray.config.loader import load_job
    from dino_ray.config.typed import to_dict

    job = load_job(args.job, args.overrides)
    _check_plan(job, args.job)
    print(yaml.safe_dump(to_dict(job), sort_keys=False))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from dino_ray.config.loader import load_job
    from dino_ray.plan import Hardware, parse_bytes, plan_job
    from dino_ray.plan.report import render

    job = load_job(args.job, args.overrides, check_inputs=False)  # a plan needs no data to exist
    try:
        memory, reserve = parse_bytes(args.gpu_memory), parse_bytes(args.reserve)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    from dino_ray.config.schema import TRAINING_STAGES

    stages = [s for s in job.stages if s in TRAINING_STAGES]
    if not stages:
        raise ConfigError(f"the job runs no training stage (stages: {job.stages}); nothing to plan", "stages")
    plans = []
    for stage in stages:
        workers = args.gpus or getattr(job, stage).train.scaling.num_workers
        hw = Hardware(workers=workers, memory_bytes=memory, device="cpu" if args.cpu else "cuda",
                      peak_tflops=args.peak_tflops, utilisation=args.utilisation, reserve_bytes=reserve)
        plans += plan_job(job, hw, only=stage)
    print(render(plans, hw, args.job))
    return 0 if all(p.fits for p in plans) else 1


def cmd_report(args: argparse.Namespace) -> int:
    from dino_ray.run_report import load_report, render, update_readme

    try:
        text = render(load_report(args.output_root), load_report(args.compare) if args.compare else None)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    print(text, end="")
    if args.update_readme:
        update_readme(args.readme, args.update_readme, text)
        print(f"[dino-ray] report written into {args.readme} (section {args.update_readme!r})")
    return 0


def _auth_env() -> None:
    """Ray >= 2.59 clusters use token auth; the client only sends the token when told to."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file.exists()):
        os.environ["RAY_AUTH_MODE"] = "token"


def cmd_submit(args: argparse.Namespace) -> int:
    from dino_ray.config.loader import load_job

    job = load_job(args.job, args.overrides)  # fail here, not on the cluster
    _check_plan(job, args.job)
    if not args.address:
        raise ConfigError("no job server address: pass --address http://HOST:8265 or set RAY_ADDRESS")
    _auth_env()
    from ray.job_submission import JobStatus, JobSubmissionClient

    runtime_env = dict(job.runtime_env or {})
    runtime_env.setdefault("working_dir", args.working_dir)
    runtime_env.setdefault("excludes", [".git", "outputs", "mlruns", "mlflow.db", "*.egg-info"])
    env_vars = dict(runtime_env.get("env_vars") or {})
    for k in ("MLFLOW_TRACKING_URI",):
        if k in os.environ:
            env_vars.setdefault(k, os.environ[k])
    from dino_ray import tracking

    # the uploaded working dir has no .git: the runs record the commit the job was submitted from
    commit = os.environ.get(tracking.GIT_COMMIT_ENV) or tracking.git_commit(args.working_dir)
    if commit:
        env_vars.setdefault(tracking.GIT_COMMIT_ENV, commit)
    if env_vars:
        runtime_env["env_vars"] = env_vars
    job_path = os.path.relpath(os.path.abspath(args.job), os.path.abspath(args.working_dir))
    entrypoint = " ".join(["dino-ray", "run", shlex.quote(job_path), *map(shlex.quote, args.overrides),
                           *[f"--force {shlex.quote(s)}" for s in args.force],
                           *[f"--resume-from-checkpoint {shlex.quote(s)}" for s in args.resume],
                           *(["--verbose"] if args.verbose else [])])
    try:
        client = JobSubmissionClient(args.address)
    except Exception as e:  # noqa: BLE001 - turn connection/auth errors into one clear line
        hint = ""
        if "auth" in str(e).lower() or "token" in str(e).lower():
            hint = " (the cluster uses token auth: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or ~/.ray/auth_token)"
        raise SystemExit(f"dino-ray submit: cannot reach the Ray job server at {args.address}: {e}{hint}") from e
    sid = _submit_with_retry(client, entrypoint=entrypoint, runtime_env=runtime_env,
                             submission_id=args.submission_id,
                             metadata={"dino_ray.job": job_path, "dino_ray.name": job.name})
    print(f"[dino-ray] submitted {sid}: {entrypoint}", flush=True)
    if args.no_wait:
        return 0
    _stream_logs(client, sid)
    status = _wait(client, sid)
    print(f"[dino-ray] job {sid} finished: {status}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _submit_with_retry(client, timeout_s: float = 120.0, **kwargs) -> str:
    """A freshly started head answers before its job agent is up ("No available agent"): retry that."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def _stream_logs(client, sid: str) -> None:
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(sid):
            sys.stdout.write(lines)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 - logs are best effort; the status decides the exit code
        log.warning("log streaming stopped: %s", e)


def _wait(client, sid: str, poll_s: float = 1.0):
    from ray.job_submission import JobStatus

    while True:
        status = client.get_job_status(sid)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(poll_s)


def main(argv: Sequence[str] | None = None) -> int:
    from dino_ray.console import configure_output

    parser = _parser()
    # Overrides may come before or after options (`submit JOB --address URL a.b=1`): collect the
    # key=value tokens argparse leaves over.
    args, extra = parser.parse_known_args(argv)
    unknown = [t for t in extra if t.startswith("-") or "=" not in t]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    configure_output(verbose=args.command != "run" or args.verbose)  # only `run` is quiet by default
    try:
        _split_args(args)
        return {"run": cmd_run, "validate": cmd_validate, "submit": cmd_submit, "plan": cmd_plan,
                "report": cmd_report}[args.command](args)
    except ConfigError as e:
        print(f"dino-ray: config error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        import traceback

        # The cause's traceback is part of the error a user must see (where it failed, not only what).
        cause = "".join(traceback.format_exception(e.__cause__)) if e.__cause__ is not None else ""
        print(f"{cause}dino-ray: {e}\n(outputs of earlier stages are kept; run the same command again to "
              f"continue from the failed stage)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
