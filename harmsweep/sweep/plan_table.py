"""What ``harmsweep plan`` prints: one row per job, each job's phases, the disk and the assumptions.

Reads the plan's JSON form only, so the table and ``--json`` never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def render(plan: Mapping[str, Any]) -> str:
    """The table a user reads before submitting: per job, only the overrides that differ between jobs; then the
    phases of each job (of the one with the largest peak when there are more than four)."""
    from harmsweep.sweep.sizing import gib

    common = set.intersection(*(set(r["overrides"]) for r in plan["jobs"])) if len(plan["jobs"]) > 1 else set()
    head = (f"{'job':>4} {'N scored':>15} {'weights':>8} {'scores':>7} {'activ.':>7} {'KV':>6} {'judge':>6} "
            f"{'peak GiB':>9} {'phase':<23} {'passes':>7} {'host GiB':>8} {'gen tokens':>11} {'GPU-h':>6}  overrides")  # fmt: skip
    lines = [f"every job: {' '.join(sorted(common))}"] if common else []
    lines += [head, "-" * len(head)]
    for r in plan["jobs"]:
        lines.append(
            f"{r['job']:>4} {r['n_scored']:>15,} {gib(r['weights']):>8} {gib(r['score_buffer']):>7} "
            f"{gib(r['activations']):>7} {gib(r['kv_cache']):>6} {gib(r['judge']):>6} {gib(r['peak']):>9} "
            f"{r['phase']:<23} {r['passes']:>7} {gib(r['host_ram']):>8} {r['generated_tokens']:>11,} "
            f"{r['gpu_hours']:>6.2f}  {' '.join(o for o in r['overrides'] if o not in common) or '(defaults)'}"
        )
    shown = plan["jobs"] if len(plan["jobs"]) <= 4 else [max(plan["jobs"], key=lambda r: r["peak"])]
    for r in shown:
        lines += ["", f"job {r['job']} by phase (GiB per GPU; minutes the GPUs compute, and wait on the host):"]
        lines += phase_table(r["phases"])
    if len(plan["jobs"]) > 1 and plan.get("phases"):
        lines += ["", f"sweep by phase (the jobs that run it, of {len(plan['jobs'])}; minutes over the sweep):"]
        lines += sweep_table(plan["phases"])
    d = plan["disk"]
    free = "unknown" if d["free"] is None else f"{gib(d['free'])} GiB free"
    lines += [
        "",
        f"disk (under {d['artifacts']}): "
        + ", ".join(f"{k} {gib(d[k])} GiB" for k in ("calibration", "scores", "masks", "evaluations"))
        + f"; total {gib(d['total'])} GiB of {free}; reads {gib(d.get('read', 0.0))} GiB",
        f"GPU-hours (estimate): {plan['gpu_hours']:.2f} over {len(plan['jobs'])} jobs",
        "assumptions: "
        + ", ".join(f"{k}={v}" for k, v in plan["assumptions"].items())
        + "; memory is per GPU, peak = the largest phase's",
    ]
    return "\n".join(lines)


ADVICE = {  # what lowers the memory of the phase that sets the peak
    "scoring": "set scoring.gradient_checkpointing=true, a smaller calibration.batch_size",
    "evaluation": "set a smaller eval.batch_size or model.logits_chunk",
    "generation": "set a smaller eval.generation.batch_size (or eval.generation.backend=hf)",
    "finetune": "use LoRA (finetune.method=lora), a smaller fine-tune batch_size or max_length",
}


def advice(phase: str) -> str:
    from harmsweep.sweep.experiment_sizing import STAGE_ADVICE

    if phase in STAGE_ADVICE:
        return STAGE_ADVICE[phase]
    if phase.startswith(("EM ", "explanation ", "detection ")):  # the experiments' generation stages
        return ADVICE["generation"]
    key = "scoring" if phase == "sequential" else phase.split()[0]
    return ADVICE.get(key, "set a smaller calibration.batch_size")


def phase_table(phases: list[Mapping[str, Any]]) -> list[str]:
    from harmsweep.sweep.sizing import gib

    head = (
        f"  {'phase':<23} {'GPU peak':>8} {'host':>6} {'read':>6} {'passes':>7} {'GPU min':>8} {'host min':>8}  made of"
    )
    out = [head, "  " + "-" * (len(head) - 2)]
    for p in phases:
        parts = ", ".join(f"{k} {gib(v)}" for k, v in p["parts"].items())
        out.append(
            f"  {p['name']:<23} {gib(p['gpu']):>8} {gib(p['host']):>6} {gib(p['disk_read']):>6} {p['passes']:>7} "
            f"{p['gpu_seconds'] / 60:>8.1f} {p['host_seconds'] / 60:>8.1f}  {parts}"
            + (f"; {p['note']}" if p.get("note") and parts else p.get("note") or "")
        )
    return out


def job_ranges(jobs: list[int], most: int = 6) -> str:
    """Job numbers as runs of consecutive ones ("0..14, 16, 20..29"); past ``most`` runs, how many jobs more."""
    runs: list[list[int]] = []
    for j in sorted(jobs):
        if runs and j == runs[-1][1] + 1:
            runs[-1][1] = j
        else:
            runs.append([j, j])
    shown = [f"{a}" if a == b else f"{a}, {b}" if b == a + 1 else f"{a}..{b}" for a, b in runs[:most]]
    rest = sum(b - a + 1 for a, b in runs[most:])
    return ", ".join(shown) + (f", ... ({rest} more)" if rest else "")


def sweep_table(totals: list[Mapping[str, Any]]) -> list[str]:
    """Each phase over the sweep: which jobs run it (a shared stage: one) and their minutes together."""
    out = [f"  {'phase':<23} {'jobs':>5} {'GPU min':>8} {'host min':>8}  run by"]
    for t in totals:
        jobs = t["jobs"]
        who = "none" if not jobs else f"job {jobs[0]} only" if len(jobs) == 1 else f"jobs {job_ranges(jobs)}"
        out.append(
            f"  {t['name']:<23} {len(jobs):>5} {t['gpu_seconds'] / 60:>8.1f} {t['host_seconds'] / 60:>8.1f}  {who}"
        )
    return out
