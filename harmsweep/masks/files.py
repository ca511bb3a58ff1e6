"""Given mask files (pruning.mask_file), read into harmsweep's mask: sorted flat indices per parameter name.

Formats: harmsweep's mask.safetensors (1-D flat indices keyed by parameter name); the authors' pickle structure
as JSON, ``{"<layer>": {"<module>": [[row, col], ...]}}``, or a list ``[[layer, module, row, col], ...]``; a
safetensors of (N, 2) int tensors keyed ``"<layer>.<module>"``. A module is named by its path inside the decoder
block (``self_attn.q_proj``) or its own name (``q_proj``). Never a pickle. Every entry is checked against the
model before anything is pruned, so a mask made for another model stops in one line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from harmsweep.errors import HarmsweepError
from harmsweep.masks.options import check_mask_file
from harmsweep.models.parts import ScoredParam

Shapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class GivenMask:
    """A mask file read against a model: the mask (every scored parameter, empty where none), its format and size."""

    mask: dict[str, torch.Tensor]
    format: str  # harmsweep | json_nested | json_list | safetensors_rows
    n_in_file: int  # distinct entries in the file, before pruning.layers


class _Model:
    """Where the file's (layer, module) names point: parameter names, shapes, and messages that name the model."""

    def __init__(self, path: str | Path, params: Mapping[str, ScoredParam], shapes: Shapes):
        self.path, self.params, self.shapes = path, params, shapes
        self.modules: dict[int, dict[str, str | None]] = {}
        for name, p in params.items():
            inside = name.removesuffix(".weight").split(f".{p.layer}.", 1)[-1]  # self_attn.q_proj
            found = self.modules.setdefault(p.layer, {})
            found[inside] = name
            short = inside.rsplit(".", 1)[-1]
            if short != inside:
                found[short] = None if short in found else name  # None: two modules share the short name

    def fail(self, why: str) -> HarmsweepError:
        return HarmsweepError(f"mask file {self.path} is not for this model: {why}")

    def layer_range(self) -> str:
        layers = sorted(self.modules)
        return f"{layers[0]}-{layers[-1]}" if layers else "none"

    def name(self, layer: Any, module: Any) -> str:
        """The parameter a (layer, module) pair names."""
        try:
            index = int(layer)
        except (TypeError, ValueError):
            raise self.fail(f"layer {layer!r} is not a layer number") from None
        if index not in self.modules:
            raise self.fail(f"layer {index} does not exist (the model has layers {self.layer_range()})")
        found = self.modules[index]
        if str(module) not in found:
            known = sorted(k for k in found if "." in k) or sorted(found)
            raise self.fail(f"layer {index} has no module {module!r} (it has {', '.join(known)})")
        name = found[str(module)]
        if name is None:
            raise self.fail(f"module {module!r} is ambiguous in layer {index}: name it by its path in the block")
        return name

    def flat(self, name: str, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Flat indices of (row, col) entries of a 2-D weight, each checked against its shape."""
        shape = tuple(self.shapes[name])
        if len(shape) != 2:
            raise self.fail(f"{name} has shape {shape}, not a matrix of rows and columns")
        for what, values, size in (("row", rows, shape[0]), ("column", cols, shape[1])):
            bad = (values < 0) | (values >= size)
            if bool(bad.any()):
                raise self.fail(f"{what} {int(values[bad][0])} of {name} is out of range (shape {shape[0]}x{shape[1]})")
        return rows * shape[1] + cols

    def checked(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        """Flat indices of one parameter, checked against its size."""
        if name not in self.params:
            raise self.fail(f"{name} is not one of its scored weights")
        size = int(torch.Size(self.shapes[name]).numel())
        bad = (idx < 0) | (idx >= size)
        if bool(bad.any()):
            raise self.fail(f"index {int(idx[bad][0])} of {name} is out of range (it has {size} weights)")
        return idx


def read_mask_file(
    path: str | Path, params: Mapping[str, ScoredParam], shapes: Shapes, layers: Iterable[int] | None = None
) -> GivenMask:
    """The mask a file gives, for a model whose scored weights are ``params`` with ``shapes``.

    ``layers`` (pruning.layers): only these decoder layers keep their entries; the whole file is checked anyway.
    """
    check_mask_file(path)
    model = _Model(path, params, shapes)
    if Path(path).suffix.lower() == ".json":
        fmt, parts = _json_parts(path, model)
    else:
        fmt, parts = _safetensors_parts(path, model)
    merged: dict[str, list[torch.Tensor]] = {}
    for name, idx in parts:
        merged.setdefault(name, []).append(idx)
    mask = {n: torch.unique(torch.cat(merged[n])) if n in merged else torch.zeros(0, dtype=torch.long) for n in params}
    n_in_file = sum(int(t.numel()) for t in mask.values())
    if layers is not None:
        mask = restrict(mask, params, layers)
    return GivenMask(mask, fmt, n_in_file)


def restrict(
    mask: Mapping[str, torch.Tensor], params: Mapping[str, ScoredParam], layers: Iterable[int]
) -> dict[str, torch.Tensor]:
    """pruning.layers: the other layers' matrices lose nothing; a layer the model lacks stops in one line."""
    wanted = {int(x) for x in layers}
    known = sorted({p.layer for p in params.values()})
    missing = sorted(wanted - set(known))
    if missing:
        raise HarmsweepError(f"pruning.layers={sorted(wanted)}: the model has layers {known[0]}-{known[-1]}")
    empty = torch.zeros(0, dtype=torch.long)
    return {n: idx if params[n].layer in wanted else empty for n, idx in mask.items()}


def _as_pairs(value: Any, where: str, model: _Model) -> tuple[torch.Tensor, torch.Tensor]:
    """[[row, col], ...] as two int64 tensors."""
    try:
        t = torch.as_tensor(value, dtype=torch.long) if len(value) else torch.zeros((0, 2), dtype=torch.long)
    except (TypeError, ValueError, RuntimeError):
        raise model.fail(f"{where} is not a list of [row, col] integer pairs") from None
    if t.dim() != 2 or t.size(1) != 2:
        raise model.fail(f"{where} is not a list of [row, col] pairs (shape {tuple(t.shape)})")
    return t[:, 0], t[:, 1]


def _json_parts(path: str | Path, model: _Model) -> tuple[str, list[tuple[str, torch.Tensor]]]:
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HarmsweepError(f"mask file {path} is not valid JSON: {exc}") from None
    parts = []
    if isinstance(data, dict):
        for layer, modules in data.items():
            if not isinstance(modules, dict):
                raise model.fail(f'layer {layer!r} does not map module names to [[row, col], ...] (see "<layer>")')
            for module, pairs in modules.items():
                name = model.name(layer, module)
                parts.append((name, model.flat(name, *_as_pairs(pairs, f"layer {layer} {module}", model))))
        return "json_nested", parts
    if not isinstance(data, list):
        raise model.fail('expected {"<layer>": {"<module>": [[row, col], ...]}} or [[layer, module, row, col], ...]')
    grouped: dict[str, list[list[int]]] = {}
    for entry in data:
        if not isinstance(entry, list | tuple) or len(entry) != 4:
            raise model.fail(f"entry {entry!r} is not [layer, module, row, col]")
        grouped.setdefault(model.name(entry[0], entry[1]), []).append([entry[2], entry[3]])
    for name, pairs in grouped.items():
        parts.append((name, model.flat(name, *_as_pairs(pairs, name, model))))
    return "json_list", parts


def _safetensors_parts(path: str | Path, model: _Model) -> tuple[str, list[tuple[str, torch.Tensor]]]:
    """Keys that are parameter names hold flat indices (harmsweep's mask); ``<layer>.<module>`` keys hold (N, 2)."""
    parts, formats = [], set()
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = f.get_tensor(key)
                if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                    raise model.fail(f"tensor {key} holds {t.dtype}, not integer indices")
                t = t.long()
                if key in model.shapes or t.dim() == 1:
                    formats.add("harmsweep")
                    parts.append((key, model.checked(key, t.view(-1))))
                    continue
                layer, _, module = key.partition(".")
                name = model.name(layer, module)
                formats.add("safetensors_rows")
                parts.append((name, model.flat(name, *_as_pairs(t, key, model))))
    except HarmsweepError:
        raise
    except Exception as exc:  # a damaged or foreign file: one line, not a traceback
        raise HarmsweepError(f"mask file {path} cannot be read as safetensors: {exc}") from None
    return "+".join(sorted(formats)) or "harmsweep", parts
