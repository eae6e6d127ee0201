"""The plan as a table: one row per training stage, every figure per worker."""

from __future__ import annotations

from dino_ray.plan.memory import GiB, Hardware, StagePlan


def gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def render(plans: list[StagePlan], hw: Hardware, source: str) -> str:
    """Markdown: the header line, the memory table, the time table and a verdict per stage."""
    where = f"{hw.workers} x {hw.memory_bytes / GiB:g} GiB {'GPUs' if hw.device == 'cuda' else 'CPU workers'}"
    lines = [f"Plan for `{source}` on {where}; memory per worker in GiB (reserve {gib(hw.reserve_bytes)} GiB "
             f"for the framework); step time at {hw.utilisation:.0%} of {hw.peak_tflops:g} TFLOP/s.", "",
             "| stage | models | params | batch / worker | ZeRO | precision | model state | ZeRO-3 buffers | "
             "activations | activations, checkpointed | teacher targets | total | total, checkpointed | "
             "largest batch | largest batch, checkpointed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in plans:
        lines.append(
            f"| {p.stage} | {p.models} | {p.params / 1e6:,.0f} M | {p.batch} | {p.zero_stage} | {p.precision} | "
            f"{gib(p.state_bytes)} | {gib(p.buffer_bytes)} | {gib(p.activation_bytes)} | "
            f"{gib(p.activation_ckpt_bytes)} | {gib(p.target_bytes)} | {gib(p.total(False))} | "
            f"{gib(p.total(True))} | {p.largest_batch} | {p.largest_batch_ckpt} |")
    lines += ["", "| stage | TFLOP per step and worker | step time | step time, checkpointed |", "|---|---|---|---|"]
    for p in plans:
        lines.append(f"| {p.stage} | {p.step_tflop:,.1f} | {p.step_s:.2f} s | {p.step_ckpt_s:.2f} s |")
    lines.append("")
    for p in plans:
        lines.append(f"- {verdict(p)}")
        lines += [f"  - {n}" for n in p.notes]
    return "\n".join(lines)


def verdict(p: StagePlan) -> str:
    """One sentence: does the stage fit as configured, and if not, what would."""
    ckpt = "with" if p.checkpointing else "without"
    total = p.total(p.checkpointing)
    if p.fits:
        return (f"{p.stage}: fits ({gib(total)} of {gib(p.memory_bytes)} GiB {ckpt} activation checkpointing, "
                f"batch {p.batch}).")
    fixes = []
    best = p.largest_batch_ckpt if p.checkpointing else p.largest_batch
    if best >= 1:
        fixes.append(f"lower {p.stage}.train.batch_size_per_worker to {best}")
    if not p.checkpointing and p.largest_batch_ckpt >= p.batch:
        fixes.append(f"set {p.stage}.train.activation_checkpointing: true (then {gib(p.total(True))} GiB)")
    if p.zero_stage != 3:
        fixes.append(f"set {p.stage}.train.zero_stage: 3 to shard the model state over the workers")
    if not fixes:
        fixes.append("add workers or use devices with more memory")
    return (f"{p.stage}: does NOT fit: {gib(total)} GiB needed per worker, {gib(p.memory_bytes)} GiB available "
            f"({ckpt} activation checkpointing, batch {p.batch}); " + " or ".join(fixes) + ".")
