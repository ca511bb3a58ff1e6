"""Masks the run does not select from its own scores: a given mask file (pruning.mask_file), or the intersection
of the masks several harmful calibration files give (pruning.intersect).

pruning.mask_file skips scoring: the file is read and checked against the model before anything is pruned.
pruning.intersect calibrates, scores and selects once per file with the run's rule; the benign side is the same
for every file, so its score set is computed once (score sets are cached by content). Both record where the mask
came from in ``<run_dir>/mask_source.json`` (artifact ``mask_source``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from harmsweep.alignment.derive import trained_prompts
from harmsweep.artifacts import write_json
from harmsweep.calibration.sets import calibrate, held_out_splits
from harmsweep.calibration.spec import CalibrationConfig
from harmsweep.data.btap import btap_files
from harmsweep.devices import input_device
from harmsweep.masks.compare import intersect
from harmsweep.models.parts import head_dim
from harmsweep.pipeline.context import RunContext
from harmsweep.pruning.masks import load_mask, save_mask
from harmsweep.pruning.select import select

log = logging.getLogger(__name__)
Sets = Mapping[str, dict[str, torch.Tensor]]
Score = Callable[..., tuple[Any, Path, bool]]  # stages.score: (ctx, sets, kind) -> score set, its file, computed?


def given(ctx: RunContext) -> bool:
    """Whether this run's mask comes from a file or an intersection rather than its own selection."""
    return ctx.spec.mask_file is not None or ctx.spec.intersect is not None


def given_mask(ctx: RunContext, score: Score) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The run's mask and its ``mask_source`` record; a resumed run reads both back.

    ``score``: stages.score, passed in (the stages call this module, so it cannot import them back).
    """
    spec = ctx.spec  # its files and combinations were checked with the config (masks.options.check_given)
    mask_path, source = ctx.run_dir / "mask.safetensors", ctx.run_dir / "mask_source.json"
    if mask_path.is_file() and source.is_file():
        log.info("reusing %s (%s)", mask_path.name, source.name)
        ctx.timings["mask"] = 0.0
        return load_mask(mask_path), {"mask_source": str(source)}
    if spec.mask_file is not None:
        mask, record = ctx.timed("mask", lambda: from_file(ctx))
    else:
        mask, record = intersected(ctx, score)
    save_mask(mask, mask_path)
    write_json(record, source)
    return mask, {"mask_source": str(source)}


def from_file(ctx: RunContext) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """pruning.mask_file as RunContext.open read it (checked against the model, then pruning.layers), and its record."""
    path = str(ctx.spec.mask_file)
    found = ctx.given  # read and checked when the model loaded (RunContext.open)
    assert found is not None
    n = sum(int(t.numel()) for t in found.mask.values())
    log.info("mask file %s (%s): %d weights, %d after pruning.layers", path, found.format, found.n_in_file, n)
    record = {"mask_file": path, "format": found.format, "n_in_file": found.n_in_file, "n_pruned": n,
              "layers": ctx.spec.layers}  # fmt: skip
    return found.mask, record


def harmful_file(cal: CalibrationConfig, path: str, basename: str) -> CalibrationConfig:
    """The run's calibration block with its harmful pairs read from ``path``, everything else as configured.

    With calibration.btap_data the benign file stays the one that folder names (``basename``: the model's name in
    the authors' file names), given as calibration.benign.file, so the harmful file is the only change."""
    if cal.btap_data:
        benign = btap_files(cal.btap_data, cal.prune_data, cal.preserve_data, basename)["benign"][0]
        cal = replace(cal, btap_data=None, benign=replace(cal.benign, file=str(benign)))
    return replace(cal, harmful=replace(cal.harmful, responses="file", file=path))


def intersected(ctx: RunContext, score: Score) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """pruning.intersect: per file, calibrate, score and select with the run's rule; the per-parameter intersection."""
    cfg, spec, lm = ctx.cfg, ctx.spec, ctx.lm
    exclude = trained_prompts(lm.source, cfg.paths.cache_dir)
    weights = ctx.weights()
    device = input_device(lm.model)
    head = head_dim(lm.model) if spec.granularity == "head" else None
    masks, files = [], []
    basename = cfg.btap_basename()
    for i, path in enumerate(spec.intersect or []):
        cal = harmful_file(cfg.calibration, path, basename)

        def make(cal: CalibrationConfig = cal) -> tuple[dict[str, dict[str, torch.Tensor]], Path, bool]:
            splits = held_out_splits(cal, cfg.data, cfg.eval.n, cfg.seed, exclude=exclude, basename=basename)
            return calibrate(cal, lm, ctx.template, splits, ctx.root, dtype=cfg.model.dtype,
                             benign_references=cfg.eval.benign_references)  # fmt: skip

        sets, entry, ctx.computed[f"intersect_{i}_calibration"] = ctx.timed("calibrate", make)
        record: dict[str, Any] = {"file": path, "calibration": str(entry / "calibration.safetensors")}
        scores = {}
        for kind in sorted(spec.needed_scores()):
            scores[kind], file, made = ctx.timed(f"score_{kind}", lambda k=kind, s=sets: score(ctx, s, k))
            ctx.computed[f"intersect_{i}_scores_{kind}"] = made
            record[f"scores_{kind}"] = str(file)
        mask = ctx.timed("mask", lambda s=scores: select(spec, ctx.params, weights, s, device=device, head_dim=head))
        record["n_pruned"] = sum(int(t.numel()) for t in mask.values())
        log.info("intersect %d/%d %s: %d weights", i + 1, len(spec.intersect or []), path, record["n_pruned"])
        masks.append(mask)
        files.append(record)
    mask = intersect(masks)
    n = sum(int(t.numel()) for t in mask.values())
    log.info("intersection of %d masks: %d weights", len(masks), n)
    return mask, {"intersect": files, "n_pruned": n}
