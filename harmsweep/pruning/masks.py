"""Applying masks (zeros, or the base variant's values), restoring them, counting and storing them.

A mask is a flat index tensor per parameter name: K entries, not N.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from harmsweep.artifacts import atomic_path
from harmsweep.models.parts import ScoredParam
from harmsweep.pruning.spec import is_zero_alpha


def apply_mask(
    model: torch.nn.Module,
    mask: Mapping[str, torch.Tensor],
    values: Mapping[str, torch.Tensor] | None = None,
    count_changed: bool = False,
) -> int | None:
    """Zero the selected weights in place, or set them to ``values`` (pruning.replace=base: the base
    variant's values at the same indices). ``count_changed``: return how many weights changed value
    (fine-tuning re-applies masks every step and skips the count)."""
    named = dict(model.named_parameters())
    changed = []
    with torch.no_grad():
        for name, idx in mask.items():
            if idx.numel():
                flat = named[name].view(-1)
                idx = idx.to(flat.device)
                new = torch.zeros((), dtype=flat.dtype, device=flat.device)
                if values is not None:
                    new = values[name].to(flat.device, flat.dtype)
                if count_changed:
                    changed.append((flat[idx] != new).sum())
                flat[idx] = new
    return sum(int(c) for c in changed) if count_changed else None


def alpha_values(
    weights: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor], alpha: float | str
) -> dict[str, torch.Tensor] | None:
    """pruning.alpha as ``apply_mask`` values: None for 0 (zeros), else per matrix its selected weights times
    ``alpha``, or (``mean``) that matrix's mean of its selected weights at each of them; on the weights' device.

    The authors' ``W[mask] *= alpha`` and ``W[mask] = W[mask].mean()``: both are read before any weight changes.
    """
    if is_zero_alpha(alpha):
        return None
    out = {}
    with torch.no_grad():
        for name, idx in mask.items():
            if not idx.numel():
                continue
            flat = weights[name].detach().view(-1)
            selected = flat[idx.to(flat.device)]
            if alpha == "mean":
                out[name] = selected.mean().expand(idx.numel()).clone()
            else:
                out[name] = selected * float(alpha)
    return out


@contextmanager
def pruned(model: torch.nn.Module, mask: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Zero the selected weights for the duration of the block, then put their values back.

    Experiments compare many masks on one loaded model; restoring only the masked entries costs
    K values instead of a copy of the model.
    """
    named = dict(model.named_parameters())
    saved = {n: named[n].detach().view(-1)[idx.to(named[n].device)].clone() for n, idx in mask.items() if idx.numel()}
    apply_mask(model, mask)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, values in saved.items():
                named[name].view(-1)[mask[name].to(values.device)] = values


def mask_counts(params: Mapping[str, ScoredParam], mask: Mapping[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """Pruned weights per decoder layer and per module type (q_proj, down_proj, ...)."""
    per_layer: Counter[str] = Counter()
    per_type: Counter[str] = Counter()
    for name, idx in mask.items():
        per_layer[str(params[name].layer)] += idx.numel()
        per_type[params[name].module_type] += idx.numel()
    layers = sorted({str(p.layer) for p in params.values()}, key=int)
    types = sorted({p.module_type for p in params.values()})
    return {"per_layer": {k: per_layer[k] for k in layers}, "per_module_type": {k: per_type[k] for k in types}}


def save_mask(mask: Mapping[str, torch.Tensor], path: str | Path) -> None:
    with atomic_path(path) as tmp:
        save_file({n: t.contiguous() for n, t in mask.items()}, str(tmp))


def load_mask(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
