"""A mask recovered from two checkpoints: the decoder-layer weights that are zero in PRUNED and non-zero in BASE.

The authors released pruned checkpoints (e.g. hadasor/Llama-3.1-8B-Instruct-Pruned vs
meta-llama/Llama-3.1-8B-Instruct): these zeros are their exact mask. Both checkpoints are read shard by shard and
tensor by tensor through safetensors slices of bounded row blocks, so no model (nor a whole large tensor) is ever
in memory. Local folders are read directly; hub ids are downloaded one file at a time (untested here: no network).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from harmsweep.errors import HarmsweepError

LAYER = re.compile(r"\.layers\.(\d+)\.")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
BLOCK = 1 << 24  # entries per row block read from each checkpoint (64 MiB of fp32, 32 MiB of bf16)


@dataclass
class Checkpoint:
    """Where each tensor of a checkpoint lives: tensor name -> shard file, and how a shard becomes a local file."""

    label: str
    shards: dict[str, str]  # tensor name -> shard file name
    fetch: Callable[[str], Path]  # shard file name -> local path (a hub checkpoint downloads it on first use)


def open_checkpoint(source: str, what: str = "checkpoint") -> Checkpoint:
    """A local folder (model.safetensors, or shards with model.safetensors.index.json), or a hub id ``id[@rev]``."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return _local(folder, what)
    if folder.exists():
        raise HarmsweepError(f"{what} {source} is a file: give the checkpoint's folder (or a hub id)")
    if not HUB_ID.match(source) or source.startswith((".", "/", "~")):
        raise HarmsweepError(f"{what} not found: {source} (a local folder, or a hub id like owner/name[@revision])")
    return _hub(source, what)


def _local(folder: Path, what: str) -> Checkpoint:
    if (folder / INDEX).is_file():
        shards = json.loads((folder / INDEX).read_text()).get("weight_map") or {}
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise HarmsweepError(f"{what} {folder} holds no .safetensors weights ({SINGLE}, or shards with {INDEX})")
        shards = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                shards.update(dict.fromkeys(f.keys(), file.name))

    def fetch(shard: str) -> Path:
        path = folder / shard
        if not path.is_file():
            raise HarmsweepError(f"{what} {folder}: shard {shard} named by {INDEX} is missing")
        return path

    return Checkpoint(str(folder), shards, fetch)


def _hub(source: str, what: str) -> Checkpoint:
    """A hub checkpoint: its index (or single file) now, each shard when first read (one shard on disk at a time
    is not promised: the hub cache keeps what it downloads)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo, _, revision = source.partition("@")
    rev = revision or None
    cached = _cached_snapshot(repo, rev)
    if cached is not None:  # every file already in the local hub cache: no network asked, online or not
        return replace(_local(cached, what), label=source)

    def download(name: str) -> Path:
        try:
            return Path(hf_hub_download(repo, name, revision=rev))
        except Exception as exc:
            if isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
                raise  # the repository has no such file: the caller tries the other layout
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise HarmsweepError(f"{what} {source}: cannot download {name} from the hub: {first}") from None

    try:
        shards = json.loads(download(INDEX).read_text()).get("weight_map") or {}
    except EntryNotFoundError:
        try:
            single = download(SINGLE)
        except EntryNotFoundError:
            raise HarmsweepError(f"{what} {source} has neither {INDEX} nor {SINGLE} on the hub") from None
        with safe_open(str(single), framework="pt") as f:
            shards = dict.fromkeys(f.keys(), SINGLE)
    return Checkpoint(source, shards, download)


def _cached_snapshot(repo: str, revision: str | None) -> Path | None:
    """The snapshot folder of ``repo`` in the local hub cache when it holds every weight file, else None."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # not cached (or no such revision there): the hub decides
        return None
    if (folder / INDEX).is_file():
        names = set((json.loads((folder / INDEX).read_text()).get("weight_map") or {}).values())
        return folder if names and all((folder / n).is_file() for n in names) else None
    return folder if (folder / SINGLE).is_file() else None


def layer_tensors(ckpt: Checkpoint) -> list[str]:
    """Tensor names inside the decoder layers (``.layers.{i}.``), in layer then name order."""
    names = [n for n in ckpt.shards if LAYER.search(n)]
    return sorted(names, key=lambda n: (int(LAYER.search(n).group(1)), n))  # type: ignore[union-attr]


class _Readers:
    """Open shards of one checkpoint, each opened once (safe_open maps the file; slices read only their rows)."""

    def __init__(self, ckpt: Checkpoint, stack: ExitStack):
        self.ckpt, self.stack, self.open = ckpt, stack, {}

    def slice(self, name: str) -> Any:
        shard = self.ckpt.shards[name]
        if shard not in self.open:
            self.open[shard] = self.stack.enter_context(safe_open(str(self.ckpt.fetch(shard)), framework="pt"))
        return self.open[shard].get_slice(name)


def _differences(pruned: Checkpoint, base: Checkpoint) -> list[str]:
    """The decoder-layer tensor names both hold; differing names stop here in one line."""
    a, b = layer_tensors(pruned), layer_tensors(base)
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:

        def few(names: list[str]) -> str:
            return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "") if names else "none"

        raise HarmsweepError(
            f"{pruned.label} and {base.label} are not the same model: decoder-layer tensors only in PRUNED: "
            f"{few(only_a)}; only in BASE: {few(only_b)}"
        )
    if not a:
        raise HarmsweepError(f"{pruned.label} has no tensors inside decoder layers (names with .layers.<i>.)")
    return a


def zeroed_indices(pruned: Any, base: Any, rows: int, cols: int, block: int = BLOCK) -> torch.Tensor:
    """Flat indices where ``pruned`` is zero and ``base`` is not, read in row blocks of at most ``block`` entries.

    ``pruned``/``base``: anything sliced by rows (safetensors slices, tensors)."""
    step = max(1, block // max(cols, 1))
    found = []
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        a, b = pruned[start:stop], base[start:stop]
        hit = torch.nonzero(((a == 0) & (b != 0)).reshape(-1)).view(-1)
        if hit.numel():
            found.append(hit + start * cols)
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)


def mask_from_checkpoints(
    pruned: Checkpoint, base: Checkpoint, block: int = BLOCK
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """Every 2-D decoder-layer weight's zeroed entries (sorted flat indices), tensor by tensor, and the shapes.

    Names and shapes are compared first (headers only), so a mismatch stops before any weight is read."""
    names = _differences(pruned, base)
    with ExitStack() as stack:
        readers = _Readers(pruned, stack), _Readers(base, stack)
        shapes = {}
        for name in names:
            a, b = (tuple(r.slice(name).get_shape()) for r in readers)
            if a != b:
                raise HarmsweepError(f"{name} has shape {a} in {pruned.label} but {b} in {base.label}")
            if len(a) == 2:
                shapes[name] = a
        mask = {
            name: zeroed_indices(readers[0].slice(name), readers[1].slice(name), *shape, block=block)
            for name, shape in shapes.items()
        }
    return mask, shapes


@dataclass(frozen=True)
class MatrixCount:
    name: str
    layer: int
    module_type: str  # q_proj, down_proj, ...
    count: int
    size: int

    @property
    def fraction(self) -> float:
        return self.count / self.size if self.size else 0.0


def matrix_counts(mask: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> list[MatrixCount]:
    """Each matrix's count, layer and module type (from its name) and size."""
    out = []
    for name, idx in mask.items():
        found = LAYER.search(name) or re.search(r"\.(\d+)\.", name)
        layer = int(found.group(1)) if found else -1
        module_type = name.removesuffix(".weight").rsplit(".", 1)[-1]
        out.append(MatrixCount(name, layer, module_type, int(idx.numel()), math.prod(shapes[name])))
    return out


def summarise(counts: list[MatrixCount]) -> dict[str, Any]:
    """Total, per layer, per module type, and each type's per-matrix fractions (min/median/max).

    A per-matrix ranking (the authors' release) leaves near-equal fractions, at most q, in every matrix of a type;
    a global ranking concentrates the count in a few matrices: the spread tells which one made a mask.
    """
    per_layer: dict[str, int] = {}
    per_type: dict[str, int] = {}
    fractions: dict[str, list[float]] = {}
    for c in counts:
        per_layer[str(c.layer)] = per_layer.get(str(c.layer), 0) + c.count
        per_type[c.module_type] = per_type.get(c.module_type, 0) + c.count
        fractions.setdefault(c.module_type, []).append(c.fraction)
    total = sum(c.count for c in counts)
    size = sum(c.size for c in counts)
    return {
        "total": total,
        "weights": size,
        "fraction": total / size if size else 0.0,
        "matrices": len(counts),
        "matrices_with_zeros": sum(c.count > 0 for c in counts),
        "per_layer": dict(sorted(per_layer.items(), key=lambda kv: int(kv[0]))),
        "per_module_type": dict(sorted(per_type.items())),
        "fraction_per_matrix": {
            t: {"min": min(f), "median": statistics.median(f), "max": max(f), "matrices": len(f)}
            for t, f in sorted(fractions.items())
        },
    }


def summary_lines(summary: dict[str, Any]) -> Iterator[str]:
    yield (
        f"{summary['total']:,} weights zero in PRUNED and non-zero in BASE, of {summary['weights']:,} in "
        f"{summary['matrices']} decoder matrices ({summary['fraction']:.3g}); {summary['matrices_with_zeros']} matrices hold some"
    )
    yield "per layer: " + ", ".join(f"{k}: {v:,}" for k, v in summary["per_layer"].items())
    yield "per module type: " + ", ".join(f"{k}: {v:,}" for k, v in summary["per_module_type"].items())
    yield "fraction of each matrix (min / median / max):"
    for t, f in summary["fraction_per_matrix"].items():
        yield f"  {t:<12} {f['min']:.3g} / {f['median']:.3g} / {f['max']:.3g}  ({f['matrices']} matrices)"
    yield (
        "  (a per-matrix ranking leaves near-equal fractions, at most q, in every matrix; a global ranking does not)"
    )
