"""Two masks side by side: overlap (Jaccard), per-matrix and per-layer counts, the matrices that differ.

Pure functions on harmsweep masks (sorted flat indices per parameter name); the CSV and the plot are written by
the two small writers at the end.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

LAYER = re.compile(r"\.(\d+)\.")


def intersect(masks: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The per-parameter intersection of several masks (sorted unique flat indices; a parameter missing from
    one mask keeps nothing)."""
    if not masks:
        return {}
    out = {}
    for name, idx in masks[0].items():
        kept = torch.unique(idx.long())
        for other in masks[1:]:
            kept = kept[torch.isin(kept, other.get(name, kept[:0]).long())]
        out[name] = kept
    return out


@dataclass(frozen=True)
class MatrixRow:
    name: str
    layer: int  # -1: outside the numbered blocks
    module: str  # its path in the block: self_attn.q_proj
    a: int
    b: int
    both: int

    @property
    def differs(self) -> bool:
        return not self.a == self.b == self.both

    @property
    def jaccard(self) -> float:
        return _jaccard(self.a, self.b, self.both)


def _jaccard(a: int, b: int, both: int) -> float:
    """|A and B| / |A or B|; two empty masks are the same mask (1.0)."""
    union = a + b - both
    return both / union if union else 1.0


@dataclass(frozen=True)
class Comparison:
    rows: list[MatrixRow]

    @property
    def a(self) -> int:
        return sum(r.a for r in self.rows)

    @property
    def b(self) -> int:
        return sum(r.b for r in self.rows)

    @property
    def both(self) -> int:
        return sum(r.both for r in self.rows)

    @property
    def jaccard(self) -> float:
        return _jaccard(self.a, self.b, self.both)

    def per_layer(self) -> dict[int, tuple[int, int, int]]:
        """layer -> (A, B, both)."""
        out: dict[int, tuple[int, int, int]] = {}
        for r in self.rows:
            a, b, both = out.get(r.layer, (0, 0, 0))
            out[r.layer] = (a + r.a, b + r.b, both + r.both)
        return dict(sorted(out.items()))

    def differing(self) -> list[MatrixRow]:
        return [r for r in self.rows if r.differs]


def where(name: str) -> tuple[int, str]:
    """A parameter's layer and its path inside the block, from its name."""
    base = name.removesuffix(".weight")
    found = LAYER.search(base)
    return (int(found.group(1)), base[found.end() :]) if found else (-1, base)


def compare(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Comparison:
    """Counts of A, B and both for every parameter either mask names, in layer then name order."""
    names = sorted(set(a) | set(b), key=lambda n: (where(n)[0], n))
    rows = []
    for name in names:
        ia, ib = a.get(name), b.get(name)
        ia = torch.unique(ia.long()) if ia is not None else torch.zeros(0, dtype=torch.long)
        ib = torch.unique(ib.long()) if ib is not None else torch.zeros(0, dtype=torch.long)
        layer, module = where(name)
        rows.append(MatrixRow(name, layer, module, ia.numel(), ib.numel(), int(torch.isin(ia, ib).sum())))
    return Comparison(rows)


def write_csv(comparison: Comparison, path: Path) -> None:
    """One row per matrix: layer, module, counts of A, B, both, only A, only B, Jaccard, differs."""
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["name", "layer", "module", "a", "b", "both", "only_a", "only_b", "jaccard", "differs"])
        for r in comparison.rows:
            out.writerow([r.name, r.layer, r.module, r.a, r.b, r.both, r.a - r.both, r.b - r.both, f"{r.jaccard:.6g}",
                          int(r.differs)])  # fmt: skip


def plot_layers(comparison: Comparison, path: Path, labels: tuple[str, str]) -> None:
    """Per-layer counts of A, B and both (PNG, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = comparison.per_layer()
    xs = list(range(len(layers)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(xs) + 2), 3.5))
    width = 0.28
    for k, (label, color) in enumerate(((labels[0], "tab:blue"), (labels[1], "tab:orange"), ("both", "tab:green"))):
        ax.bar([x + (k - 1) * width for x in xs], [v[k] for v in layers.values()], width, label=label, color=color)
    ax.set_xticks(xs, [str(layer) if layer >= 0 else "other" for layer in layers], fontsize=7)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("weights in the mask")
    ax.set_title(f"Jaccard {comparison.jaccard:.3f}: {comparison.a:,} vs {comparison.b:,}, {comparison.both:,} in both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
