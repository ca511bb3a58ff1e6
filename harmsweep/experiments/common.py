"""What every experiment body needs beyond the run's context: tokenised sets, cached scores, masks, result.json.

Scores go through pipeline.stages.score, so they are cached by (model fingerprint, tokenised set, kind) like a
plain run's: a model changed by fine-tuning must carry a new fingerprint (``derived_lm``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

import torch

from harmsweep.cache import content_key
from harmsweep.calibration.pairs import Pair, encode_btap, encode_pairs, file_pairs
from harmsweep.devices import input_device
from harmsweep.experiments import save_figures
from harmsweep.experiments.matrices import Matrix
from harmsweep.models.loading import LoadedModel
from harmsweep.models.parts import head_dim
from harmsweep.pipeline.context import RunContext
from harmsweep.pipeline.result import record
from harmsweep.pipeline.stages import score
from harmsweep.pruning.select import select
from harmsweep.pruning.spec import PruneSpec

Tensors = dict[str, torch.Tensor]


def encode(ctx: RunContext, pairs: Sequence[Pair], max_length: int | None = None) -> Tensors:
    """Pairs tokenised with the run's template (``calibration.max_length`` unless given)."""
    return encode_pairs(ctx.lm.tokenizer, pairs, ctx.template, max_length or ctx.cfg.calibration.max_length)


def scoring_set(ctx: RunContext, pairs: Sequence[Pair], side: str) -> Tensors:
    """Pairs to score on the ``side`` (harmful or benign) of a set difference, tokenised as calibration.format says:
    the run's template, or the authors' raw text (calibration=btap), like a plain run's calibration sets."""
    cal = ctx.cfg.calibration
    if cal.format == "btap":
        return encode_btap(ctx.lm.tokenizer, pairs, side, cal.separator, cal.max_length)
    return encode(ctx, pairs)


def benign_set(ctx: RunContext) -> Tensors:
    """The benign calibration pairs (the dataset's own responses), tokenised."""
    return scoring_set(ctx, file_pairs(ctx.splits.benign_cal, "benign calibration data"), "benign")


def score_sets(
    ctx: RunContext, harmful: Tensors, benign: Tensors, lm: LoadedModel | None = None, spec: PruneSpec | None = None
) -> dict[str, Any]:
    """The scores ``spec`` needs, harm side on ``harmful``, benign side on ``benign`` (cached)."""
    spec = spec or ctx.spec
    sets = {"harmful": harmful, "benign": benign}
    out = {}
    for kind in sorted(spec.needed_scores()):
        out[kind], _, computed = ctx.timed(f"score_{kind}", lambda k=kind: score(ctx, sets, k, spec, lm))
        ctx.computed[f"scores_{kind}"] = ctx.computed.get(f"scores_{kind}", False) or computed
    return out


def select_mask(
    ctx: RunContext, harmful: Tensors, benign: Tensors, lm: LoadedModel | None = None, spec: PruneSpec | None = None
) -> dict[str, torch.Tensor]:
    """The pruned set of ``spec`` (default: the run's) for this harmful/benign calibration."""
    lm, spec = lm or ctx.lm, spec or ctx.spec
    scores = score_sets(ctx, harmful, benign, lm, spec)
    weights = {n: p for n, p in lm.model.named_parameters() if n in ctx.params}
    head = head_dim(lm.model) if spec.granularity == "head" else None
    device = input_device(lm.model)  # rank where the model is, like a plain run (scores come back on the host)
    return ctx.timed("mask", lambda: select(spec, ctx.params, weights, scores, device=device, head_dim=head))


def derived_lm(lm: LoadedModel, model: torch.nn.Module, recipe: Mapping[str, Any]) -> LoadedModel:
    """The same tokenizer with a changed model: a new fingerprint so cached scores never mix them up."""
    return replace(lm, model=model, fingerprint=content_key(lm.fingerprint, dict(recipe)))


def spec_with(spec: PruneSpec, **changes: Any) -> PruneSpec:
    out = replace(spec, **changes)
    out.validate()
    return out


def finish(
    ctx: RunContext, metrics: Mapping[str, Any], figures: Mapping[str, Matrix], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write the figures and result.json (last, so its presence means done); returns the result."""
    return record(ctx, {
        "experiment": ctx.cfg.experiment,
        "n_scored": ctx.n_scored(),
        "metrics": dict(metrics),
        "figures": save_figures(figures, ctx.run_dir),
        "pruning": asdict(ctx.spec),
        "computed": ctx.computed,
        **(extra or {}),
    })  # fmt: skip
