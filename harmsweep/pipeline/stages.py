"""The stages between loading and recording, in run order: calibrate -> score -> select -> replace -> evaluate.

Calibration sets, score sets and the unpruned evaluation are shared artifacts, cached by content (a sweep
computes each once); the mask is the run's own. Every stage reads the run's typed context; experiments
call the same stages with a changed model or rule.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from harmsweep.artifacts import write_json
from harmsweep.attacks.apply import Attacker
from harmsweep.attacks.spec import weight_attack
from harmsweep.batches import iter_batches
from harmsweep.cache import VERSIONS, cached, content_key, file_sha256, replaced, tensor_key, write_key_info
from harmsweep.calibration.sets import calibrate
from harmsweep.config.eval_checks import eval_file
from harmsweep.devices import input_device
from harmsweep.evaluation.spec import EvalConfig, judges_key, metric_plan, without_later_defaults
from harmsweep.evaluation.suite import HeldOut, Suite
from harmsweep.intervals import samples_to_json
from harmsweep.models.base_weights import base_values
from harmsweep.models.loading import LoadedModel
from harmsweep.models.parts import head_dim, scored_parameters
from harmsweep.pipeline.context import RunContext
from harmsweep.pipeline.given_masks import given, given_mask
from harmsweep.pruning.masks import alpha_values, apply_mask, load_mask, save_mask
from harmsweep.pruning.select import select
from harmsweep.pruning.sequential import select_sequential
from harmsweep.pruning.spec import PruneSpec
from harmsweep.scoring.snip import score_kind
from harmsweep.scoring.spec import ScoringOptions
from harmsweep.scoring.store import Layout, ScoreSet, open_scores
from harmsweep.scoring.writer import write as write_scores

log = logging.getLogger(__name__)
Sets = Mapping[str, dict[str, torch.Tensor]]  # the tokenised calibration sets: harmful, benign, eval_*


def calibration_sets(ctx: RunContext) -> tuple[dict[str, dict[str, torch.Tensor]], Path]:
    """The run's calibration and reference sets (cached by content) and their cache entry."""
    cfg = ctx.cfg

    def make() -> tuple[dict[str, dict[str, torch.Tensor]], Path, bool]:
        return calibrate(cfg.calibration, ctx.lm, ctx.template, ctx.splits, ctx.root, dtype=cfg.model.dtype,
                         benign_references=cfg.eval.benign_references, references=_references_read(cfg))  # fmt: skip

    sets, entry, ctx.computed["calibration"] = ctx.timed("calibrate", make)
    return sets, entry


def _references_read(cfg: Any) -> bool:
    """Whether anything reads the held-out reference responses: harm likelihood, and the experiments' own measures."""
    return "harm_likelihood" in metric_plan(cfg.eval, cfg.judges)[0] or cfg.experiment in ("cross_harm", "em",
                                                                                           "dissociation")  # fmt: skip


def score(
    ctx: RunContext, sets: Sets, kind: str, spec: PruneSpec | None = None, lm: LoadedModel | None = None
) -> tuple[ScoreSet, Path, bool]:
    """Scores of kind ``harm_*`` (on sets["harmful"]) or ``benign_*`` (sets["benign"]), cached by the
    tokenised set's content, so runs whose calibration differs only on the other side share them.

    A compact set (the default) is keyed by the ranking ``spec`` reads and its unit (``spec.granularity``),
    not by how much it keeps: its header records that. ``scores.keep*`` (auto: what ``spec`` reads, at least
    a floor covering the paper's range) is what this run needs; a stored set keeping at least that serves
    it (a sparsity sweep shares one), a shorter one is scored again with this need and replaced, under the
    entry's lock. ``spec`` and ``lm`` default to the run's (experiments score changed models and other rules).
    """
    from harmsweep.scoring.spec import StoreSpec

    spec, lm, cfg = spec or ctx.spec, lm or ctx.lm, ctx.cfg
    tensors = sets["harmful" if kind.startswith("harm") else "benign"]
    batch = scoring_batch(cfg)
    layout = Layout.read_by(cfg.scores.resolved(*StoreSpec.needs(spec)), kind, spec.benign_importance,
                            spec.granularity)  # fmt: skip
    accumulate = {} if cfg.scoring.accumulate == "fp32" else {"accumulate": cfg.scoring.accumulate}  # old keys stay
    info = {"version": VERSIONS["scores"], "model": lm.fingerprint, "dtype": cfg.model.dtype,
            "set": tensor_key(tensors), "kind": kind, "batch_size": batch, "store": layout.key(), **accumulate}  # fmt: skip
    entry = ctx.root / "scores" / content_key(info)
    marker = "scores.safetensors"

    def make(e: Path) -> ScoreSet:
        return _score(lm, tensors, layout, batch, e / marker, info, cfg.scoring, cfg.model.logits_chunk)

    def load(e: Path) -> ScoreSet:
        return open_scores(e / marker)

    scores, computed = cached(entry, make, load, marker)
    if not layout.serves(scores):
        log.info("%s keeps %s of its ranking, this run needs %s: scoring it again", entry.name,
                 getattr(scores, "keep", "?"), layout.spec.fraction(kind))  # fmt: skip
        scores, computed = replaced(entry, make, load, marker, stale=lambda s: not layout.serves(s))
    return scores, entry / marker, computed


def _score(
    lm: LoadedModel,
    tensors: Mapping[str, torch.Tensor],
    layout: Layout,
    batch: int,
    path: Path,
    info: Mapping[str, Any],
    options: ScoringOptions,
    logits_chunk: int,
) -> ScoreSet:
    """Score, write (its tail and summaries, or every score), and hand back the file's view.

    The buffers stay where scoring left them (``scoring.offload`` is for buffers that outlive their pass):
    the write summarises each matrix on its device and moves only the results (a dense set: one matrix at
    a time), then the buffers are freed, so no GPU waits for a host-side summary.
    """
    from dataclasses import replace

    batches = scoring_batches(tensors, batch, options)
    kind = layout.kind
    n = tensors["input_ids"].size(0)
    scores = score_kind(lm.model, kind, batches, n, replace(options, offload=False), logits_chunk=logits_chunk)
    write_key_info(path.parent, info)
    rows = {n: p.rows_dim for n, p in scored_parameters(lm.model).items()}
    write_scores(scores, path, kind, layout.spec, layout.unit, layout.order, rows)
    del scores
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return open_scores(path)


def scoring_batch(cfg: Any) -> int:
    """The batch size scoring runs at: scoring.accumulate=bf16 scores one example per pass."""
    return 1 if cfg.scoring.accumulate == "bf16" else cfg.calibration.batch_size


def scoring_batches(tensors: Mapping[str, torch.Tensor], batch: int, options: ScoringOptions) -> list[dict]:
    """Length-grouped batches (a sum in fp32 does not depend on the order), or the set's order: a bf16 sum does."""
    if options.accumulate == "bf16":
        return list(iter_batches(tensors, 1))
    return list(iter_batches(tensors, batch, by_length=True))


def scoring_passes(ctx: RunContext, sets: Sets, kinds: list[str]) -> int:
    """Passes this run's scoring took: cached sets cost none; a sequential mask takes its passes per layer."""
    spec, batch = ctx.spec, scoring_batch(ctx.cfg)
    if spec.sequential:
        layers = len({p.layer for p in ctx.params.values()})
        return layers * sum(_passes(sets, k, batch) for k in spec.needed_scores())
    return sum(_passes(sets, k, batch) for k in kinds if ctx.computed[f"scores_{k}"])


def _passes(sets: Sets, kind: str, batch: int) -> int:
    """Passes that scoring ``kind`` takes: one per batch (a forward only for Wanda), or per sample (unsigned)."""
    n = sets["harmful" if kind.startswith("harm") else "benign"]["input_ids"].size(0)
    return n if kind.endswith("unsigned") else -(-n // batch)


def choose_mask(ctx: RunContext, sets: Sets) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The select stage: from cached score sets in one pass, or layer by layer (pruning.sequential).

    Returns the mask and the score files it read (none for a sequential mask: its scores live in memory).
    A resumed run reads its saved mask.
    """
    if given(ctx):  # pruning.mask_file or pruning.intersect: not this run's own selection
        return given_mask(ctx, score)
    spec, lm = ctx.spec, ctx.lm
    mask_path = ctx.run_dir / "mask.safetensors"
    device = input_device(lm.model)
    if mask_path.is_file():
        log.info("reusing %s", mask_path.name)
        ctx.timings["mask"] = 0.0
        return load_mask(mask_path), _score_paths(ctx, sets)
    if spec.sequential:
        batch, weights = scoring_batch(ctx.cfg), ctx.weights()

        def layer_scores(kind: str, names: list[str], layer: int) -> Mapping[str, torch.Tensor]:
            tensors = sets["harmful" if kind.startswith("harm") else "benign"]
            batches = scoring_batches(tensors, batch, ctx.cfg.scoring)
            return score_kind(
                lm.model,
                kind,
                batches,
                tensors["input_ids"].size(0),
                ctx.cfg.scoring,
                names,
                layer,
                ctx.cfg.model.logits_chunk,
            )

        def apply(chosen: Mapping[str, torch.Tensor]) -> None:
            apply_mask(lm.model, chosen, replacement(ctx, chosen))

        mask = ctx.timed("mask", lambda: select_sequential(spec, ctx.params, lm.model, layer_scores, apply, device))
        save_mask(mask, mask_path)
        return mask, {}
    score_paths, scores = {}, {}
    for kind in sorted(spec.needed_scores()):
        scores[kind], path, ctx.computed[f"scores_{kind}"] = ctx.timed(
            f"score_{kind}", lambda k=kind: score(ctx, sets, k)
        )
        score_paths[f"scores_{kind}"] = str(path)
    head = head_dim(lm.model) if spec.granularity == "head" else None
    weights = ctx.weights()
    mask = ctx.timed("mask", lambda: select(spec, ctx.params, weights, scores, device=device, head_dim=head))
    save_mask(mask, mask_path)
    return mask, score_paths


def _score_paths(ctx: RunContext, sets: Sets) -> dict[str, str]:
    """A resumed run's score files (cached: nothing is recomputed once they exist)."""
    if ctx.spec.sequential:
        return {}
    out = {}
    for kind in sorted(ctx.spec.needed_scores()):
        _, path, ctx.computed[f"scores_{kind}"] = score(ctx, sets, kind)
        out[f"scores_{kind}"] = str(path)
    return out


def replacement(ctx: RunContext, mask: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The masked entries' new values, read before any changes: pruning.replace=base, the base variant's (read
    tensor by tensor); pruning.alpha, the weights scaled or their mean; None: zeros."""
    if ctx.spec.replace != "base":
        return alpha_values(ctx.weights(), mask, ctx.spec.alpha)
    return base_values(ctx.cfg.model, "base", ctx.cfg.paths.cache_dir, mask, ctx.weights())


def remove_low_rank_in_place(ctx: RunContext, sets: Sets) -> dict[str, Any]:
    """method=lowrank: ActSVD removal in place; the per-matrix ranks and update sizes, and their summary."""
    from harmsweep.pruning.lowrank import remove_low_rank  # only method=lowrank runs need it

    spec, batch = ctx.cfg.lowrank, ctx.cfg.calibration.batch_size
    harmful = list(iter_batches(sets["harmful"], batch, by_length=True))
    benign = list(iter_batches(sets["benign"], batch, by_length=True))
    stats = remove_low_rank(ctx.lm.model, harmful, benign, spec)
    norms, ranks = [s["relative_norm"] for s in stats.values()], [s["rank_removed"] for s in stats.values()]
    summary = {  # ranks actually removed: fewer than asked where the data hold fewer directions
        "rank_removed_mean": sum(ranks) / max(len(ranks), 1),
        "rank_removed_min": min(ranks, default=0),
        "relative_norm_mean": sum(norms) / max(len(norms), 1),
        "relative_norm_max": max(norms, default=0.0),
    }
    return {"spec": asdict(spec), "summary": summary, "per_matrix": stats}


def evaluation_suite(ctx: RunContext, sets: Sets) -> Suite:
    """The run's evaluation: the planned metrics on the held-out prompts and references."""
    held = HeldOut(
        ctx.splits.harmful_eval, ctx.splits.benign_eval, {k: sets[k] for k in ("eval_harmful", "eval_benign")}
    )
    cfg = ctx.cfg
    gen = cfg.eval.generation
    attacker = None
    if weight_attack(gen.attack):
        cal, splits = cfg.calibration, ctx.splits
        attacker = Attacker(gen.attack, cfg.attack, ctx.lm, ctx.template, fmt=cal.format, benign_side=splits.benign_as,
                            harmful=splits.harmful_cal, benign=splits.benign_cal, max_length=cal.max_length,
                            batch_size=scoring_batch(cfg), gen_batch=cal.gen_batch_size, seed=cfg.seed,
                            options=cfg.scoring, logits_chunk=cfg.model.logits_chunk)  # fmt: skip
    prefix_file = eval_file(cfg, gen.prefix_file, "eval.generation.prefix_file") if gen.prefix == "file" else None
    return Suite(cfg.eval, ctx.judges(), ctx.lm, ctx.template, held, cfg.seed, logits_chunk=cfg.model.logits_chunk,
                 download=cfg.data.download, attacker=attacker, prefix_file=prefix_file)  # fmt: skip


def evaluate(suite: Suite, stage: str, path: Path | None, info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One stage's metrics, per-item rows and per-item values (the bootstrap's input)."""
    metrics, items = suite.run(stage)
    out = {"metrics": metrics, "items": items, "samples": samples_to_json(suite.samples(stage))}
    if path is not None:
        write_key_info(path.parent, info or {})
        write_json(out, path)
    return out


def _eval_key(ev: EvalConfig) -> dict[str, Any]:
    """The eval block as it keys the cached unpruned evaluation: later settings at their defaults left out, so
    evaluations cached before them stay found."""
    return without_later_defaults(asdict(ev))


def _inputs_key(cfg: Any) -> dict[str, Any]:
    """What keys the cached unpruned evaluation beyond the eval block: the attack's settings and the files that the
    evaluation reads, by content (a file edited in place is a new evaluation); nothing when they are at their
    defaults, so evaluations cached before them stay found."""
    out: dict[str, Any] = {}
    kind = weight_attack(cfg.eval.generation.attack)
    if kind:
        out["attack"] = asdict(getattr(cfg.attack, kind))
    ev = cfg.eval
    files = {"harmful_file": ev.harmful_file, "prefix_file": ev.generation.prefix_file,
             "attack_file": getattr(cfg.attack, kind).file if kind else None, "perplexity_file": ev.perplexity.file,
             "triviaqa_file": ev.triviaqa.file, "alpaca_file": ev.alpaca.file, "financial_file": ev.financial.file,
             "counterfact_file": ev.detection.counterfact_file}  # fmt: skip
    for name, value in files.items():
        path = eval_file(cfg, value, name) if value else None
        if path is not None and path.is_file():
            out[f"{name}_sha256"] = file_sha256(path)
    return out


def evaluate_before(ctx: RunContext, sets: Sets, cal_entry: Path) -> tuple[Suite, dict[str, Any], Path]:
    """The unpruned model's evaluation, cached like scores (the same for every rule and sparsity).

    Returns the suite (which evaluates the pruned model after), the evaluation and its file.
    """
    cfg = ctx.cfg
    run_suite = evaluation_suite(ctx, sets)
    info = {"version": VERSIONS["eval"], "calibration": cal_entry.name, "eval": _eval_key(cfg.eval),
            "judges": judges_key(cfg.judges), "seed": cfg.seed, **_inputs_key(cfg)}  # fmt: skip
    if cfg.pruning.finetune_before:  # the unpruned model is the tuned one
        info["model"] = ctx.lm.fingerprint
    gen = cfg.eval.generation
    if gen.do_sample or gen.sampling == "model":  # answers sampled per prompt (generation/seeded.py) since 0.5
        info["sampler"] = "per-prompt-gumbel"
    entry = ctx.root / "eval_before" / content_key(info)

    def make() -> tuple[dict[str, Any], bool]:
        return cached(
            entry,
            lambda e: evaluate(run_suite, "before", e / "eval_before.json", info),
            lambda e: json.loads((e / "eval_before.json").read_text()),
            "eval_before.json",
        )

    before, ctx.computed["eval_before"] = ctx.timed("evaluate_before", make)
    return run_suite, before, entry / "eval_before.json"
