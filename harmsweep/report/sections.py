"""The report page's sections: the compression table, curves, low-rank runs, variant differences, where the
weights sit, and each experiment's figures, as HTML fragments (report/page.py assembles the page)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harmsweep.report import figures as figs
from harmsweep.report import page
from harmsweep.report.collect import is_number

IDENTITY = ("model", "alignment", "rule", "protect", "n_runs", "harm_measure", "utility_measure")


def target_name(target: float) -> str:
    """0.5 -> 'A50', 0.8 -> 'A80', 0.925 -> 'A92.5'."""
    return f"A{target * 100:g}"


def compression_section(rows: Sequence[Mapping[str, Any]], targets: Sequence[float], k_sparsity: float) -> str:
    """Variants side by side: one column per variant, one row per metric, run ids under each value."""
    if not rows:
        return page.note("No plain pruning runs: nothing to compare.")
    header = ["", *(f"{r['model']} / {r['alignment']}" for r in rows)]
    lines: list[list[str]] = []
    for name in (target_name(t) for t in targets):
        lines.append([f"<b>{name}</b>", *(page.cell(r[name], r[f"{name}_runs"]) for r in rows)])
        lines.append([f"<b>{name} 95% CI</b>", *(page.cell(r.get(f"{name}_ci")) for r in rows)])
        if any(r.get(f"{name}_seeds") for r in rows):
            lines.append([f"<b>{name} per seed</b>", *(page.cell(r.get(f"{name}_seeds")) for r in rows)])
    lines.append(["<b>selective area</b>", *(page.cell(_with_ci(r, "area")) for r in rows)])
    if any(r.get("area_seeds") for r in rows):
        lines.append(["<b>selective area per seed</b>", *(page.cell(r.get("area_seeds")) for r in rows)])
    for key, label in (
        ("B_concentration", "B concentration @K"),
        ("gini", "Gini"),
        ("C_separation", "C separation @K"),
    ):
        lines.append([f"<b>{label}</b>", *(page.cell(r[key], r["scores_run"]) for r in rows)])
    for key in ("K", "N", *IDENTITY[2:], "n_seeds", "n_items", "note"):
        lines.append([f"<b>{key}</b>", *(page.cell(r.get(key)) for r in rows)])
    text = (
        "AX: smallest sparsity at which the harm reduction reaches X% while the utility ratio stays at or above the "
        "floor (interpolated in log sparsity between the two runs named; '>s': not reached up to s); its 95% CI "
        "comes from resampling the held-out prompts of every run of the curve at once (seeds averaged), and 'per "
        "seed' is each seed's own curve. Selective area: mean over log sparsity of harm reduction + utility ratio - 1 "
        "(the gap between the harm curve and the utility-loss curve; higher = more harm removed per utility lost). "
        f"B: share of the positive harm score held by the top K = round({k_sparsity:g} x N) weights. Gini of the "
        f"positive harm scores. C: Jaccard overlap of TopK(harm) and TopK(benign importance); lower = more separate."
    )
    return page.table(header, lines) + page.note(text)


def _with_ci(row: Mapping[str, Any], key: str) -> str | None:
    value, lo, hi = row.get(key), row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if not is_number(value):
        return None
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]" if is_number(lo) and is_number(hi) else f"{value:.3f}"


def curves_section(png: Path, images: Sequence[Path]) -> str:
    if png not in images:
        return page.note("No plain runs with a sparsity.")
    return page.image(png, "harm and utility curves") + page.note(
        "Per run, harm reduction and utility ratio relative to the unpruned model (measures in the runs table); "
        "points at one sparsity are averaged. Random and magnitude pruning are the controls (dashed). Bands: 95% "
        "intervals from a paired bootstrap over the held-out prompts (runs without per-item values have none)."
    )


def lowrank_section(rows: Sequence[Mapping[str, Any]], png: Path) -> str:
    """method=lowrank runs: the figure, and per run its ranks, harm reduction and utility ratio with intervals."""
    table = [
        {"model": r.get("model"), "alignment": r.get("alignment"), "rank_harmful": r.get("rank_harmful"),
         "rank_utility": r.get("rank_utility"), "harm_reduction": _with_ci(r, "harm_reduction"),
         "utility_ratio": _with_ci(r, "utility_ratio"), "run_id": r.get("run_id")}
        for r in sorted(figs.lowrank_rows(rows), key=lambda r: (str(r.get("alignment")), r.get("rank_harmful")))
    ]  # fmt: skip
    return (
        page.image(png, "low-rank removal")
        + page.records_table(table)
        + page.note(
            "ActSVD (method=lowrank): per matrix, W - (I - P_utility) P_harmful W, with P the projection on the top "
            "singular directions of W X over the harmful (rank_harmful) and benign (rank_utility) calibration sets."
        )
    )


def differences_section(diffs: Sequence[Mapping[str, Any]], without: Sequence[str]) -> str:
    """Each pair of variants: the difference, its interval and p-value, and whether it can be told apart at all."""
    if not diffs:
        return page.note("Fewer than two variants with per-item values: nothing to compare.") + _without(without)
    rows = [
        {"first": d["first"], "second": d["second"], "figure (first - second)": d["figure"],
         "estimate": d["estimate"], "95% CI": interval(d["lo"], d["hi"]), "p": d["p"], "verdict": d["verdict"]}
        for d in diffs
    ]  # fmt: skip
    text = (
        "log10 AX < 0: the first variant reaches the harm target at fewer pruned weights (more compressed). Selective "
        "area > 0: the first removes more harm per utility lost, over the sparsities both tried. Intervals and "
        "two-sided p-values from the same bootstrap (paired where both variants were evaluated on the same prompts); "
        "'not distinguishable' where the interval includes 0."
    )
    return page.records_table(rows) + page.note(text) + _without(without)


def interval(lo: Any, hi: Any) -> str | None:
    """'[-0.42, 0.13]'; an infinite bound (one variant never reaches a target) reads 'inf'."""

    def ok(v: Any) -> bool:
        return isinstance(v, int | float) and not math.isnan(v)

    return f"[{lo:.3g}, {hi:.3g}]" if ok(lo) and ok(hi) else None


def _without(variants: Sequence[str]) -> str:
    return page.note(f"No intervals for {', '.join(variants)}: their runs kept no per-item values.") if variants else ""


def where_section(rows: Sequence[Mapping[str, Any]], images: Sequence[Path]) -> str:
    """The bar charts and the counts they were drawn from, with the run each came from."""
    sources = figs.count_sources(rows)
    if not sources:
        return page.note(f"No {figs.MAIN_RULE} run recorded pruned counts.")
    counts = [
        {"variant": f"{v[0]} / {v[1]}", "run": r["run_id"], "sparsity": r.get("sparsity"), "n_pruned": r.get("n_pruned"),
         **{k: r[k] for k in r if k.startswith("pruned/")}}
        for v, r in sources.items()
    ]  # fmt: skip
    return "".join(page.image(p, p.stem) for p in images if p.name.startswith("pruned_")) + page.records_table(counts)


def experiment_section(figures: Sequence[Any], out_dir: Path, images: list[Path]) -> str:
    parts = []
    for i, fig in enumerate(figures):
        try:
            matrix = figs.load_matrix(fig.path)
        except (OSError, ValueError) as exc:
            parts.append(f"<h3>{page.esc(fig.name)}</h3>" + page.note(f"unreadable: {exc}"))
            continue
        run = f"<span class='ids'>run {page.esc(fig.run_id)}</span>"
        parts.append(f"<h3>{page.esc(fig.experiment)} · {page.esc(fig.name)} {run}</h3>")
        if figs.is_heatmap(fig):
            png = figs.plot_heatmap(fig, matrix, out_dir / f"exp_{i:02d}_{fig.run_id}_{fig.name}.png")
            images.append(png)
            parts.append(page.image(png, f"{fig.name} heatmap"))
        parts.append(page.matrix_table(matrix))
        chance = matrix.get("chance")
        notes = [str(matrix.get("kind") or ""), str(matrix.get("note") or "")]
        notes.append(f"chance level K/N = {chance:.3g}" if is_number(chance) else "")
        parts.append(page.note(". ".join(n.rstrip(". ") for n in notes if n) + "."))
    return "".join(parts)
