"""What every experiment body needs: the loaded model, its held-out splits, cached scores, masks, result.json.

Scores go through change.score, so they are cached by (model fingerprint, tokenised set, kind) like a
plain run's: a model changed by fine-tuning must carry a new fingerprint (``derived_lm``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers

import harmsweep
from harmsweep.alignment.derive import derivation, trained_prompts
from harmsweep.artifacts import write_json
from harmsweep.cache import content_key
from harmsweep.calibration.pairs import Pair, encode_pairs, file_pairs, resolve_template
from harmsweep.calibration.sets import Splits, held_out_splits
from harmsweep.experiments import save_figures
from harmsweep.experiments.matrices import Matrix
from harmsweep.models.loading import LoadedModel
from harmsweep.models.parts import ScoredParam, head_dim, scored_parameters
from harmsweep.pipeline.run import artifacts_root, load_run_model
from harmsweep.pipeline.stages import score
from harmsweep.pruning.select import select
from harmsweep.pruning.spec import PruneSpec

T = TypeVar("T")
Tensors = dict[str, torch.Tensor]


@dataclass
class Context:
    cfg: Mapping[str, Any]
    spec: PruneSpec
    lm: LoadedModel
    template: str
    splits: Splits
    root: Path
    run_dir: Path
    params: dict[str, ScoredParam]
    timings: dict[str, float] = field(default_factory=dict)
    computed: dict[str, bool] = field(default_factory=dict)

    def timed(self, name: str, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        out = fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        return out

    def encode(self, pairs: Sequence[Pair], max_length: int | None = None) -> Tensors:
        length = int(max_length or self.cfg["calibration"]["max_length"])
        return encode_pairs(self.lm.tokenizer, pairs, self.template, length)

    def benign_set(self) -> Tensors:
        """The benign calibration pairs (the dataset's own responses), tokenised."""
        return self.encode(file_pairs(self.splits.benign_cal, "benign calibration data"))

    def scores(self, harmful: Tensors, benign: Tensors, lm: LoadedModel | None = None,
               spec: PruneSpec | None = None) -> dict[str, dict[str, torch.Tensor]]:  # fmt: skip
        """The scores ``spec`` needs, harm side on ``harmful``, benign side on ``benign`` (cached)."""
        lm, spec = lm or self.lm, spec or self.spec
        sets = {"harmful": harmful, "benign": benign}
        out = {}
        for kind in sorted(spec.needed_scores()):
            out[kind], _, computed = self.timed(
                f"score_{kind}", lambda k=kind: score(lm, self.cfg, sets, k, self.root, spec)
            )
            self.computed[f"scores_{kind}"] = self.computed.get(f"scores_{kind}", False) or computed
        return out

    def mask(self, harmful: Tensors, benign: Tensors, lm: LoadedModel | None = None,
             spec: PruneSpec | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """The pruned set of ``spec`` (default: the run's) for this harmful/benign calibration."""
        lm, spec = lm or self.lm, spec or self.spec
        scores = self.scores(harmful, benign, lm, spec)
        weights = {n: p for n, p in lm.model.named_parameters() if n in self.params}
        head = head_dim(lm.model) if spec.granularity == "head" else None
        return self.timed("mask", lambda: select(spec, self.params, weights, scores, head_dim=head))

    def n_scored(self) -> int:
        named = dict(self.lm.model.named_parameters())
        return sum(named[n].numel() for n in self.params)


def open_context(cfg: Mapping[str, Any], spec: PruneSpec, run_dir: Path) -> Context:
    start = time.perf_counter()
    lm = load_run_model(cfg)
    template = resolve_template(lm.tokenizer, cfg["alignment"]["template"])
    splits = held_out_splits(cfg, exclude=trained_prompts(lm.source, cfg["paths"]["cache_dir"]))
    ctx = Context(cfg, spec, lm, template, splits, artifacts_root(cfg, run_dir), run_dir, scored_parameters(lm.model))
    ctx.timings["load"] = time.perf_counter() - start
    return ctx


def derived_lm(lm: LoadedModel, model: torch.nn.Module, recipe: Mapping[str, Any]) -> LoadedModel:
    """The same tokenizer with a changed model: a new fingerprint so cached scores never mix them up."""
    return replace(lm, model=model, fingerprint=content_key(lm.fingerprint, dict(recipe)))


def spec_with(spec: PruneSpec, **changes: Any) -> PruneSpec:
    out = replace(spec, **changes)
    out.validate()
    return out


def finish(
    ctx: Context,
    rid: str,
    metrics: Mapping[str, Any],
    figures: Mapping[str, Matrix],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the figures and result.json (last, so its presence means done); returns the result."""
    cfg = ctx.cfg
    result = {
        "run_id": rid,
        "experiment": cfg.get("experiment"),
        "model": cfg["model"]["name"],
        "alignment": cfg["alignment"]["name"],
        "model_source": ctx.lm.source,
        "model_fingerprint": ctx.lm.fingerprint,
        "derivation": derivation(ctx.lm.source, cfg["paths"]["cache_dir"]),
        "n_scored": ctx.n_scored(),
        "metrics": dict(metrics),
        "figures": save_figures(figures, ctx.run_dir),
        "pruning": dict(ctx.spec.__dict__),
        "computed": ctx.computed,
        "timings_s": {k: round(v, 3) for k, v in ctx.timings.items()},
        "versions": {
            "harmsweep": harmsweep.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        **(extra or {}),
        "config": dict(cfg),
    }
    write_json(result, ctx.run_dir / "result.json")
    return result
