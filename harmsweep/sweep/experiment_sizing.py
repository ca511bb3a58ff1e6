"""What the paper's EM and capability experiments add to a job's size (``harmsweep plan``), stage by stage.

experiment=orgad2026_em (btap_reference.md section 11) runs: the EM fine-tune of the original model (stage 1), the EM
model's answers to the held-out prompts (2), scoring on them (3: the plain scoring phase), the fine-tune of the
pruned model (4) and the first-plot answers judged by an endpoint (5); the EM model is also evaluated once, as the
baseline. Stages 1-2 and the baseline are made once per EM model: the first job of a sweep that shares it pays them,
the others read the cache. experiment=orgad2026_capabilities adds the explanation and detection answers and their
endpoint judges (section 6.4). Counts come from the config; sizing.py's phase functions size them. No torch here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harmsweep.config.schema import Config
from harmsweep.evaluation.spec import metric_plan
from harmsweep.sweep.sizing import (
    FineTune,
    JobSize,
    Phase,
    Throughput,
    Workload,
    finetune_phase,
    generation_phase,
    job_phases,
    size_job,
)

EM_DOMAIN_ROWS = 6000  # rows of their model-organisms domains, assumed when {data_dir}/{domain}.jsonl is not here
EM_QUESTIONS = 16  # their first_plot_questions (8 plain, 8 template), assumed when em.question_ids is null
INSECURE_ROWS = 6000  # experiment=em's insecure.jsonl
# Assumed endpoint latencies (seconds a request, at the judge's max_workers in flight): Betley et al.'s judges read
# one token's logprobs; the explanation and coherence judges answer a JSON object of up to 200 tokens.
LOGPROB_LATENCY_S = 1.5
JSON_LATENCY_S = 4.0
CACHED = "cached, made by job"
STAGE_ADVICE = {  # what lowers the memory of a stage that sets a job's peak
    "EM fine-tune (EM model)": "set a smaller em.finetune.batch_size (a larger grad_accum keeps the recipe) or "
    "em.finetune.max_length",
    "EM fine-tune (pruned)": "set a smaller em.finetune.batch_size (a larger grad_accum keeps the recipe) or "
    "em.finetune.max_length",
}


@dataclass(frozen=True)
class Stage:
    """One stage an experiment adds to a job, in counts (what the plan's JSON lists under ``stages``)."""

    name: str
    kind: str  # finetune | generation | endpoint
    before_scoring: bool = False
    made_by: int | None = None  # another job of the sweep made it: cached, nothing to pay here
    pairs: int = 0  # fine-tune: training pairs
    steps: int = 0  # fine-tune: optimizer steps
    tune: FineTune | None = None
    prompts: int = 0  # generation: answers
    max_new_tokens: int = 0
    tokens: int = 0  # generation: prompts x max_new_tokens (sampled up to)
    requests: int = 0  # endpoint: judge requests
    workers: int = 1
    latency_s: float = 0.0
    note: str = ""


def experiment_finetunes(cfg: Config) -> tuple[FineTune, ...]:
    """The fine-tunes every job runs besides the stages: deriving its variant (once, then cached), experiment=em's
    arms, dissociation's recovery. orgad2026_em's fine-tunes are stages (em_stages)."""
    out = []
    derive = cfg.alignment.derive
    if derive is not None:
        t = derive.finetune
        out.append(FineTune("derive", t.method, t.rank, t.batch_size, t.max_length,
                            t.steps(derive.n_harmful + derive.n_benign), t.grad_accum))  # fmt: skip
    if cfg.em is not None and cfg.experiment != "orgad2026_em":
        t = cfg.em.finetune
        arms = len(cfg.em.arms) * len(cfg.em.domains)  # every arm fine-tunes (the parent is not an arm)
        steps = t.steps(cfg.em.n_train or INSECURE_ROWS)
        out.append(FineTune("em", t.method, t.rank, t.batch_size, t.max_length, steps * arms, t.grad_accum))
    if cfg.dissociation is not None and cfg.dissociation.recovery_steps:
        t = cfg.dissociation.finetune
        out.append(FineTune("recovery", t.method, t.rank, t.batch_size, t.max_length,
                            cfg.dissociation.recovery_steps))  # fmt: skip
    return tuple(out)


def em_keys(plain: Mapping[str, Any]) -> dict[str, str]:
    """What each once-per-EM-model stage is keyed by: the model, its variant, the seed, the domain and the recipe."""
    model = {k: v for k, v in plain["model"].items() if k not in ("device_map", "max_memory")}
    em = plain["em"]
    tune = json.dumps([model, plain["alignment"], plain["seed"], em["domain"], em["data_dir"], em["held_out"],
                       em["finetune"]], sort_keys=True, default=str)  # fmt: skip
    asked = ("questions", "question_ids", "samples_per_question", "max_new_tokens", "temperature", "top_p", "judge",
             "in_domain")  # fmt: skip
    baseline = tune + json.dumps([em[k] for k in asked], sort_keys=True, default=str)
    return {
        "EM fine-tune (EM model)": tune,
        "EM answers": tune + json.dumps([em["answer_tokens"], em["temperature"], em["top_p"]]),
        "EM model evaluation": baseline,
        "EM model judge calls": baseline,
    }


def _rows(path: Path) -> int | None:
    """Non-empty lines of a JSONL file when it is here, else None."""
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def domain_split(data_dir: str | None, domain: str | None, held_out: int) -> tuple[int, int, str]:
    """(training pairs, held-out prompts, where the counts come from), as the run splits the domain: their
    {domain}_remove1000.jsonl is the training set when it is here (the rest held out), else {domain}.jsonl's rows
    minus em.held_out; with neither file here, their 6,000-row domains are assumed."""
    root = Path(data_dir).expanduser() if data_dir and domain else None
    full = _rows(root / f"{domain}.jsonl") if root else None
    train = _rows(root / f"{domain}_remove1000.jsonl") if root else None
    if full is not None and train is not None:
        return train, max(0, full - train), f"{domain}_remove1000.jsonl's {train:,} of {full:,} rows"
    if full is not None:
        return max(0, full - held_out), min(held_out, full), f"{full:,} rows in {domain}.jsonl; {held_out:,} held out"
    assumed = f"their domains' {EM_DOMAIN_ROWS:,} rows assumed, {domain}.jsonl not here; {held_out:,} held out"
    return max(0, EM_DOMAIN_ROWS - held_out), held_out, assumed


def em_stages(cfg: Config, made_by: Mapping[str, int], job: int) -> list[Stage]:
    """orgad2026_em's stages of job ``job``; ``made_by``: which job makes each once-per-EM-model stage. With
    em.prune_file stage 2 is skipped; the EM model is still made once: its evaluation is every cell's baseline."""
    em = cfg.em
    assert em is not None
    t = em.finetune
    pairs, held, where = domain_split(em.data_dir, em.domain, em.held_out)
    steps = t.steps(pairs) if pairs else 0
    tune = FineTune("em", t.method, t.rank, t.batch_size, t.max_length, steps, t.grad_accum)
    recipe = (
        f"{t.method} r{t.rank} on {pairs:,} pairs ({where}): {steps:,} steps of {t.batch_size} x {t.grad_accum}, "
        f"{t.epochs} epoch(s), at max_length {t.max_length} (an upper bound)"
    )
    questions = len(em.question_ids) if em.question_ids else EM_QUESTIONS
    answers = questions * em.samples_per_question
    workers = int((em.judge or {}).get("max_workers") or 1)
    per_answer = 2 + int(em.in_domain)
    asked = "aligned, coherent" + (", in_domain" if em.in_domain else "")
    calls = (f"{answers:,} answers x {per_answer} ({asked}) at {workers} in flight, "
             f"{LOGPROB_LATENCY_S:g} s a request (assumed); no GPU")  # fmt: skip
    evaluation = f"{questions} questions x {em.samples_per_question} samples, up to {em.max_new_tokens} tokens"

    def gen(name: str, prompts: int, new: int, note: str, early: bool) -> Stage:
        return Stage(name, "generation", early, prompts=prompts, max_new_tokens=new, tokens=prompts * new, note=note)

    once = [
        Stage("EM fine-tune (EM model)", "finetune", True, pairs=pairs, steps=steps, tune=tune, note=recipe),
        gen(
            "EM answers",
            held,
            em.answer_tokens,
            f"{held:,} held-out prompts x up to {em.answer_tokens} tokens (the answers stage 3 scores)",
            True,
        ),
        gen("EM model evaluation", answers, em.max_new_tokens, f"baseline: {evaluation}", True),
        Stage(
            "EM model judge calls",
            "endpoint",
            True,
            requests=answers * per_answer,
            workers=workers,
            latency_s=LOGPROB_LATENCY_S,
            note=calls,
        ),
    ]
    for i, stage in enumerate(once):
        if em.prune_file and stage.name == "EM answers":
            once[i] = replace(stage, prompts=0, tokens=0, note="skipped: em.prune_file gives the answers")
        elif made_by.get(stage.name, job) != job:
            once[i] = replace(stage, made_by=made_by[stage.name], note=f"{CACHED} {made_by[stage.name]}")
    return [
        *once,
        Stage("EM fine-tune (pruned)", "finetune", pairs=pairs, steps=steps, tune=tune, note=recipe),
        gen("EM evaluation", answers, em.max_new_tokens, evaluation, False),
        Stage(
            "EM judge calls",
            "endpoint",
            requests=answers * per_answer,
            workers=workers,
            latency_s=LOGPROB_LATENCY_S,
            note=calls,
        ),
    ]


def _lines(file: str | None) -> int | None:
    if not file or not Path(file).expanduser().is_file():
        return None
    return sum(1 for line in Path(file).expanduser().read_text(encoding="utf-8").splitlines() if line.strip())


def capability_stages(cfg: Config, n_eval: int, evaluated: int) -> list[Stage]:
    """orgad2026_capabilities' explanation and detection answers and their endpoint judges, per evaluated stage
    (before, when this job evaluates the unpruned model, and after); metrics that would be skipped add nothing."""
    ev, out = cfg.eval, []
    metrics = metric_plan(ev, cfg.judges)[0]
    explained = min(ev.explanation.n, n_eval) if ev.explanation.n is not None else n_eval
    if "explanation" in metrics:
        n = explained * evaluated
        out.append(Stage("explanation answers", "generation", prompts=n, max_new_tokens=ev.explanation.max_new_tokens,
                         tokens=n * ev.explanation.max_new_tokens,
                         note=f"{explained:,} held-out prompts x {evaluated} stage(s)"))  # fmt: skip
    if "detection" in metrics:
        d = ev.detection
        harmful = min(d.n, n_eval) if d.n is not None else n_eval
        rows = _lines(d.counterfact_file)
        counter = (min(d.n, rows) if d.n is not None else rows) if rows is not None else harmful
        said = "" if rows is not None else " (assumed: as many as the harmful half; the file is not here)"
        n = (harmful + counter) * evaluated
        out.append(Stage("detection answers", "generation", prompts=n, max_new_tokens=d.max_new_tokens,
                         tokens=n * d.max_new_tokens, note=f"{harmful:,} harmful + {counter:,} counterfactual"
                         f"{said} x {evaluated} stage(s)"))  # fmt: skip
    for name, judged, what in (
        ("explanation", explained if "explanation" in metrics else 0, "explanations (refusals are not sent: fewer)"),
        ("coherence", n_eval + (explained if "explanation" in metrics else 0), "harmful answers and explanations"),
    ):
        if name in metrics and judged:
            workers = int((cfg.judges.get(name) or {}).get("max_workers") or 1)
            out.append(Stage(f"{name} judge calls", "endpoint", requests=judged * evaluated, workers=workers,
                             latency_s=JSON_LATENCY_S, note=f"{judged:,} {what} x {evaluated} stage(s) at {workers} "
                             f"in flight, {JSON_LATENCY_S:g} s a request (assumed); no GPU"))  # fmt: skip
    return out


def experiment_stages(
    cfg: Config, plain: Mapping[str, Any], made: dict[str, int], job: int, n_eval: int, evaluated: int
) -> list[Stage]:
    """The stages job ``job`` adds; ``made`` (key -> job that makes it) records what this job makes for the sweep."""
    if cfg.experiment == "orgad2026_em" and cfg.em is not None:
        made_by = {name: made.setdefault(key, job) for name, key in em_keys(plain).items()}
        return em_stages(cfg, made_by, job)
    if cfg.experiment == "orgad2026_capabilities":
        return capability_stages(cfg, n_eval, evaluated)
    return []


def stage_phase(shape: Any, work: Workload, stage: Stage, speed: Throughput) -> Phase:
    """A stage as a phase: a fine-tune or a generation sized as sizing.py sizes its own; endpoint calls wait on the
    endpoint (host time, no GPU): ceil(requests / workers) rounds of the assumed latency."""
    if stage.made_by is not None or not (stage.steps or stage.prompts or stage.requests):
        return Phase(stage.name, 0.0, {}, note=stage.note)
    if stage.kind == "finetune" and stage.tune is not None:
        phase = finetune_phase(shape, work, stage.tune, speed)
    elif stage.kind == "generation":
        run = replace(work, eval_prompts=stage.prompts, generations=1, max_new_tokens=stage.max_new_tokens,
                      cal_gen_tokens=0, extra_gen_tokens=0)  # fmt: skip
        phase = generation_phase(shape, run, speed)
    else:
        rounds = math.ceil(stage.requests / max(1, stage.workers))
        return Phase(stage.name, 0.0, {}, host_seconds=rounds * stage.latency_s, note=stage.note)
    return replace(phase, name=stage.name, note=stage.note)


def size_staged(shape: Any, work: Workload, judge: Any, speed: Throughput, stages: Sequence[Stage]) -> JobSize:
    """size_job with the stages' phases: the early ones after loading (and deriving), the others at the end."""
    base = job_phases(shape, work, judge, speed)
    cut = next((i for i, p in enumerate(base) if p.name not in ("load", "finetune derive")), len(base))
    early = [stage_phase(shape, work, s, speed) for s in stages if s.before_scoring]
    late = [stage_phase(shape, work, s, speed) for s in stages if not s.before_scoring]
    size = size_job(shape, work, judge, speed, phases=base[:cut] + early + base[cut:] + late)
    tokens = sum(s.tokens for s in stages if s.made_by is None)
    return replace(size, generated_tokens=size.generated_tokens + tokens)


def phase_totals(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per phase name over the sweep: the jobs that run it (not cached, not skipped) and their minutes."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        for p in row["phases"]:
            total = out.setdefault(p["name"], {"name": p["name"], "jobs": [], "gpu_seconds": 0.0, "host_seconds": 0.0})
            if p["gpu"] or p["gpu_seconds"] or p["host_seconds"] or p["passes"]:
                total["jobs"].append(row["job"])
                total["gpu_seconds"] += p["gpu_seconds"]
                total["host_seconds"] += p["host_seconds"]
    return list(out.values())
