"""Experiment 2, generality across harm types: is there one mechanism, or one per category?

For each harm category c: calibrate on c alone, prune TopK(H_c) minus the benign set at the run's
sparsity, and measure harm on the held-out prompts of every category c'. Rows are the pruned sets,
columns the evaluated categories:
  transfer_nll          NLL increase of c''s held-out harmful references (judge-free, always)
  transfer_likelihood   relative reduction of their per-token likelihood, 1 - exp(-dNLL)
  transfer_<judge>      1 - score_after / score_before of each configured judge (generations)
  overlap_*             |P_a & P_b| / |P_a| and Jaccard of the pruned sets, with chance K/N beside them
Control rows: a set calibrated on *benign* data (same rule, same size) and a random set of the same size.
A shared mechanism shows as large off-diagonal transfer and overlap far above chance.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from harmsweep.calibration.pairs import file_pairs
from harmsweep.calibration.sets import calibrate, held_out_splits
from harmsweep.config.eval_checks import eval_file
from harmsweep.config.schema import Config
from harmsweep.data import load_records
from harmsweep.data.records import norm_prompt
from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.likelihood import mean_response_nll
from harmsweep.evaluation.spec import JUDGES, metric_plan
from harmsweep.evaluation.suite import HeldOut, Suite
from harmsweep.experiments.common import finish, scoring_set, select_mask, spec_with
from harmsweep.experiments.matrices import Matrix, mask_size, overlap_matrix, transfer_matrix
from harmsweep.intervals import with_stage
from harmsweep.pipeline.context import RunContext
from harmsweep.pruning.masks import pruned

log = logging.getLogger(__name__)
CONTROLS = ("benign", "random")


def run(ctx: RunContext) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cfg, spec = ctx.cfg, ctx.spec
    ch = cfg.cross_harm
    assert ch is not None, "config.checks requires the cross_harm block"
    unknown = sorted(set(ch.controls) - set(CONTROLS))
    if unknown:
        raise HarmsweepError(f"cross_harm.controls: unknown {', '.join(unknown)} (known: {', '.join(CONTROLS)})")
    categories = _categories(cfg)
    per_cat = {c: _category(ctx, c) for c in categories}
    benign = next(iter(per_cat.values()))["sets"]["benign"]  # the same benign split for every category

    masks = {c: select_mask(ctx, per_cat[c]["sets"]["harmful"], benign) for c in categories}
    if "benign" in ch.controls:
        masks["control: benign"] = select_mask(ctx, _control_set(ctx, ch.control_benign), benign)
    if "random" in ch.controls:
        k = round(sum(mask_size(m) for m in masks.values()) / len(masks))
        random_spec = spec_with(spec, rule="random", sparsity=k / ctx.n_scored())
        masks["control: random"] = select_mask(ctx, benign, benign, spec=random_spec)

    judges = _judges(cfg)
    suite = _suite(ctx, per_cat, judges)
    refs = {c: per_cat[c]["sets"]["eval_harmful"] for c in categories}
    ben_refs = next(iter(per_cat.values()))["sets"]["eval_benign"]
    before = ctx.timed("evaluate_before", lambda: _measure(ctx, refs, ben_refs, suite, "before", judges, categories))
    after = {}
    for row, mask in masks.items():
        with pruned(ctx.lm.model, mask):
            if suite is not None:
                suite.mask = mask
            after[row] = ctx.timed(
                "evaluate_rows", lambda r=row: _measure(ctx, refs, ben_refs, suite, r, judges, categories)
            )
        if suite is not None:
            suite.mask = None

    figures = _figures(before, after, masks, categories, judges, ctx.n_scored())
    items = [
        {"stage": row, "metric": metric, "category": target, "score": value}
        for row, measured in {"before": before, **after}.items()
        for metric, by_target in measured.items()
        for target, value in by_target.items()
    ]
    metrics = _summary(figures, categories, masks)
    extra = {"categories": categories, "rows": list(masks), "judges": judges,
             "n_pruned": {row: mask_size(m) for row, m in masks.items()}}  # fmt: skip
    return finish(ctx, metrics, figures, extra), items


def _categories(cfg: Config) -> list[str]:
    wanted = cfg.cross_harm.categories if cfg.cross_harm else None
    data = cfg.data.harmful
    found = sorted({str(r.category) for r in load_records(data.name, cfg.data.root, file=data.file) if r.category})
    if wanted:
        missing = [c for c in wanted if c not in found]
        if missing:
            raise HarmsweepError(f"cross_harm.categories: {missing[0]!r} is not a category of data.harmful "
                                 f"({data.name}: {', '.join(found) or 'none'})")  # fmt: skip
        found = list(wanted)
    if len(found) < 2:
        raise HarmsweepError(f"cross_harm needs at least 2 harm categories; data.harmful={data.name} has {found}")
    return found


def _category(ctx: RunContext, category: str) -> dict[str, Any]:
    """Calibration and held-out sets of one category (cached like a plain run's)."""
    cfg = ctx.cfg
    data = replace(cfg.data, harmful=replace(cfg.data.harmful, categories=[category]))
    splits = held_out_splits(cfg.calibration, data, cfg.eval.n, cfg.seed, exclude=_excluded(ctx),
                             basename=cfg.btap_basename())  # fmt: skip
    sets, _, computed = ctx.timed("calibrate", lambda: calibrate(
        cfg.calibration, ctx.lm, ctx.template, splits, ctx.root, dtype=cfg.model.dtype,
        benign_references=cfg.eval.benign_references))  # fmt: skip
    ctx.computed[f"calibration/{category}"] = computed
    return {"splits": splits, "sets": sets}


def _excluded(ctx: RunContext) -> set[str]:
    from harmsweep.alignment.derive import trained_prompts

    return trained_prompts(ctx.lm.source, ctx.cfg.paths.cache_dir)


def _control_set(ctx: RunContext, dataset: str) -> dict[str, torch.Tensor]:
    """Benign pairs from another source, calibrated exactly like a harm category (the 'benign' control row)."""
    used = {norm_prompt(r.prompt) for r in ctx.splits.benign_cal + ctx.splits.benign_eval}
    pool = [r for r in load_records(dataset, ctx.cfg.data.root) if r.response and norm_prompt(r.prompt) not in used]
    n = ctx.cfg.calibration.n
    if len(pool) < n:
        raise HarmsweepError(f"cross_harm.control_benign={dataset} has {len(pool)} usable pairs; calibration.n={n}")
    pool = sorted(pool, key=lambda r: len(r.prompt) + len(r.response or ""))[: 4 * n]  # short ones fit max_length
    return scoring_set(ctx, file_pairs(random.Random(ctx.cfg.seed).sample(pool, n), "control pairs"), "harmful")


def _judges(cfg: Config) -> list[str]:
    asked = list(cfg.cross_harm.judges) if cfg.cross_harm else []
    unknown = [j for j in asked if j not in JUDGES]
    if unknown:
        raise HarmsweepError(f"cross_harm.judges: {unknown[0]} is not a judge ({', '.join(JUDGES)})")
    run, skipped = metric_plan(replace(cfg.eval, metrics=asked), cfg.judges)
    for name, why in skipped.items():
        log.warning("cross_harm: judge %s skipped: %s", name, why)
    return run


def _suite(ctx: RunContext, per_cat: Mapping[str, Any], judges: list[str]) -> Suite | None:
    """One suite over every category's held-out prompts: judge means come back per category."""
    if not judges:
        return None
    harmful = [r for c in per_cat for r in per_cat[c]["splits"].harmful_eval]
    first = next(iter(per_cat.values()))
    ev = replace(ctx.cfg.eval, metrics=judges)
    held = HeldOut(harmful, first["splits"].benign_eval, {})
    gen = ctx.cfg.eval.generation
    prefix_file = eval_file(ctx.cfg, gen.prefix_file, "eval.generation.prefix_file") if gen.prefix == "file" else None
    return Suite(ev, ctx.judges(), ctx.lm, ctx.template, held, ctx.cfg.seed, logits_chunk=ctx.cfg.model.logits_chunk,
                 download=ctx.cfg.data.download, prefix_file=prefix_file)  # fmt: skip


def _measure(ctx, refs, ben_refs, suite: Suite | None, stage: str, judges: list[str], categories: list[str]):
    """metric -> category -> value for the model as it is now (one row of every matrix)."""
    batch, chunk = ctx.cfg.eval.batch_size, ctx.cfg.model.logits_chunk
    out: dict[str, dict[str, float | None]] = {
        "nll_harmful": {c: mean_response_nll(ctx.lm.model, refs[c], batch, logits_chunk=chunk) for c in categories},
        "nll_benign": {"benign": mean_response_nll(ctx.lm.model, ben_refs, batch, logits_chunk=chunk)},
    }
    if suite is not None:
        metrics, _ = suite.run(stage)
        for judge in judges:
            prefix = JUDGES[judge]
            out[judge] = {c: _number(metrics.get(with_stage(f"{prefix}_mean/{c}", stage))) for c in categories}
    return out


def _number(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _figures(before, after, masks, categories, judges, n_total) -> dict[str, Matrix]:
    nll_after = {row: m["nll_harmful"] for row, m in after.items()}
    likelihood = {c: math.exp(-v) for c, v in before["nll_harmful"].items()}
    likelihood_after = {row: {c: math.exp(-v) for c, v in m.items()} for row, m in nll_after.items()}
    figures = {
        "transfer_nll": transfer_matrix(before["nll_harmful"], nll_after, "delta"),
        "transfer_likelihood": transfer_matrix(likelihood, likelihood_after, "relative_reduction"),
        "utility": Matrix(
            rows=list(after),
            cols=["delta_nll_benign", "n_pruned"],
            values=[
                [after[r]["nll_benign"]["benign"] - before["nll_benign"]["benign"], mask_size(masks[r])] for r in after
            ],
            kind="values",
            note="benign NLL increase and pruned count per row: utility cost of each pruned set",
        ),
    }
    for judge in judges:
        figures[f"transfer_{judge}"] = transfer_matrix(before[judge], {r: m[judge] for r, m in after.items()},
                                                       "relative_reduction")  # fmt: skip
    figures["overlap_intersection"], figures["overlap_jaccard"] = overlap_matrix(masks, n_total)
    return figures


def _summary(figures: Mapping[str, Matrix], categories: list[str], masks: Mapping[str, Any]) -> dict[str, float]:
    """Diagonal vs off-diagonal means (and control rows) of each matrix: the headline numbers."""
    out: dict[str, float] = {}
    for name, fig in figures.items():
        if name == "utility":
            continue
        diag = [fig.cell(c, c) for c in categories]
        off = [fig.cell(a, b) for a in categories for b in categories if a != b]
        out[f"{name}/diagonal"] = _mean(diag)
        out[f"{name}/off_diagonal"] = _mean(off)
        for row in masks:
            if row.startswith("control: ") and row in fig.rows:
                cols = categories if name.startswith("transfer") else [c for c in fig.cols if c != row]
                out[f"{name}/{row.removeprefix('control: ')}_control"] = _mean([fig.cell(row, c) for c in cols])
        if fig.chance is not None:
            out[f"{name}/chance"] = fig.chance
    return out


def _mean(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else math.nan
