"""The B-TAP authors' transfer matrix (experiment=orgad2026_transfer): prune on harm category A, evaluate on B.

Each run of that sweep is one ordered pair (A, B), A != B; its result.json holds the change of the harm measure on
B's HEx-PHI prompts with a paired bootstrap interval. Here the runs of one model variant become one A x B matrix
(rows: prune category, columns: eval category, diagonal empty: no run prunes and evaluates the same category),
written as a CSV (one line per cell, blank where no run finished) and a PNG. The cell is the change of the
StrongREJECT mean, or of the keyword ASR when no run was judged by StrongREJECT; one measure per matrix, never mixed.
Only runs of that experiment are read, so other sweeps under the same folder are not pooled in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harmsweep.data.spec import CHOSEN_FIVE
from harmsweep.report import page
from harmsweep.report.collect import figure_files, is_number

EXPERIMENT = "orgad2026_transfer"
MEASURES = {"strongreject": "strongreject_mean", "asr_keyword": "asr_keyword_mean"}  # first recorded wins
COLUMNS = ("model", "alignment", "prune_category", "eval_category", "measure", "metric", "value", "lo", "hi", "n",
           "before", "after", "run_id", "note")  # fmt: skip


@dataclass(frozen=True)
class Run:
    """What one transfer run contributes: its pair, its metrics and their intervals."""

    run_id: str
    model: str
    alignment: str
    prune: str
    eval: str
    metrics: Mapping[str, Any]
    intervals: Mapping[str, Any]


@dataclass
class TransferMatrix:
    """One model variant's matrix: the categories (rows = columns), the measure, one cell per ordered pair."""

    model: str
    alignment: str
    categories: list[str]
    measure: str | None
    cells: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"transfer_{self.model}_{self.alignment}"

    def rows(self) -> list[dict[str, Any]]:
        """Every off-diagonal pair in matrix order; a pair without a finished run keeps only its labels."""
        metric = f"delta_{MEASURES[self.measure]}" if self.measure else None
        out = []
        for a in self.categories:
            for b in self.categories:
                if a != b:
                    blank = {"value": None, "lo": None, "hi": None, "n": None, "before": None, "after": None}
                    out.append({"model": self.model, "alignment": self.alignment, "prune_category": a,
                                "eval_category": b, "measure": self.measure, "metric": metric,
                                **(self.cells.get((a, b)) or blank)})  # fmt: skip
        return out

    def values(self) -> list[list[float | None]]:
        return [[(self.cells.get((a, b)) or {}).get("value") for b in self.categories] for a in self.categories]


def pair_of(config: Mapping[str, Any]) -> tuple[str, str] | None:
    """(A, B) from the run's transfer block, else from data.harmful (minus_category A, category B)."""
    block = config.get("transfer") or {}
    if block.get("prune") and block.get("eval"):
        return str(block["prune"]), str(block["eval"])
    harmful = (config.get("data") or {}).get("harmful") or {}
    categories = harmful.get("categories") or []
    b = harmful.get("category") or (categories[0] if len(categories) == 1 else None)
    a = harmful.get("minus_category")
    return (str(a), str(b)) if a and b else None


def run_of(result: Mapping[str, Any]) -> Run | None:
    """The transfer run a result.json holds, or None (another experiment, or no pair recorded)."""
    config = result.get("config") or {}
    if (result.get("experiment") or config.get("experiment")) != EXPERIMENT:
        return None
    pair = pair_of(config)
    if pair is None:
        return None
    return Run(str(result.get("run_id")), str(result.get("model")), str(result.get("alignment")), *pair,
               result.get("metrics") or {}, (result.get("intervals") or {}).get("metrics") or {})  # fmt: skip


def category_order(names: Sequence[str]) -> list[str]:
    """chosen_five in the authors' order first, any other category after them alphabetically."""
    known = [c for c in CHOSEN_FIVE if c in names]
    return known + sorted(set(names) - set(known))


def measure_of(runs: Sequence[Run]) -> str | None:
    """The first measure (StrongREJECT, then keyword ASR) that any of the runs recorded a change of."""
    for measure, key in MEASURES.items():
        if any(_figure(r, f"delta_{key}")["value"] is not None for r in runs):
            return measure
    return None


def _figure(run: Run, key: str) -> dict[str, Any]:
    """{value, lo, hi, n} of a metric: its interval when recorded, else the bare point value."""
    found = run.intervals.get(key) or {}
    value = found.get("value") if found else run.metrics.get(key)
    ok = is_number(value)
    return {
        "value": float(value) if ok else None,
        "lo": found.get("lo") if ok and is_number(found.get("lo")) else None,
        "hi": found.get("hi") if ok and is_number(found.get("hi")) else None,
        "n": found.get("n") if ok else None,
    }


def matrices(runs: Sequence[Run]) -> list[TransferMatrix]:
    """One matrix per (model, alignment); a pair with several runs shows the first by run id and names the others."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in sorted(runs, key=lambda r: r.run_id):
        groups.setdefault((run.model, run.alignment), []).append(run)
    out = []
    for (model, alignment), group in sorted(groups.items()):
        measure = measure_of(group)
        categories = category_order([c for r in group for c in (r.prune, r.eval)])
        matrix = TransferMatrix(model, alignment, categories, measure)
        for run in group:
            pair = (run.prune, run.eval)
            if pair in matrix.cells:
                cell = matrix.cells[pair]
                cell["note"] = f"{cell['note'] or 'also run'} {run.run_id}"
                continue
            matrix.cells[pair] = {**_cell(run, measure), "run_id": run.run_id, "note": ""}
        out.append(matrix)
    return out


def _cell(run: Run, measure: str | None) -> dict[str, Any]:
    """The change with its interval, and the before/after values it is the difference of."""
    if measure is None:
        return {"value": None, "lo": None, "hi": None, "n": None, "before": None, "after": None}
    key = MEASURES[measure]
    stages = {s: run.metrics.get(f"{key}_{s}") for s in ("before", "after")}
    return {**_figure(run, f"delta_{key}"), **{s: v if is_number(v) else None for s, v in stages.items()}}


def read_runs(rows: Sequence[Mapping[str, Any]]) -> list[Run]:
    """The transfer runs among the report's rows, from their result.json (W&B rows have none: left out)."""
    runs = []
    for row in rows:
        path = Path(str(row.get("folder"))) / "result.json"
        if row.get("experiment") == EXPERIMENT and path.is_file():
            run = run_of(json.loads(path.read_text()))
            if run is not None:
                runs.append(run)
    return runs


def plot(matrix: TransferMatrix, path: Path) -> Path:
    """Rows = prune category, columns = eval category; each cell its change and 95% interval, diagonal grey."""
    import numpy as np
    from matplotlib.figure import Figure as MplFigure

    from harmsweep.report.figures import _save

    cats, n = matrix.categories, len(matrix.categories)
    values = np.array([[math.nan if v is None else v for v in row] for row in matrix.values()], dtype=float)
    finite = values[np.isfinite(values)]
    bound = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
    fig = MplFigure(figsize=(max(5.0, 1.5 * n + 2.5), max(4.0, 1.0 * n + 1.8)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    metric = f"delta_{MEASURES[matrix.measure]}" if matrix.measure else "no harm measure"
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"{metric} (after - before)")
    for i in range(n):
        ax.add_patch(_diagonal_patch(i))
        for j in range(n):
            cell = matrix.cells.get((cats[i], cats[j])) or {}
            if i != j and cell.get("value") is not None:
                r, g, b, _ = image.cmap(image.norm(cell["value"]))
                colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, _cell_text(cell, "\n"), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(n), cats, rotation=30, ha="right")
    ax.set_yticks(range(n), cats)
    ax.set_xlabel("evaluated on (HEx-PHI B not A)")
    ax.set_ylabel("pruned on (AdvBench A not B)")
    ax.set_title(f"{EXPERIMENT} · {matrix.model}/{matrix.alignment}", fontsize=10)
    return _save(fig, path)


def _diagonal_patch(i: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((i - 0.5, i - 0.5), 1, 1, facecolor="#dddddd", edgecolor="none")


def _cell_text(cell: Mapping[str, Any], sep: str = " ") -> str:
    if cell.get("value") is None:
        return ""
    lo, hi = cell.get("lo"), cell.get("hi")
    ci = f"{sep}[{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else ""
    return f"{cell['value']:+.3f}{ci}"


def section(matrices_: Sequence[TransferMatrix], pngs: Sequence[Path]) -> str:
    """Per variant: the PNG, the matrix as a table (value [95% interval], run id) and what the cell means."""
    parts = []
    for matrix, png in zip(matrices_, pngs, strict=True):
        cats = matrix.categories
        lines = [
            [f"<b>{page.esc(a)}</b>", *(
                "" if a == b else page.cell(_cell_text(matrix.cells.get((a, b)) or {}) or None,
                                            (matrix.cells.get((a, b)) or {}).get("run_id"))
                for b in cats)]
            for a in cats
        ]  # fmt: skip
        metric = f"delta_{MEASURES[matrix.measure]}" if matrix.measure else "no harm measure recorded"
        parts.append(f"<h3>{page.esc(matrix.model)} / {page.esc(matrix.alignment)}</h3>" + page.image(png, matrix.name))
        parts.append(page.table(["pruned on \\ evaluated on", *cats], lines))
        parts.append(page.note(
            f"Cell: {metric} (after - before pruning) on the HEx-PHI prompts of the column category not in the row "
            f"category, prefilled, with its 95% paired bootstrap interval; pruned on advbench_(row)_not_(column). "
            f"Diagonal empty; a pair without a finished run is blank. Table: {matrix.name}.csv."
        ))  # fmt: skip
    return "".join(parts)


def transfer_section(rows: Sequence[Mapping[str, Any]], out: Path, images: list[Path]) -> tuple[str, str, str] | None:
    """The report's transfer part: writes transfer_<model>_<alignment>.csv/.png per variant (None: no such runs)."""
    found = matrices(read_runs(rows))
    pngs = figure_files(out, "transfer", found, COLUMNS, lambda x: x.rows(), plot, images)
    if not found:
        return None
    return "Transfer between harm categories", "transfer", section(found, pngs)
