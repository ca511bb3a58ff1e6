"""The compression report of experiment 1: runs.csv, compression.csv, PNGs and one self-contained report.html.

One row per (model, alignment variant) holds the three compression metrics side by side: (A) the smallest
sparsity reaching each harm-reduction target while utility stays above the floor, read off that variant's
signed-SNIP curve; (B) concentration of the positive harm score at K = round(k_sparsity * N), and its Gini;
(C) Jaccard separation of TopK(H) and TopK(U). Every value carries the run ids it was computed from, and each
variant's score files are loaded once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harmsweep.errors import HarmsweepError
from harmsweep.intervals import BootstrapSpec, Resampler
from harmsweep.report import figures as figs
from harmsweep.report import page, sections, uncertainty
from harmsweep.report.capabilities import capabilities_section
from harmsweep.report.collect import (
    Collected,
    ReportError,
    collect,
    is_number,
    require_rows,
    write_csv,
)
from harmsweep.report.compression import CurvePoint, concentration, gini, separation, threshold_sparsity
from harmsweep.report.console import harm_words
from harmsweep.report.control import control_section
from harmsweep.report.em_grid import em_grid_section
from harmsweep.report.families import family_rows, with_settings
from harmsweep.report.sections import target_name
from harmsweep.report.transfer import transfer_section


@dataclass
class Report:
    """What build_report wrote, and the rows behind it (for printing and for the W&B report run)."""

    out_dir: Path
    html: Path
    runs_csv: Path
    compression_csv: Path
    images: list[Path]
    compression: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    n_failed: int = 0
    skipped: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    differences: list[dict[str, Any]] = field(default_factory=list)


def _curve_rows(rows: Sequence[Mapping[str, Any]], rule: str) -> tuple[list[Mapping[str, Any]], Any]:
    """The variant's runs of ``rule`` at its most common protected fraction (one curve: other values would mix)."""
    of_rule = [r for r in rows if r.get("rule") == rule]
    if not of_rule:
        return [], None
    protect = Counter(r.get("protect") for r in of_rule).most_common(1)[0][0]
    return [r for r in of_rule if r.get("protect") == protect], protect


def _scores_source(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The run whose score files B and C read: the first (by run id) with a harm score file on disk."""
    candidates = sorted((r for r in rows if r.get("scores_harm")), key=lambda r: str(r["run_id"]))
    on_disk = [r for r in candidates if Path(str(r["scores_harm"])).is_file()]
    return (on_disk or candidates or [None])[0]


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def score_metrics(harm_path: str, benign_path: str | None, k: int) -> dict[str, Any]:
    """B (concentration at k), Gini and C (separation at k) from the score files, loaded once for all three."""
    from harmsweep.scoring.store import open_scores

    harm = open_scores(harm_path)
    out: dict[str, Any] = {"B_concentration": None, "gini": None, "C_separation": None}
    notes = []
    try:  # a compact set serves a top-k inside its stored tail only; it says so in one line otherwise
        out.update(B_concentration=concentration(harm, k), gini=gini(harm))
        if benign_path and Path(benign_path).is_file():
            out["C_separation"] = separation(harm, open_scores(benign_path), k)
    except (ValueError, HarmsweepError) as exc:
        notes.append(str(exc))
    out = {key: _finite_or_none(v) for key, v in out.items()}  # NaN (no positive mass) reads as missing
    return {**out, "note": "; ".join(notes)} if notes else out


def _metric_a(curve: Sequence[Mapping[str, Any]], targets: Sequence[float], floor: float) -> dict[str, Any]:
    """A per target: label, numeric sparsity and the run ids it was read from."""
    points = [
        CurvePoint(figs.curve_x(r), r.get("harm_reduction"), r.get("utility_ratio"), str(r["run_id"]))
        for r in curve
        if figs.curve_x(r) is not None
    ]
    out: dict[str, Any] = {}
    for target in targets:
        crossing = threshold_sparsity(points, target, floor)
        name = target_name(target)
        out.update(
            {name: crossing.label, f"{name}_sparsity": crossing.sparsity, f"{name}_runs": " ".join(crossing.run_ids)}
        )
    return out


def _metrics_bc(
    group: Sequence[Mapping[str, Any]], curve: Sequence[Mapping[str, Any]], k_sparsity: float
) -> dict[str, Any]:
    """B, Gini and C from one run's score files (the variant's scores are shared by its runs: loaded once).

    K = round(k_sparsity * N), at least 1: at the paper's 5e-6 a tiny model would otherwise select nothing.
    """
    source = _scores_source(curve) or _scores_source(group)
    n = next((r.get("n_scored") for r in group if is_number(r.get("n_scored"))), None)
    k = max(1, round(k_sparsity * n)) if n else None
    out: dict[str, Any] = {"N": n, "K": k, "B_concentration": None, "gini": None, "C_separation": None}
    out.update({"scores_run": None, "scores_harm": None, "scores_benign": None, "note": ""})
    if source is None or k is None:
        out["note"] = "no score files recorded (W&B source, or no scored rule in this variant)"
    elif not Path(str(source["scores_harm"])).is_file():
        out["note"] = f"score file missing: {source['scores_harm']}"
    elif problem := _damaged(source.get("scores_harm"), source.get("scores_benign")):
        out["note"] = f"score file damaged, not read: {problem}"
    else:
        out.update(score_metrics(str(source["scores_harm"]), source.get("scores_benign"), k))
        out.update({key: source.get(key) for key in ("scores_harm", "scores_benign")})
        out["scores_run"] = source["run_id"]
    return out


def _damaged(*paths: Any) -> str | None:
    """A score file whose cache entry no longer matches its manifest is never read (the run recomputes it)."""
    from harmsweep.cache import MANIFEST, entry_problem

    for path in (Path(str(p)) for p in paths if p):
        if (path.parent / MANIFEST).is_file() and (problem := entry_problem(path.parent, path.name)):
            return f"{path.parent.name}: {problem}"
    return None


def compression_rows(
    rows: Sequence[Mapping[str, Any]],
    k_sparsity: float = 5e-6,
    targets: Sequence[float] = (0.5, 0.8),
    utility_floor: float = 0.95,
    rule: str = figs.MAIN_RULE,
) -> list[dict[str, Any]]:
    """One row per (model, alignment): A per target, B, Gini, C, and the run ids behind each."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in figs.plain_rows(rows):
        if r.get("rule") != "lowrank":  # a low-rank removal has no mask: its figure is the lowrank section's
            groups.setdefault((str(r.get("model")), str(r.get("alignment"))), []).append(r)
    out = []
    for (model, alignment), group in sorted(groups.items()):
        curve, protect = _curve_rows(group, rule)
        row: dict[str, Any] = {
            "model": model,
            "alignment": alignment,
            "rule": rule,
            "protect": protect,
            "n_runs": len(curve),
            "harm_measure": "+".join(sorted({str(r.get("harm_measure")) for r in curve})) or None,
            "utility_measure": "+".join(sorted({str(r.get("utility_measure")) for r in curve})) or None,
        }
        row.update(_metric_a(curve, targets, utility_floor))
        row.update(_metrics_bc(group, curve, k_sparsity))
        mixed = [m for m in ("harm_measure", "utility_measure") if "+" in str(row[m])]
        if mixed:
            flags = " / ".join(f"--{m.replace('_', '-')}" for m in mixed)
            row["note"] = "; ".join(filter(None, [f"runs measured differently: force one with {flags}", row["note"]]))
        out.append(row)
    return out


def build_report(
    folders: Iterable[Path | str],
    out_dir: Path | str,
    k_sparsity: float = 5e-6,
    targets: Sequence[float] = (0.5, 0.8),
    utility_floor: float = 0.95,
    harm_measure: str | None = None,
    utility_measure: str | None = None,
    collected: Collected | None = None,
    bootstrap: BootstrapSpec | None = None,
) -> Report:
    """Collect the runs under ``folders`` (or take ``collected``, e.g. from W&B) and write the report files."""
    data = collected if collected is not None else collect(folders, harm_measure, utility_measure)
    require_rows(data)
    if not k_sparsity > 0 or not all(t > 0 for t in targets):
        raise ReportError(f"--k-sparsity ({k_sparsity}) and the targets ({targets}) must be > 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("exp_*.png"), *out.glob("pruned_*.png"), out / "curves.png", out / "lowrank.png"]:
        stale.unlink(missing_ok=True)  # a rebuilt report never shows a previous build's plot
    plain = with_settings(data.rows, data.settings)  # each run's family: what it shares with the runs it pools with
    rows = family_rows(plain)  # grouped by variant and family; runs.csv keeps the plain columns
    comp = compression_rows(rows, k_sparsity, targets, utility_floor)
    resampler = Resampler(bootstrap or BootstrapSpec())
    named = {target_name(t): t for t in targets}
    unc = uncertainty.annotate(comp, figs.plain_rows(rows), data.samples, named, utility_floor, resampler, figs.curve_x)
    diffs = [d.row() for d in unc.differences]
    bands = uncertainty.curve_bands(figs.plain_rows(rows), data.samples, resampler, figs.curve_x)
    images = [p for p in [figs.plot_curves(rows, out / "curves.png", targets, utility_floor, bands)] if p]
    images += figs.plot_counts(rows, out / "pruned_layers.png", out / "pruned_module_types.png")
    lowrank_png = figs.plot_lowrank(rows, out / "lowrank.png")
    images += [lowrank_png] if lowrank_png else []
    parts = [
        ("Compression per variant", "compression", sections.compression_section(comp, targets, k_sparsity)),
        ("Differences between variants", "differences", sections.differences_section(diffs, unc.without)),
        ("Harm and utility vs sparsity", "curves", sections.curves_section(out / "curves.png", images)),
        ("Where the pruned weights sit", "where", sections.where_section(rows, images)),
    ]
    if lowrank_png:
        parts.append(("Low-rank removal", "lowrank", sections.lowrank_section(rows, lowrank_png)))
    if data.figures:
        parts.append(("Experiment figures", "experiments", sections.experiment_section(data.figures, out, images)))
    for own in (transfer_section, capabilities_section, em_grid_section, control_section):  # orgad2026_* sweeps
        found = own(rows, out, images)  # writes <name>_<variant>.csv/.png; None when no run of its experiment
        if found:
            parts.append(found)
    parts.append(("All runs", "runs", page.records_table(plain)))
    runs_csv = write_csv(plain, out / "runs.csv")
    comp_csv = write_csv(comp, out / "compression.csv")
    write_csv(diffs, out / "differences.csv", list(uncertainty.Difference.__dataclass_fields__))
    settings = {
        "sources": data.sources, "k_sparsity": k_sparsity, "targets": list(targets), "utility_floor": utility_floor,
        "harm_measure": harm_measure or "auto", "utility_measure": utility_measure or "auto", "n_runs": len(rows),
        "n_failed": len(data.failed), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bootstrap": resampler.spec.describe(),
    }  # fmt: skip
    intro = page.note(
        f"{len(rows)} finished runs from {', '.join(data.sources)}; {len(data.failed)} failed runs left out"
        + (f"; {len(data.skipped)} results skipped ({'; '.join(data.skipped)})" if data.skipped else "")
        + f". Harm measure: {settings['harm_measure']}, utility measure: {settings['utility_measure']}, "
        f"utility floor {utility_floor:g}. Intervals: 95% paired bootstrap over held-out prompts "
        f"({resampler.spec.samples} replicates). Built {settings['created']}. Tables: runs.csv, compression.csv, "
        "differences.csv."
    )
    html_path = out / "report.html"
    tmp = html_path.with_suffix(".html.tmp")
    tmp.write_text(page.render("harmsweep compression report", intro, parts), encoding="utf-8")
    tmp.replace(html_path)
    return Report(out, html_path, runs_csv, comp_csv, images, comp, rows, len(data.failed), data.skipped, settings,
                  diffs)  # fmt: skip


def summary_text(report: Report, targets: Sequence[float] | None = None) -> str:
    """The compression table as aligned text, then where the report is."""
    names = [target_name(t) for t in (targets or report.settings.get("targets", (0.5, 0.8)))]
    header = ["variant", *names, "K", "B", "Gini", "C", "runs"]
    lines = [
        [f"{r['model']}/{r['alignment']}", *(f"{r[n]} {r.get(f'{n}_ci') or ''}".rstrip() for n in names),
         page.fmt(r["K"]),
         *(page.fmt(r[k]) for k in ("B_concentration", "gini", "C_separation")), str(r["n_runs"])]
        for r in report.compression
    ]  # fmt: skip
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]
    text = ["  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in [header, *lines]]
    failed = f", {report.n_failed} failed left out" if report.n_failed else ""
    diffs = [f"  {d['first']} - {d['second']}: {d['figure']} {page.fmt(d['estimate'])} "
             f"{sections.interval(d['lo'], d['hi']) or ''} p={page.fmt(d['p'])}: {d['verdict']}" for d in report.differences]  # fmt: skip
    short = [r for r in report.runs if is_number(r.get("n_asked")) and is_number(r.get("n_pruned"))
             and r["n_pruned"] < r["n_asked"]]  # fmt: skip
    fewer = [f"{len(short)} runs pruned fewer weights than their sparsity asks for (too few eligible; runs.csv: "
             f"n_pruned < n_asked): {', '.join(str(r['run_id']) for r in short[:5])}"] if short else []  # fmt: skip
    return "\n".join([f"{len(report.runs)} runs{failed}", *text, *_headlines(report), *fewer, *diffs,
                      f"report: {report.html}"])  # fmt: skip


def _headlines(report: Report) -> list[str]:
    """Per variant, the signed-SNIP point that removes most harm while utility stays above the floor."""
    floor = float(report.settings.get("utility_floor", 0.95))
    out = []
    for comp in report.compression:
        points = [r for r in report.runs if r.get("model") == comp["model"] and r.get("alignment") == comp["alignment"]
                  and r.get("rule") == "signed_snip" and r.get("harm_reduction") is not None
                  and r.get("utility_ratio") is not None]  # fmt: skip
        kept = [r for r in points if r["utility_ratio"] >= floor]
        if not points:
            continue
        best = max(kept, key=lambda r: r["harm_reduction"]) if kept else max(points, key=lambda r: r["utility_ratio"])
        note = "" if kept else f" (no point keeps utility >= {floor:g}; the gentlest shown)"
        harm = harm_words(best["harm_reduction"], best.get("harm_reduction_lo"), best.get("harm_reduction_hi"))
        out.append(f"  {comp['alignment']}: {harm} at utility ratio {best['utility_ratio']:.2f}, "
                   f"sparsity {best['sparsity']:g} (run {best['run_id']}){note}")  # fmt: skip
    return out
