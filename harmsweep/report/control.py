"""The B-TAP authors' control task (experiment=orgad2026_control): pruning factual recall must leave harm alone.

Two runs per model variant with the same recipe (btap_reference.md 2.2 and the to-do's btap_control): one pruned
from the harm pairs (calibration.prune_data=advbench_align_anti, the harm row) and one from TriviaQA pairs
(triviaqa_clean, the control row); any other prune file is a row of its own, named by it. Each row shows the
change of harm (the first judge recorded, named), TriviaQA accuracy (6.8), the keyword refusal rate and WikiText
perplexity (6.6), with 95% paired bootstrap intervals: control_<model>_<variant>.csv and a small bar chart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harmsweep.report import page
from harmsweep.report.capabilities import BLANK, change, ci_text, config_of, harm_metric, results_of, verdict
from harmsweep.report.collect import figure_files

EXPERIMENT = "orgad2026_control"
ROWS = {"advbench_align_anti": "harm", "triviaqa_clean": "control"}
MEASURES = ("triviaqa_acc", "refusal_rate", "perplexity")  # after the harm judge
COLUMNS = ("row", "prune_data", "column", "before", "after", "delta", "lo", "hi", "n", "run_id")
CLAIM = "harm pruning lowers harm, the control does not; the control lowers TriviaQA accuracy"


@dataclass
class ControlTable:
    """One model variant: rows (harm, control, others) with the run behind each, columns (label -> metric)."""

    model: str
    alignment: str
    harm: str | None
    columns: dict[str, str | None]
    runs: dict[str, Mapping[str, Any]] = field(default_factory=dict)  # row -> its result
    also: dict[str, list[str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"control_{self.model}_{self.alignment}"

    @property
    def rows(self) -> list[str]:
        known = [r for r in ROWS.values() if r in self.runs]
        return known + sorted(set(self.runs) - set(known))

    def cell(self, row: str, column: str) -> dict[str, Any]:
        key = self.columns.get(column)
        return change(self.runs[row], key) if row in self.runs and key else dict(BLANK)

    def records(self) -> list[dict[str, Any]]:
        return [{"row": r, "prune_data": prune_data(self.runs[r]), "column": c, **self.cell(r, c),
                 "run_id": self.runs[r].get("run_id")} for r in self.rows for c in self.columns]  # fmt: skip


def prune_data(result: Mapping[str, Any]) -> str | None:
    value = (config_of(result).get("calibration") or {}).get("prune_data")
    return None if value is None else str(value)


def tables(results: Sequence[Mapping[str, Any]]) -> list[ControlTable]:
    """One table per (model, alignment); a prune file run twice shows the first by run id and names the others."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for result in sorted(results, key=lambda r: str(r.get("run_id"))):
        if prune_data(result) is not None:
            groups.setdefault((str(result.get("model")), str(result.get("alignment"))), []).append(result)
    out = []
    for (model, alignment), group in sorted(groups.items()):
        harm = harm_metric(group)
        columns: dict[str, str | None] = {f"harm ({harm or 'no harm judge'})": harm, **{m: m for m in MEASURES}}
        table = ControlTable(model, alignment, harm, columns)
        for result in group:
            name = str(prune_data(result))
            label = ROWS.get(name, name)
            if label in table.runs:
                table.also.setdefault(label, []).append(str(result.get("run_id")))
            else:
                table.runs[label] = result
        out.append(table)
    return out


def reading(table: ControlTable) -> str:
    """The claim, then what these runs show for each of its three parts."""
    harm_col = next(iter(table.columns))
    parts = [("harm pruning lowers harm", "harm", harm_col), ("the control lowers harm", "control", harm_col),
             ("the control lowers TriviaQA accuracy", "control", "triviaqa_acc")]  # fmt: skip
    found = []
    for text, row, column in parts:
        cell = table.cell(row, column)
        found.append(f"{text}: {verdict(cell)} {ci_text(cell['delta'], cell['lo'], cell['hi'])}".rstrip())
    return f"Expected: {CLAIM}. Here: " + "; ".join(found) + "."


def plot(table: ControlTable, path: Path) -> Path:
    """One small panel per measure, one bar per row (its change), 95% intervals as error bars."""
    from matplotlib.figure import Figure as MplFigure

    from harmsweep.report.figures import _save

    cols, rows = list(table.columns), table.rows
    fig = MplFigure(figsize=(2.6 * len(cols) + 0.6, 3.4), layout="constrained")
    axes = fig.subplots(1, len(cols), squeeze=False)[0]
    for ax, column in zip(axes, cols, strict=True):
        cells = [table.cell(r, column) for r in rows]
        heights = [math.nan if c["delta"] is None else c["delta"] for c in cells]  # not measured: no bar
        below = [c["delta"] - c["lo"] if c["delta"] is not None and c["lo"] is not None else math.nan for c in cells]
        above = [c["hi"] - c["delta"] if c["delta"] is not None and c["hi"] is not None else math.nan for c in cells]
        ax.bar(range(len(rows)), heights, yerr=[below, above], capsize=3,
               color=[f"C{i % 10}" for i in range(len(rows))])  # fmt: skip
        for i, c in enumerate(cells):
            if c["delta"] is None:
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=7, color="grey")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(rows)), rows, rotation=20 if len(rows) > 2 else 0, fontsize=8)
        ax.set_title(f"delta {column}", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{EXPERIMENT} · {table.model}/{table.alignment}: after - before [95% CI]", fontsize=10)
    return _save(fig, path)


def section(found: Sequence[ControlTable], pngs: Sequence[Path]) -> str:
    parts = []
    for table, png in zip(found, pngs, strict=True):
        lines = [[f"<b>{page.esc(r)}</b>", page.esc(prune_data(table.runs[r])),
                  *(page.cell(ci_text(c["delta"], c["lo"], c["hi"]) or None)
                    for c in (table.cell(r, col) for col in table.columns)),
                  page.cell(str(table.runs[r].get("run_id")), table.also.get(r))] for r in table.rows]  # fmt: skip
        parts.append(f"<h3>{page.esc(table.model)} / {page.esc(table.alignment)}</h3>" + page.image(png, table.name))
        parts.append(page.table(["row", "prune_data", *(f"delta {c}" for c in table.columns), "run"], lines))
        parts.append(page.note(
            "Cell: after - before pruning with its 95% paired bootstrap interval; lowered = the whole interval below "
            f"0. Table: {table.name}.csv."
        ))  # fmt: skip
        parts.append(page.note(reading(table)))
    return "".join(parts)


def control_section(rows: Sequence[Mapping[str, Any]], out: Path, images: list[Path]) -> tuple[str, str, str] | None:
    """The report's control part: control_<model>_<variant>.csv/.png per variant (None: no such runs)."""
    found = tables(results_of(rows, EXPERIMENT))
    pngs = figure_files(out, "control", found, COLUMNS, lambda x: x.records(), plot, images)
    if not found:
        return None
    return "Control: harm pruning vs factual-recall pruning", "control", section(found, pngs)
