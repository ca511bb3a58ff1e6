"""The stage of a run that changes the model: its score sets, its mask (one pass or layer by layer, zeros or
the base variant's values), or its low-rank removal.

Score sets are cached by the tokenised set's content (artifact cache), masks are the run's own
artifact; run.py calls these between calibration and evaluation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from harmsweep.batches import iter_batches
from harmsweep.cache import VERSIONS, cached, content_key, tensor_key, write_key_info
from harmsweep.config.checks import lowrank_spec, prune_spec
from harmsweep.devices import input_device
from harmsweep.models.base_weights import base_values
from harmsweep.models.loading import LoadedModel
from harmsweep.models.parts import ScoredParam, head_dim, scored_parameters
from harmsweep.pruning.masks import apply_mask, load_mask, save_mask
from harmsweep.pruning.select import select
from harmsweep.pruning.sequential import select_sequential
from harmsweep.pruning.spec import PruneSpec
from harmsweep.scoring.snip import ScoringOptions, score_kind
from harmsweep.scoring.store import Layout, ScoreSet, StoreSpec, open_scores
from harmsweep.scoring.store import write as write_scores

log = logging.getLogger(__name__)
T = TypeVar("T")
Sets = Mapping[str, dict[str, torch.Tensor]]  # the tokenised calibration sets: harmful, benign, eval_*


def timed(timings: dict[str, float], name: str, fn: Callable[[], T]) -> T:
    """fn(), with its seconds recorded under ``name``."""
    start = time.perf_counter()
    out = fn()
    timings[name] = time.perf_counter() - start
    return out


def score(
    lm: LoadedModel,
    cfg: Mapping[str, Any],
    sets: Mapping[str, dict[str, torch.Tensor]],
    kind: str,
    root: Path,
    spec: PruneSpec | None = None,
) -> tuple[ScoreSet, Path, bool]:
    """Scores of kind ``harm_*`` (on sets["harmful"]) or ``benign_*`` (sets["benign"]), cached by the
    tokenised set's content, so runs whose calibration differs only on the other side share them.

    A compact set (the default) is keyed by what it keeps too: the ranking ``spec`` reads, its unit
    (``spec.granularity``) and ``scores.keep*``; a sparsity sweep shares one.
    """
    spec = spec or prune_spec(cfg)
    tensors = sets["harmful" if kind.startswith("harm") else "benign"]
    batch = int(cfg["calibration"]["batch_size"])
    kept = StoreSpec.from_config(cfg.get("scores"))
    layout = Layout.read_by(kept, kind, spec.benign_importance, spec.granularity)
    info = {"version": VERSIONS["scores"], "model": lm.fingerprint, "dtype": cfg["model"]["dtype"],
            "set": tensor_key(tensors), "kind": kind, "batch_size": batch, "store": layout.key()}  # fmt: skip
    entry = root / "scores" / content_key(info)
    options = ScoringOptions.from_config(cfg.get("scoring"))
    scores, computed = cached(
        entry,
        lambda e: _score(lm, tensors, layout, batch, e / "scores.safetensors", info, options),
        lambda e: open_scores(e / "scores.safetensors"),
        "scores.safetensors",
    )
    return scores, entry / "scores.safetensors", computed


def _score(
    lm: LoadedModel,
    tensors: Mapping[str, torch.Tensor],
    layout: Layout,
    batch: int,
    path: Path,
    info: Mapping[str, Any],
    options: ScoringOptions,
) -> ScoreSet:
    """Score, write (its tail and summaries, or every score), and hand back the file's view: the full
    host copy is freed once the file is on disk."""
    batches = list(iter_batches(tensors, batch, by_length=True))
    kind = layout.kind
    scores = score_kind(lm.model, kind, batches, tensors["input_ids"].size(0), options)
    write_key_info(path.parent, info)
    rows = {n: p.rows_dim for n, p in scored_parameters(lm.model).items()}
    write_scores(scores, path, kind, layout.spec, layout.unit, layout.order, rows)
    del scores
    return open_scores(path)


def scoring_passes(
    spec: PruneSpec,
    params: Mapping[str, ScoredParam],
    sets: Sets,
    kinds: list[str],
    computed: Mapping[str, bool],
    batch: int,
) -> int:
    """Passes this run's scoring took: cached sets cost none; a sequential mask takes its passes per layer."""
    if spec.sequential:
        layers = len({p.layer for p in params.values()})
        return layers * sum(_passes(sets, k, batch) for k in spec.needed_scores())
    return sum(_passes(sets, k, batch) for k in kinds if computed[f"scores_{k}"])


def _passes(sets: Mapping[str, dict[str, torch.Tensor]], kind: str, batch: int) -> int:
    """Passes that scoring ``kind`` takes: one per batch (a forward only for Wanda), or per sample (unsigned)."""
    n = sets["harmful" if kind.startswith("harm") else "benign"]["input_ids"].size(0)
    return n if kind.endswith("unsigned") else -(-n // batch)


def choose_mask(
    cfg: Mapping[str, Any],
    spec: PruneSpec,
    lm: LoadedModel,
    sets: Sets,
    root: Path,
    params: Mapping[str, ScoredParam],
    weights: Mapping[str, torch.Tensor],
    run_dir: Path,
    timings: dict[str, float],
    computed: dict[str, bool],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The mask stage: from cached score sets in one pass, or layer by layer (pruning.sequential).

    Returns the mask and the score files it read (none for a sequential mask: its scores live in memory).
    """
    mask_path = run_dir / "mask.safetensors"
    device = input_device(lm.model)
    if mask_path.is_file():
        log.info("reusing %s", mask_path.name)
        timings["mask"] = 0.0
        return load_mask(mask_path), _score_paths(cfg, spec, lm, sets, root, computed)
    if spec.sequential:
        batch = int(cfg["calibration"]["batch_size"])
        options = ScoringOptions.from_config(cfg.get("scoring"))

        def layer_scores(kind: str, names: list[str], layer: int) -> dict[str, torch.Tensor]:
            tensors = sets["harmful" if kind.startswith("harm") else "benign"]
            batches = list(iter_batches(tensors, batch, by_length=True))
            return score_kind(lm.model, kind, batches, tensors["input_ids"].size(0), options, names, layer)

        def apply(chosen: Mapping[str, torch.Tensor]) -> None:
            apply_mask(lm.model, chosen, replacement(cfg, spec, chosen, weights))

        mask = timed(timings, "mask", lambda: select_sequential(spec, params, lm.model, layer_scores, apply, device))
        save_mask(mask, mask_path)
        return mask, {}
    score_paths = {}
    scores = {}
    for kind in sorted(spec.needed_scores()):
        start = time.perf_counter()
        scores[kind], path, computed[f"scores_{kind}"] = score(lm, cfg, sets, kind, root, spec)
        timings[f"score_{kind}"] = time.perf_counter() - start
        score_paths[f"scores_{kind}"] = str(path)
    head = head_dim(lm.model) if spec.granularity == "head" else None
    mask = timed(timings, "mask", lambda: select(spec, params, weights, scores, device=device, head_dim=head))
    save_mask(mask, mask_path)
    return mask, score_paths


def _score_paths(
    cfg: Mapping[str, Any], spec: PruneSpec, lm: LoadedModel, sets: Sets, root: Path, computed: dict[str, bool]
) -> dict[str, str]:
    """A resumed run's score files (cached: nothing is recomputed once they exist)."""
    if spec.sequential:
        return {}
    out = {}
    for kind in sorted(spec.needed_scores()):
        _, path, computed[f"scores_{kind}"] = score(lm, cfg, sets, kind, root, spec)
        out[f"scores_{kind}"] = str(path)
    return out


def replacement(
    cfg: Mapping[str, Any], spec: PruneSpec, mask: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    """pruning.replace=base: the base variant's values at the masked entries (read tensor by tensor)."""
    if spec.replace != "base":
        return None
    return base_values(cfg["model"], "base", cfg["paths"]["cache_dir"], mask, weights)


def remove_low_rank_in_place(cfg: Mapping[str, Any], lm: LoadedModel, sets: Sets) -> dict[str, Any]:
    """method=lowrank: ActSVD removal in place; the per-matrix ranks and update sizes, and their summary."""
    from harmsweep.pruning.lowrank import remove_low_rank

    spec = lowrank_spec(cfg)
    batch = int(cfg["calibration"]["batch_size"])
    harmful = list(iter_batches(sets["harmful"], batch, by_length=True))
    benign = list(iter_batches(sets["benign"], batch, by_length=True))
    stats = remove_low_rank(lm.model, harmful, benign, spec)
    norms = [s["relative_norm"] for s in stats.values()]
    summary = {
        "rank_removed_mean": sum(s["rank_removed"] for s in stats.values()) / max(len(stats), 1),
        "relative_norm_mean": sum(norms) / max(len(norms), 1),
        "relative_norm_max": max(norms, default=0.0),
    }
    return {"spec": dict(spec.__dict__), "summary": summary, "per_matrix": stats}
