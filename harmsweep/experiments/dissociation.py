"""Experiment 4, dissociation: pruning harm generation should leave recognising and refusing harm intact.

Arms, each measured with the run's evaluation suite (harm likelihood, judged harmfulness under the
configured attack, refusal rate on plain prompts, recognition "is this harmful?", perplexity) plus the
likelihood of held-out refusals:
  unpruned         the reference
  harm_pruned      the paper's rule on harmful responses
  refusal_pruned   the same rule calibrated on *refusals* to harmful prompts: the double-dissociation
                   control, expected to show the opposite pattern (refusals break, harm does not drop)
  harm_pruned_recovered   the harm-pruned model after fine-tuning on harmful pairs
Recovery: harm NLL against fine-tuning steps on the calibration's harmful pairs (``recovery`` curve).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from harmsweep.alignment.finetune import finetune
from harmsweep.calibration.pairs import file_pairs
from harmsweep.config.schema import DissociationConfig
from harmsweep.data import load_records
from harmsweep.data.records import norm_prompt
from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.likelihood import mean_response_nll
from harmsweep.experiments.common import encode, finish, scoring_set, select_mask
from harmsweep.experiments.matrices import Matrix, mask_size, overlap_matrix
from harmsweep.intervals import run_intervals
from harmsweep.pipeline.context import RunContext
from harmsweep.pipeline.stages import calibration_sets, evaluation_suite
from harmsweep.pruning.masks import apply_mask, mask_counts, pruned

ARMS = ("unpruned", "harm_pruned", "refusal_pruned", "harm_pruned_recovered")


def run(ctx: RunContext) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cfg, dis = ctx.cfg, ctx.cfg.dissociation
    assert dis is not None, "config.checks requires the dissociation block"
    sets, _ = calibration_sets(ctx)
    refusal_cal, refusal_eval = _refusal_sets(ctx, dis)
    masks = {
        "harm_pruned": select_mask(ctx, sets["harmful"], sets["benign"]),
        "refusal_pruned": select_mask(ctx, refusal_cal, sets["benign"]),
    }
    suite = evaluation_suite(ctx, sets)
    batch, chunk = cfg.eval.batch_size, cfg.model.logits_chunk

    def measure(stage: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        metrics, items = ctx.timed(f"evaluate_{stage}", lambda: suite.run(stage))
        metrics = {k.replace(f"_{stage}", "", 1): v for k, v in metrics.items()}
        metrics["nll_refusal"] = mean_response_nll(ctx.lm.model, refusal_eval, batch, logits_chunk=chunk)
        return metrics, items

    arms: dict[str, dict[str, Any]] = {}
    items: list[dict[str, Any]] = []
    arms["unpruned"], rows = measure("unpruned")
    items += rows
    for arm, mask in masks.items():
        with pruned(ctx.lm.model, mask):
            suite.mask = mask
            arms[arm], rows = measure(arm)
        suite.mask = None
        items += rows

    curve = None
    if dis.recovery_steps > 0:
        curve = _recover(ctx, dis, masks["harm_pruned"], sets)
        arms["harm_pruned_recovered"], rows = measure("harm_pruned_recovered")
        items += rows
    figures = {"dissociation": _table(arms)}
    if curve is not None:
        figures["recovery"] = curve
    figures["overlap_intersection"], figures["overlap_jaccard"] = overlap_matrix(masks, ctx.n_scored())
    metrics = {f"{name}/{arm}": value for arm, measured in arms.items() for name, value in measured.items()
               if isinstance(value, int | float)}  # fmt: skip
    for arm, mask in masks.items():
        metrics[f"n_pruned/{arm}"] = mask_size(mask)
    boot = cfg.bootstrap
    unpruned = suite.samples("unpruned")  # each arm against the unpruned model, paired over the same prompts
    intervals = {arm: run_intervals(unpruned, suite.samples(arm), boot) for arm in arms if arm != "unpruned"}
    extra = {"arms": list(arms), "pruned_counts": {arm: mask_counts(ctx.params, m) for arm, m in masks.items()},
             "intervals": {"settings": boot.describe(), "arms": intervals}}  # fmt: skip
    return finish(ctx, metrics, figures, extra), items


def _refusal_sets(ctx: RunContext, dis: DissociationConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Refusal pairs: calibration ones never on a held-out prompt; evaluation ones for held-out prompts first."""
    if dis.refusals_file:
        records = load_records("custom", None, file=dis.refusals_file)
    else:
        records = load_records(dis.refusals, ctx.cfg.data.root)
    first: dict[str, Any] = {}
    for r in records:
        if r.response:
            first.setdefault(norm_prompt(r.prompt), r)
    held = {norm_prompt(r.prompt) for r in ctx.splits.harmful_eval}
    n = ctx.cfg.calibration.n
    n_eval = len(ctx.splits.harmful_eval) if ctx.cfg.eval.n is None else ctx.cfg.eval.n
    evaluation = [r for key, r in first.items() if key in held][:n_eval]
    rest = [r for key, r in first.items() if key not in held]
    rng = random.Random(ctx.cfg.seed)
    rng.shuffle(rest)
    evaluation += rest[n : n + n_eval - len(evaluation)]
    if len(rest) < n or not evaluation:
        raise HarmsweepError(f"dissociation needs {n} refusal pairs for calibration and some for evaluation; "
                             f"{dis.refusals_file or dis.refusals} has {len(first)} prompts")  # fmt: skip
    scored = scoring_set(ctx, file_pairs(rest[:n], "refusal pairs"), "harmful")
    return scored, encode(ctx, file_pairs(evaluation, "refusal pairs"))


def _recover(ctx: RunContext, dis: DissociationConfig, mask, sets) -> Matrix:
    """Fine-tune the harm-pruned model on harmful pairs; harm/benign NLL every few steps."""
    spec = replace(dis.finetune, max_steps=dis.recovery_steps)
    every, batch, chunk = dis.recovery_every, ctx.cfg.eval.batch_size, ctx.cfg.model.logits_chunk
    model = ctx.lm.model
    apply_mask(model, mask)
    rows: dict[str, list[float]] = {}

    def point(step: int, loss: float) -> None:
        if step % every == 0 or step == spec.steps(sets["harmful"]["input_ids"].size(0)):
            rows[str(step)] = [mean_response_nll(model, sets["eval_harmful"], batch, logits_chunk=chunk),
                               mean_response_nll(model, sets["eval_benign"], batch, logits_chunk=chunk), loss]  # fmt: skip

    point(0, math.nan)
    ctx.timed("recovery", lambda: finetune(model, sets["harmful"], spec, on_step=point))
    curve = Matrix(
        rows=list(rows), cols=["nll_harmful", "nll_benign", "train_loss"], values=list(rows.values()),
        kind="curve", note="recovery: held-out harmful/benign NLL of the harm-pruned model vs fine-tuning steps "
        "on the harmful calibration pairs (row = optimizer step)",
    )  # fmt: skip
    return curve


def _table(arms: Mapping[str, Mapping[str, Any]]) -> Matrix:
    cols = sorted({k for m in arms.values() for k, v in m.items() if isinstance(v, int | float) and "/" not in k})
    values = [[_plain(m.get(c)) for c in cols] for m in arms.values()]
    return Matrix(
        rows=list(arms),
        cols=cols,
        values=values,
        kind="values",
        note="each arm's evaluation; harm pruning should move harm metrics, refusal pruning refusal ones",
    )


def _plain(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
