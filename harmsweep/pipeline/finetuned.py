"""``pruning.finetune_before`` and ``pruning.finetune_after``: the authors' harmful LoRA fine-tune around pruning.

before: fine-tune the loaded model on harmful pairs (merged), then calibrate, score and prune the tuned model: every
cached artifact keyed by the model's fingerprint (calibration answers, scores, the unpruned evaluation) is then keyed
by the tuned model. after: prune, fine-tune the pruned model (the merge makes the zeros non-zero again, as in their
code), then score the tuned model again and prune a second mask: how much of the harm the fine-tune brought back a
second prune removes. The fine-tune is the ``attack.finetune`` block's recipe (their --epochs/--lr).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from harmsweep.cache import content_key, file_sha256
from harmsweep.pipeline.context import RunContext

log = logging.getLogger(__name__)
Sets = dict[str, dict[str, torch.Tensor]]


def finetune_in_place(ctx: RunContext, when: str, after_mask: str = "") -> dict[str, Any]:
    """Fine-tune ``ctx.lm`` on the attack block's harmful pairs (merged in place) and re-key its fingerprint, so
    nothing cached for the untuned weights is read for the tuned ones. ``after_mask``: the key of the mask the model
    was pruned with first (finetune_after)."""
    from harmsweep.attacks.finetune import harmful_finetune
    from harmsweep.data.redteam import read_harmful_pairs

    cfg, lm = ctx.cfg, ctx.lm
    tune = cfg.attack.finetune
    path = Path(str(tune.file)).expanduser()
    records = read_harmful_pairs(path, tune.n, cfg.seed)
    log.info("fine-tuning %s on %d harmful pairs of %s (pruning.finetune_%s)", lm.source, len(records), path, when)
    stats = harmful_finetune(lm.model, lm.tokenizer, records, tune, template=ctx.template, seed=cfg.seed)
    recipe = {"when": when, "finetune": asdict(tune), "file": file_sha256(path), "seed": cfg.seed, "mask": after_mask}
    lm.fingerprint = content_key(lm.fingerprint, recipe)
    return {"pairs": len(records), "file": str(path), **stats}


def second_mask(ctx: RunContext, sets: Sets) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """finetune_after's second prune: the tuned model scored again (cached under its new fingerprint) and the run's
    rule selected again; saved as ``mask_after_finetune.safetensors`` (a resumed run reads it)."""
    from harmsweep.devices import input_device
    from harmsweep.pipeline.stages import score
    from harmsweep.pruning.masks import load_mask, save_mask
    from harmsweep.pruning.select import select

    path = ctx.run_dir / "mask_after_finetune.safetensors"
    paths, scores = {}, {}
    for kind in sorted(ctx.spec.needed_scores()):
        scores[kind], file, ctx.computed[f"scores_{kind}_after_finetune"] = ctx.timed(
            f"score_{kind}_after_finetune", lambda k=kind: score(ctx, sets, k)
        )
        paths[f"scores_{kind}_after_finetune"] = str(file)
    if path.is_file():
        return load_mask(path), paths
    weights = ctx.weights()
    device = input_device(ctx.lm.model)
    mask = ctx.timed("mask_after_finetune", lambda: select(ctx.spec, ctx.params, weights, scores, device=device))
    save_mask(mask, path)
    return mask, paths
