"""The report's plots as PNG files (matplotlib's Agg canvas, no pyplot: no display, no global backend switch).

Curves answer "how much harm goes, at what utility cost, per variant and rule" (random and magnitude are the
controls, drawn dashed); the bars answer "where do the pruned weights sit"; the heatmaps show the cross-harm
transfer and overlap matrices with their chance level. Row selection lives in pure functions so the HTML can
name the runs each plot was drawn from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure

from harmsweep.report.collect import Figure, is_number
from harmsweep.report.families import EXPERIMENTS

MAIN_RULE = "signed_snip"
CONTROLS = ("random", "magnitude")
RULE_STYLE = {  # rule -> (line style, marker)
    "signed_snip": ("-", "o"),
    "no_set_difference": (":", "s"),
    "unsigned_snip": ("-.", "^"),
    "random": ("--", "x"),
    "magnitude": ("--", "d"),
}
HEATMAP_PREFIXES = ("transfer_", "overlap_", "em_overlap_")
DPI = 110

Variant = tuple[str, str]  # (model, alignment)


def plain_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows of single pruning runs (not experiments, which have no one sparsity)."""
    return [r for r in rows if r.get("experiment") not in EXPERIMENTS]


def curve_x(row: Mapping[str, Any]) -> float | None:
    """The run's sparsity on the x axis: the requested one, or the measured one when none was requested."""
    for key in ("sparsity", "actual_sparsity"):
        value = row.get(key)
        if is_number(value) and value > 0:
            return float(value)
    return None


def variant_label(variant: Variant, variants: Sequence[Variant]) -> str:
    """'aligned' when the rows hold one model, 'model/aligned' otherwise."""
    return variant[1] if len({v[0] for v in variants}) <= 1 else f"{variant[0]}/{variant[1]}"


def variants_of(rows: Sequence[Mapping[str, Any]]) -> list[Variant]:
    return sorted({(str(r.get("model")), str(r.get("alignment"))) for r in plain_rows(rows)})


def curves(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, str, Any], list[tuple[float, Any, Any, str]]]:
    """(model, alignment, rule, protect) -> [(x, harm_reduction, utility_ratio, run_id)] sorted by x."""
    out: dict[tuple[str, str, str, Any], list[tuple[float, Any, Any, str]]] = {}
    for r in plain_rows(rows):
        x = curve_x(r)
        if x is not None:
            key = (str(r.get("model")), str(r.get("alignment")), str(r.get("rule")), r.get("protect"))
            out.setdefault(key, []).append((x, r.get("harm_reduction"), r.get("utility_ratio"), str(r["run_id"])))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in sorted(out.items(), key=lambda kv: str(kv[0]))}


def _means(points: Sequence[tuple[float, Any, Any, str]], index: int) -> tuple[list[float], list[float]]:
    """Averages per sparsity of one coordinate (repeats at the same sparsity), Nones left out."""
    groups: dict[float, list[float]] = {}
    for p in points:
        if is_number(p[index]):
            groups.setdefault(p[0], []).append(float(p[index]))
    xs = sorted(groups)
    return xs, [math.fsum(groups[x]) / len(groups[x]) for x in xs]


def _save(fig: MplFigure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def plot_curves(
    rows: Sequence[Mapping[str, Any]],
    path: Path,
    targets: Sequence[float] = (0.5, 0.8),
    utility_floor: float = 0.95,
    bands: Mapping[tuple[str, str, str, Any], Sequence[Any]] | None = None,
) -> Path | None:
    """Harm reduction (left) and utility ratio (right) vs sparsity, log x; one colour per variant, one style per rule.

    ``bands``: per curve (model, alignment, rule, protect), its xs and the harm and utility interval bounds at each
    (report/uncertainty.py curve_bands), drawn as a shaded band around the line.
    """
    lines = curves(rows)
    if not lines:
        return None
    variants = variants_of(rows)
    colours = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    protects: dict[tuple[str, str, str], set[Any]] = {}
    for model, alignment, rule, protect in lines:
        protects.setdefault((model, alignment, rule), set()).add(protect)
    fig = MplFigure(figsize=(12, 4.6), layout="constrained")
    harm_ax, util_ax = fig.subplots(1, 2)
    plotted = False
    for (model, alignment, rule, protect), points in lines.items():
        style, marker = RULE_STYLE.get(rule, ("-", "."))
        label = f"{variant_label((model, alignment), variants)} · {rule}"
        if len(protects[(model, alignment, rule)]) > 1:
            label += f" (p={protect})"
        kwargs = {"color": colours[(model, alignment)], "linestyle": style, "marker": marker, "label": label}
        band = (bands or {}).get((model, alignment, rule, protect))
        for ax, index in ((harm_ax, 1), (util_ax, 2)):
            xs, ys = _means(points, index)
            if xs:
                ax.plot(xs, ys, alpha=0.6 if rule in CONTROLS else 1.0, **kwargs)
                plotted = True
            if band is not None:
                lo, hi = np.asarray(band[2 * index - 1]), np.asarray(band[2 * index])
                ok = np.isfinite(lo) & np.isfinite(hi)
                if ok.any():  # an undefined figure (harm 0 before pruning) has no band
                    ax.fill_between(np.asarray(band[0])[ok], lo[ok], hi[ok], color=kwargs["color"], linewidth=0,
                                    alpha=0.08 if rule in CONTROLS else 0.18)  # fmt: skip
    if not plotted:  # no run has a usable harm or utility value (e.g. a forced measure nobody measured)
        return None
    for target in targets:
        harm_ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
    util_ax.axhline(utility_floor, color="grey", linewidth=0.8, linestyle=":")
    for ax, ylabel in ((harm_ax, "harm reduction (1 = all removed)"), (util_ax, "utility ratio (1 = unchanged)")):
        ax.set_xscale("log")
        ax.set_xlabel("sparsity (fraction of scored weights pruned)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    harm_ax.set_title(f"harm vs sparsity (dotted: targets {', '.join(f'{t:g}' for t in targets)})")
    util_ax.set_title(f"utility vs sparsity (dotted: floor {utility_floor:g})")
    _legend(harm_ax)
    return _save(fig, path)


def _legend(ax: Any) -> None:
    """A legend of the labelled curves; none when nothing was drawn (no measured harm, e.g. none before pruning)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def lowrank_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Runs of method=lowrank, which have a rank instead of a sparsity."""
    return [r for r in plain_rows(rows) if r.get("rule") == "lowrank" and is_number(r.get("rank_harmful"))]


def plot_lowrank(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Harm reduction (left) and utility ratio (right) vs the removed harmful rank; one line per variant and
    utility rank (points at one rank averaged over seeds)."""
    chosen = lowrank_rows(rows)
    lines: dict[tuple[str, str, Any], dict[float, list[tuple[Any, Any]]]] = {}
    for r in chosen:
        key = (str(r.get("model")), str(r.get("alignment")), r.get("rank_utility"))
        lines.setdefault(key, {}).setdefault(float(r["rank_harmful"]), []).append(
            (r.get("harm_reduction"), r.get("utility_ratio"))
        )
    if not lines:
        return None
    variants = sorted({(m, a) for m, a, _ in lines})
    fig = MplFigure(figsize=(12, 4.6), layout="constrained")
    harm_ax, util_ax = fig.subplots(1, 2)
    for i, ((model, alignment, r_u), by_rank) in enumerate(sorted(lines.items(), key=lambda kv: str(kv[0]))):
        label = f"{variant_label((model, alignment), variants)} · r_u={r_u}"
        xs = sorted(by_rank)
        for ax, j in ((harm_ax, 0), (util_ax, 1)):
            ys = [_mean([v[j] for v in by_rank[x]]) for x in xs]
            ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=label)
    for ax, ylabel in ((harm_ax, "harm reduction (1 = all removed)"), (util_ax, "utility ratio (1 = unchanged)")):
        ax.set_xlabel("rank of the harmful subspace removed per matrix (lowrank.rank_harmful)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    harm_ax.set_title("low-rank removal (ActSVD): harm vs rank")
    util_ax.set_title("low-rank removal: utility vs rank")
    _legend(harm_ax)
    return _save(fig, path)


def _mean(values: Sequence[Any]) -> float:
    finite = [float(v) for v in values if is_number(v) and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else float("nan")


def count_sources(rows: Sequence[Mapping[str, Any]], rule: str = MAIN_RULE) -> dict[Variant, Mapping[str, Any]]:
    """Per variant, the ``rule`` run of the largest sparsity that recorded pruned counts: whose mask the bars show."""
    out: dict[Variant, Mapping[str, Any]] = {}
    for r in plain_rows(rows):
        if r.get("rule") != rule or not any(k.startswith("pruned/") for k in r):
            continue
        variant = (str(r.get("model")), str(r.get("alignment")))
        if variant not in out or (curve_x(r) or 0) > (curve_x(out[variant]) or 0):
            out[variant] = r
    return dict(sorted(out.items()))


def split_counts(row: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """``pruned/layer_<i>`` and ``pruned/<module type>`` columns as {layer: n} and {type: n}."""
    layers = {k.removeprefix("pruned/layer_"): v for k, v in row.items() if k.startswith("pruned/layer_")}
    types = {k.removeprefix("pruned/"): v for k, v in row.items() if k.startswith("pruned/") and "layer_" not in k}
    return layers, types


def _bars(ax: Any, groups: Mapping[str, Mapping[str, float]], colours: Mapping[str, str]) -> None:
    keys = list(dict.fromkeys(k for counts in groups.values() for k in counts))
    keys.sort(key=lambda k: (0, int(k), "") if k.isdigit() else (1, 0, k))
    width = 0.8 / max(1, len(groups))
    for i, (label, counts) in enumerate(groups.items()):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(keys))]
        ax.bar(xs, [counts.get(k, 0) for k in keys], width=width, label=label, color=colours[label])
    ax.set_xticks(range(len(keys)), keys, rotation=45 if len(keys) > 12 else 0, fontsize=8)
    ax.set_ylabel("pruned weights")
    ax.grid(True, axis="y", alpha=0.3)


def plot_counts(rows: Sequence[Mapping[str, Any]], layers_path: Path, types_path: Path) -> list[Path]:
    """Pruned counts per decoder layer and per module type, one bar colour per variant (see ``count_sources``)."""
    sources = count_sources(rows)
    if not sources:
        return []
    variants = variants_of(rows)
    labels = {
        v: f"{variant_label(v, variants)} (run {r['run_id']}, sparsity {curve_x(r):.1e})" for v, r in sources.items()
    }
    colours = {labels[v]: f"C{variants.index(v) % 10}" for v in sources}
    layer_groups = {labels[v]: split_counts(r)[0] for v, r in sources.items()}
    type_groups = {labels[v]: split_counts(r)[1] for v, r in sources.items()}
    out = []
    for path, groups, xlabel in ((layers_path, layer_groups, "decoder layer"), (types_path, type_groups, "module")):
        if not any(groups.values()):
            continue
        n_keys = len({k for g in groups.values() for k in g})
        fig = MplFigure(figsize=(max(7.0, min(16.0, 0.35 * n_keys * len(groups) + 3)), 4), layout="constrained")
        ax = fig.subplots()
        _bars(ax, groups, colours)
        ax.set_xlabel(xlabel)
        ax.set_title(f"pruned weights per {xlabel}\n({MAIN_RULE}, the largest sparsity of each variant)", fontsize=10)
        ax.legend(fontsize=8)
        out.append(_save(fig, path))
    return out


def load_matrix(path: Path) -> dict[str, Any]:
    """A figure JSON ({rows, cols, values, kind, note, chance}); values None stay None."""
    data = json.loads(Path(path).read_text())
    for key in ("rows", "cols", "values"):
        if key not in data:
            raise ValueError(f"{path}: no '{key}'")
    return data


def is_heatmap(figure: Figure) -> bool:
    return figure.name.startswith(HEATMAP_PREFIXES)


def heatmap_title(figure: Figure, matrix: Mapping[str, Any]) -> str:
    title = f"{figure.experiment} · {figure.name} (run {figure.run_id})"
    chance = matrix.get("chance")
    return title + (f"\nchance level K/N = {chance:.3g}" if is_number(chance) else "")


def plot_heatmap(figure: Figure, matrix: Mapping[str, Any], path: Path) -> Path:
    """Rows = where the pruned set came from, columns = where it was measured; cells annotated, None blank."""
    import numpy as np

    values = np.array([[math.nan if v is None else float(v) for v in row] for row in matrix["values"]], dtype=float)
    rows, cols = [str(r) for r in matrix["rows"]], [str(c) for c in matrix["cols"]]
    finite = values[np.isfinite(values)]
    if figure.name.startswith("transfer_"):  # signed: diverging colours centred on 0
        bound = float(np.abs(finite).max()) if finite.size else 1.0
        cmap, vmin, vmax = "RdBu", -bound or -1.0, bound or 1.0
    else:  # overlaps are fractions
        cmap, vmin, vmax = "viridis", 0.0, max(1e-12, float(finite.max()) if finite.size else 1.0)
    fig = MplFigure(figsize=(max(4.5, 0.9 * len(cols) + 3), max(3.2, 0.55 * len(rows) + 2)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(
        range(len(cols)), cols, rotation=45 if len(cols) > 3 else 0, ha="right" if len(cols) > 3 else "center"
    )
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = values[i, j]
            if math.isfinite(v):
                r, g, b, _ = image.cmap(image.norm(v))
                colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=8, color=colour)
            else:
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=7, color="grey")
    ax.set_xlabel("measured on" if figure.name.startswith("transfer_") else "pruned set")
    ax.set_ylabel("pruned set from")
    ax.set_title(heatmap_title(figure, matrix), fontsize=10)
    return _save(fig, path)


def annotated_grid(
    colour: Sequence[Sequence[float | None]],
    texts: Sequence[Sequence[str]],
    rows: Sequence[str],
    cols: Sequence[str],
    path: Path,
    *,
    title: str,
    labels: tuple[str, str, str],
    cmap: str = "RdBu_r",
    limits: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """A grid coloured by ``colour`` (None blank) with each cell's own text; ``labels``: x axis, y axis, colour bar.

    The orgad2026 sections share it: the capability matrix (diverging, centred on 0) and the EM p x q grid (rates).
    """
    values = np.array([[math.nan if v is None else float(v) for v in row] for row in colour], dtype=float)
    fig = MplFigure(figsize=(max(5.0, 1.6 * len(cols) + 2.5), max(3.2, 0.9 * len(rows) + 1.8)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=limits[0], vmax=limits[1], aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.8, label=labels[2])
    for i in range(len(rows)):
        for j in range(len(cols)):
            if math.isfinite(values[i, j]):
                r, g, b, _ = image.cmap(image.norm(values[i, j]))
                ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            else:
                ink = "grey"
            ax.text(j, i, texts[i][j] or "n/a", ha="center", va="center", fontsize=7, color=ink)
    ax.set_xticks(
        range(len(cols)), cols, rotation=30 if len(cols) > 3 else 0, ha="right" if len(cols) > 3 else "center"
    )
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
