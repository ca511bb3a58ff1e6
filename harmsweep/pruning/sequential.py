"""Sequential pruning: layer by layer, each layer scored with the lower layers already pruned.

This is Wei et al.'s top-down wandg (and Wanda's layer order): the mask of layer l depends on what was
removed below it, so its scores cannot come from one pass over the intact model. Cost: per layer and
score set one partial pass (SNIP: a forward and a backward that stops at layer l; Wanda: a forward that
stops after layer l), L passes in all instead of one; bench/per_layer.py measures it. Scores live in
memory one layer at a time, so no score set is stored. The model is left as it was found: the caller
applies the finished mask like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import torch
from torch import nn

from harmsweep.models.parts import ScoredParam
from harmsweep.pruning.select import select
from harmsweep.pruning.spec import PruneSpec

# (score kind, names of one layer's weights, the layer) -> that layer's dense scores
LayerScores = Callable[[str, list[str], int], Mapping[str, torch.Tensor]]
# applies one layer's mask to the model (zeros, or the base variant's values)
Apply = Callable[[Mapping[str, torch.Tensor]], None]


def select_sequential(
    spec: PruneSpec,
    params: Mapping[str, ScoredParam],
    model: nn.Module,
    layer_scores: LayerScores,
    apply: Apply,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """The mask of ``spec`` chosen bottom-up: score layer l, select its weights, apply them, go to l + 1.

    With pruning.layers only the listed layers are scored: a layer that loses nothing changes no later score.
    """
    spec.validate()
    spec.check_layers(p.layer for p in params.values())
    named = dict(model.named_parameters())
    single = replace(spec, sequential=False, layers=None)
    saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    mask: dict[str, torch.Tensor] = {n: torch.zeros(0, dtype=torch.long) for n in params}
    try:
        for layer in sorted({p.layer for p in params.values() if spec.prunes_layer(p.layer)}):
            names = [n for n, p in params.items() if p.layer == layer]
            scores = {kind: layer_scores(kind, names, layer) for kind in sorted(spec.needed_scores())}
            chosen = select(single, {n: params[n] for n in names}, {n: named[n] for n in names}, scores, device)
            for n, idx in chosen.items():
                flat = named[n].detach().view(-1)
                saved[n] = (idx, flat[idx.to(flat.device)].clone())
            apply(chosen)
            mask.update(chosen)
    finally:
        with torch.no_grad():  # put back every value the layer-by-layer pruning changed
            for n, (idx, values) in saved.items():
                named[n].view(-1)[idx.to(values.device)] = values
    return mask
