"""One run: load -> calibrate -> score -> select -> evaluate before -> apply -> evaluate after -> record.

``run_pipeline`` takes the plain resolved config (Hydra stays in cli.py), checks it and converts it once into
a typed ``RunContext``; the stages (pipeline/stages.py) read only that. Every stage writes its artifact
atomically; a re-run loads finished artifacts instead of recomputing them, and a run whose result.json
exists is returned as is. result.json is written last, so its presence means done.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from harmsweep.artifacts import write_json, write_jsonl
from harmsweep.cache import mask_key
from harmsweep.calibration.pairs import PLAIN_TEMPLATE
from harmsweep.config.checks import check_config
from harmsweep.config.identity import RUN_FILE, another_run, run_id, stored_run_id
from harmsweep.config.schema import Config, to_config
from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.spec import COUNTS, JUDGES, metric_plan
from harmsweep.evaluation.suite import deltas
from harmsweep.intervals import derived_metrics, run_intervals, samples_from_json, samples_to_json
from harmsweep.pipeline.context import RunContext
from harmsweep.pipeline.finetuned import finetune_in_place, second_mask
from harmsweep.pipeline.result import record
from harmsweep.pipeline.stages import (
    calibration_sets,
    choose_mask,
    evaluate,
    evaluate_before,
    remove_low_rank_in_place,
    replacement,
    score,
    scoring_passes,
)
from harmsweep.pruning.masks import apply_mask, mask_counts
from harmsweep.pruning.spec import PruneSpec, asked_count
from harmsweep.tracking import open_tracker

log = logging.getLogger(__name__)
Body = Callable[[RunContext], tuple[dict[str, Any], list[dict[str, Any]]]]  # a run's stages -> result, items
Shared = Callable[[RunContext, Sequence[str]], dict[str, str]]  # a group's shared stages (score kinds) -> artifacts


def run_pipeline(
    plain: Mapping[str, Any],
    run_dir: Path,
    sweep: str | None = None,
    body: Body | None = None,
    check: Callable[[Config], None] | None = None,
    shared: Shared | None = None,
) -> dict[str, Any]:
    """Run (or finish, or return the finished) run of ``plain`` in ``run_dir``, logging it when configured.

    ``body``: an experiment's stages in place of one pruning run's, and ``check`` its own input checks (the
    command line picks both, so this package never imports the experiments built on it); ``shared`` its stages that
    a prepare job (``stage=prepare``) makes once for a group of runs.
    """
    cfg = to_config(plain)
    spec = check_config(cfg)
    rid = run_id(plain)
    if cfg.stage == "prepare":  # a launcher's job making its group's shared artifacts: no pruning, no W&B run
        if check is not None:
            check(cfg)
        return prepare(cfg, plain, spec, rid, run_dir, shared)
    if cfg.stage != "run":
        raise HarmsweepError(f"stage={cfg.stage} is not one of run, prepare")
    _claim(run_dir, rid, plain)
    (run_dir / "FAILED").unlink(missing_ok=True)  # a retry clears the previous failure
    result_path = run_dir / "result.json"
    if result_path.is_file():
        log.info("run %s is already done: %s", rid, result_path)
        return json.loads(result_path.read_text())
    if check is not None:  # before the model loads, so a typo'd file fails in a second
        check(cfg)
    check_endpoints(cfg)
    logger = cfg.logger
    logger = replace(logger, group=logger.group or sweep, job_type=logger.job_type or cfg.experiment)
    tracker = open_tracker(logger, run_id=rid, run_dir=run_dir, config=plain)
    failed = True
    try:
        torch.manual_seed(cfg.seed)
        ctx = RunContext.open(cfg, plain, rid, run_dir, spec)
        result, items = (body or _run)(ctx)
        _log_reused(result)
        mask = result.get("artifacts", {}).get("mask")
        tracker.log_result(result, items, Path(mask) if mask else None)
        failed = False
        return result
    finally:
        tracker.finish(failed=failed)


def _run(ctx: RunContext) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One pruning (or low-rank) run's stages; returns the result and the per-item rows (also in items.jsonl)."""
    cfg, spec, run_dir = ctx.cfg, ctx.spec, ctx.run_dir
    tuned: dict[str, Any] = {}
    if cfg.pruning.finetune_before:  # their --finetuning_before: everything below sees the tuned model
        tuned["before"] = ctx.timed("finetune_before", lambda: finetune_in_place(ctx, "before"))
    sets, cal_entry = calibration_sets(ctx)
    weights = ctx.weights()
    lowrank = cfg.method == "lowrank"
    mask: dict[str, torch.Tensor] = {}
    score_paths: dict[str, str] = {}
    values = None
    if not lowrank:
        mask, score_paths = choose_mask(ctx, sets)
        # read before the long evaluation, so an unreachable base checkpoint fails in the first minute
        values = ctx.timed("base_values", lambda: replacement(ctx, mask))
    kinds = sorted(k.removeprefix("scores_") for k in score_paths if k.startswith("scores_"))  # not mask_source
    suite, before, before_path = evaluate_before(ctx, sets, cal_entry)
    zeros_before = sum(int((w == 0).sum()) for w in weights.values())
    if lowrank:
        change = ctx.timed("lowrank", lambda: remove_low_rank_in_place(ctx, sets))
        changed = 0
    else:
        changed = apply_mask(ctx.lm.model, mask, values, count_changed=True)
        change = {**asdict(spec), **mask_counts(ctx.params, mask)}
        if cfg.pruning.finetune_after:  # their --finetuning_after: tune the pruned model, then score and prune again
            tuned["after"] = ctx.timed("finetune_after", lambda: finetune_in_place(ctx, "after", mask_key(mask)))
            first, mask = mask, {}
            mask, second_paths = second_mask(ctx, sets)
            score_paths.update(second_paths)
            changed = apply_mask(ctx.lm.model, mask, replacement(ctx, mask), count_changed=True)
            tuned["after"]["n_pruned_first"] = sum(int(i.numel()) for i in first.values())
            tuned["after"]["n_pruned_second"] = sum(int(i.numel()) for i in mask.values())
            change = {**asdict(spec), **mask_counts(ctx.params, mask)}
    suite.mask = mask  # generation engines that hold their own weights (vLLM) apply it too
    zeros_after = sum(int((w == 0).sum()) for w in weights.values())
    after = ctx.timed("evaluate_after", lambda: evaluate(suite, "after", None))
    items = before["items"] + after["items"]
    write_jsonl(items, run_dir / "items.jsonl")

    n_scored = sum(w.numel() for w in weights.values())
    n_pruned = sum(int(idx.numel()) for idx in mask.values())
    samples = {"before": samples_from_json(before.get("samples")), "after": samples_from_json(after["samples"])}
    intervals = run_intervals(samples["before"], samples["after"], cfg.bootstrap)
    metrics = {
        **before["metrics"],
        **after["metrics"],
        **deltas(before["metrics"], after["metrics"]),
        **derived_metrics(intervals),
        "n_pruned": n_pruned,
        "target_sparsity": None if lowrank else spec.sparsity,
        # weights this pruning changed (zeroed, or set to the base variant's values); selected weights that
        # held that value already (GGUF dequantisation leaves zeros) do not count
        "actual_sparsity": changed / n_scored,
        "zero_fraction_after": zeros_after / n_scored,
        **({f"lowrank/{k}": v for k, v in change["summary"].items()} if lowrank else {}),
    }
    run, skipped = metric_plan(cfg.eval, cfg.judges)
    result = record(ctx, {
        "template": ctx.template if ctx.template == "chat" else f"plain: {PLAIN_TEMPLATE!r}",
        "calibration_source": ctx.splits.source,
        **({"finetuned": tuned} if tuned else {}),
        **({"attack": {"name": cfg.eval.generation.attack, **suite.attacker.done}} if suite.attacker else {}),
        "n_scored": n_scored,
        "n_pruned": n_pruned,
        # what the sparsity asked for, where fixed in advance: fewer pruned means too few weights were eligible
        "n_asked": None if lowrank else asked_count(spec, {n: tuple(w.shape) for n, w in weights.items()}),
        "actual_sparsity": metrics["actual_sparsity"],
        "zero_fraction_before": zeros_before / n_scored,
        "metrics": metrics,
        "skipped_metrics": skipped,
        **({"perplexity_corpus": cfg.eval.perplexity.corpus} if "perplexity" in run else {}),  # never pool the two
        "judges": {**{name: suite.judge_versions().get(name) for name in run if name in JUDGES},
                   **suite.judge_versions()},
        "pruning": {"rule": "lowrank", "sparsity": None, "protect": None, **change["spec"]} if lowrank else change,
        **({"lowrank": change} if lowrank else {}),
        "intervals": {"settings": cfg.bootstrap.describe(), "metrics": intervals, "without": _without(metrics, intervals)},
        "samples": {stage: samples_to_json(s) for stage, s in samples.items()},
        "computed": ctx.computed,
        "scoring_passes": scoring_passes(ctx, sets, kinds),
        "artifacts": {
            "calibration": str(cal_entry / "calibration.safetensors"),
            **score_paths,
            **({} if lowrank else {"mask": str(run_dir / "mask.safetensors")}),
            "eval_before": str(before_path),
            "items": str(run_dir / "items.jsonl"),
        },
    })  # fmt: skip
    return result, items


ENDPOINT_JUDGES = {  # metric -> the endpoint judges it calls
    "strongreject_rubric": ("strongreject_rubric",),
    "alpaca_judge": ("alpaca_usefulness",),
    "explanation": ("explanation", "coherence"),  # explanation answers get a coherence score when it is configured
    "coherence": ("coherence",),
}


def check_endpoints(cfg: Config) -> None:
    """Every endpoint judge the run will call answers at its host and port, and its key is set: checked before the
    model loads, so an unreachable server stops the run in one line, not after the generation it would judge."""
    from harmsweep.evaluation.judges.endpoint import Endpoint

    planned = metric_plan(cfg.eval, cfg.judges)[0]
    called = {judge for metric, judges in ENDPOINT_JUDGES.items() if metric in planned for judge in judges}
    for judge in sorted(called):
        options = cfg.judges.get(judge) or {}
        if options.get("base_url"):
            endpoint = Endpoint.of(options)
            endpoint.require_key(f"judges.{judge}")
            endpoint.check_reachable(f"judges.{judge}")


def _claim(run_dir: Path, rid: str, plain: Mapping[str, Any]) -> None:
    """Mark the folder as this run's, or refuse one that holds another run's artifacts."""
    stored = stored_run_id(run_dir)
    if stored is not None:
        if stored != rid:
            raise HarmsweepError(another_run(run_dir, stored, rid))
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json({"run_id": rid, "config": dict(plain)}, run_dir / RUN_FILE)


def _without(metrics: Mapping[str, Any], intervals: Mapping[str, Any]) -> list[str]:
    """Measured figures that carry no interval (no per-item values: lm-eval), so the gap is on record."""
    counts = ("n_pruned", "target_sparsity", "actual_sparsity", "zero_fraction_after")
    return sorted(
        k for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k not in intervals and k not in counts
        and not k.split("/")[0].replace("_after", "_before").endswith(COUNTS)  # item counts (judge _n, _unscored)
    )  # fmt: skip


def prepare(
    cfg: Config, plain: Mapping[str, Any], spec: PruneSpec, rid: str, run_dir: Path, shared: Shared | None = None
) -> dict[str, Any]:
    """``stage=prepare``: a group's shared artifacts, made once before its runs start (harmsweep/sweep/launcher.py).

    Calibration, every score set in ``prepare_scores`` (``kind`` or ``kind@granularity@benign_importance``:
    compact score sets are keyed by the ranking and unit their readers use; null: what ``spec`` needs) and
    the unpruned evaluation, into the shared artifact cache; nothing is pruned. ``run_dir/prepare.json``,
    written last, lists what was made, so a relaunch needs no second prepare job. ``shared``: an experiment's own
    shared stages in place of these (experiment=orgad2026_em: the EM model, its answers, its evaluation, the scores).
    """
    torch.manual_seed(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "FAILED").unlink(missing_ok=True)
    wanted = cfg.prepare_scores
    entries = sorted(set(wanted)) if wanted is not None else sorted(spec.needed_scores())
    ctx = RunContext.open(cfg, plain, rid, run_dir, spec)
    artifacts = (shared or _shared_artifacts)(ctx, entries)
    for name, made in ctx.computed.items():
        log.info("%s %s: %s", "computed" if made else "reusing", name, artifacts.get(name, "(artifact cache)"))
    timings = ctx.timings
    result = {
        "run_id": rid,
        "experiment": "prepare",
        "stage": "prepare",
        "model": cfg.model.name,
        "alignment": cfg.alignment.name,
        "prepared_scores": entries,
        "computed": ctx.computed,
        "artifacts": artifacts,
        "metrics": {f"seconds_{k}": round(v, 3) for k, v in timings.items()},
        "figures": {},  # cli.summary prints it like an experiment's result: its timings
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    write_json(result, run_dir / "prepare.json")
    return result


def _shared_artifacts(ctx: RunContext, entries: Sequence[str]) -> dict[str, str]:
    """A pruning run's shared artifacts: calibration, the score sets ``entries`` and the unpruned evaluation."""
    spec = ctx.spec
    if ctx.cfg.pruning.finetune_before:  # the group's artifacts are the tuned model's
        finetune_in_place(ctx, "before")
    sets, cal_entry = calibration_sets(ctx)
    artifacts = {"calibration": str(cal_entry / "calibration.safetensors")}
    for entry in entries:
        kind, *layout = entry.split("@")
        variant = spec
        if layout:  # the ranking and unit of the run that reads it; nothing else of the spec keys a score set
            importance = layout[1] if len(layout) > 1 else spec.benign_importance
            variant = replace(spec, granularity=layout[0], benign_importance=importance)
        _, path, ctx.computed[f"scores_{entry}"] = ctx.timed(
            f"score_{entry}", lambda k=kind, v=variant: score(ctx, sets, k, v)
        )
        artifacts[f"scores_{entry}"] = str(path)
    _, _, before_path = evaluate_before(ctx, sets, cal_entry)
    artifacts["eval_before"] = str(before_path)
    return artifacts


def _log_reused(result: Mapping[str, Any]) -> None:
    """One line per shared artifact the run took from the cache (made by a prepare job or an earlier run)."""
    paths = result.get("artifacts") or {}
    for name, made in (result.get("computed") or {}).items():
        if not made:
            log.info("reusing %s: %s", name, paths.get(name, "(cached)"))
