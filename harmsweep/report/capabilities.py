"""The B-TAP authors' dissociation test (experiment=orgad2026_capabilities): which capability goes when one is pruned.

Each run prunes one capability (capabilities.prune: harm, explanation, detection or refusal) and measures all of
them before and after (btap_reference.md 6.4); the fifth run prunes harm and then applies the fine-tuning attack
(capabilities.attack=finetune_prefill, 5.3): recovery. Per model variant the runs become one matrix, rows = the
capability pruned, columns = the capability measured, each cell the change (after - before) with its 95% paired
bootstrap interval, written as capabilities_<model>_<variant>.csv and .png. The harm column uses the first judge
any run recorded (StrongREJECT, rubric, keyword ASR) and names it; one judge per matrix, never mixed.

The small readers at the top (results_of, change, harm_metric, ci_text, verdict) are shared with control.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harmsweep.report import page
from harmsweep.report.collect import figure_files, is_number

EXPERIMENT = "orgad2026_capabilities"
HARM_JUDGES = ("strongreject_mean", "rubric_mean", "asr_keyword_mean")  # first recorded wins (judges, not NLL)
CAPABILITIES = ("harm", "explanation", "detection", "refusal")
MEASURED = {"explanation": "explanation_mean", "detection": "detection_accuracy", "refusal": "refusal_rate"}
EXTRA = {"coherence": "coherence_mean", "explanation coherence": "explanation_coherence_mean"}  # shown when recorded
RECOVERY = "harm, then fine-tuning attack"
COLUMNS = ("row", "column", "before", "after", "delta", "lo", "hi", "n", "metric", "run_id")
BLANK = {"before": None, "after": None, "delta": None, "lo": None, "hi": None, "n": None}


# ---------------------------------------------------------------- shared readers


def results_of(rows: Sequence[Mapping[str, Any]], experiment: str) -> list[dict[str, Any]]:
    """The result.json of every report row of ``experiment``, by run id (W&B rows have no folder: left out)."""
    out = []
    for row in rows:
        path = Path(str(row.get("folder"))) / "result.json"
        if row.get("experiment") == experiment and path.is_file():
            result = json.loads(path.read_text())
            if isinstance(result, dict):
                out.append(result)
    return sorted(out, key=lambda r: str(r.get("run_id")))


def _number(value: Any) -> float | None:
    return float(value) if is_number(value) else None


def stat(found: Mapping[str, Any] | None, fallback: Any = None) -> dict[str, Any]:
    """{value, lo, hi, n} of an interval record; a bare ``fallback`` value when no interval was recorded."""
    found = found or {}
    value = _number(found.get("value"))
    if value is None:  # no interval (or an empty one): the bare value, without bounds
        return {"value": _number(fallback), "lo": None, "hi": None, "n": None}
    return {"value": value, "lo": _number(found.get("lo")), "hi": _number(found.get("hi")), "n": found.get("n")}


def change(result: Mapping[str, Any], key: str) -> dict[str, Any]:
    """before, after and their difference (the delta_<key> interval's value, else after - before) with its interval."""
    metrics = result.get("metrics") or {}
    intervals = (result.get("intervals") or {}).get("metrics") or {}
    before, after = _number(metrics.get(f"{key}_before")), _number(metrics.get(f"{key}_after"))
    fallback = metrics.get(f"delta_{key}")
    if not is_number(fallback) and before is not None and after is not None:
        fallback = after - before
    delta = stat(intervals.get(f"delta_{key}"), fallback)
    return {"before": before, "after": after, "delta": delta["value"], "lo": delta["lo"], "hi": delta["hi"],
            "n": delta["n"]}  # fmt: skip


def stage(result: Mapping[str, Any], key: str, when: str) -> dict[str, Any]:
    """One stage's value (``when``: before or after) with its own interval when recorded."""
    intervals = (result.get("intervals") or {}).get("metrics") or {}
    return stat(intervals.get(f"{key}_{when}"), (result.get("metrics") or {}).get(f"{key}_{when}"))


def harm_metric(results: Sequence[Mapping[str, Any]]) -> str | None:
    """The first harm judge (StrongREJECT, rubric, keyword ASR) whose change any of the runs recorded."""
    for key in HARM_JUDGES:
        if any(change(r, key)["delta"] is not None for r in results):
            return key
    return None


def ci_text(
    value: float | None, lo: float | None = None, hi: float | None = None, sep: str = " ", signed: bool = True
) -> str:
    """'+0.123 [-0.200, +0.050]' (a change; unsigned for a level), the bare value without interval, '' without one."""
    if value is None:
        return ""
    form = "+.3f" if signed else ".3f"
    return f"{value:{form}}" + (f"{sep}[{lo:{form}}, {hi:{form}}]" if lo is not None and hi is not None else "")


def verdict(cell: Mapping[str, Any]) -> str:
    """'lowered' when the whole 95% interval lies below 0, 'not lowered' otherwise; no interval, no verdict."""
    if cell.get("delta") is None:
        return "not measured"
    if cell.get("lo") is None or cell.get("hi") is None:
        return "no interval"
    return "lowered" if cell["hi"] < 0 else "not lowered"


def config_of(result: Mapping[str, Any]) -> Mapping[str, Any]:
    return result.get("config") or {}


# ---------------------------------------------------------------- the matrix


def row_label(prune: str, attack: str) -> str:
    """The capability pruned; a run under another attack than prefilling is its own row (recovery for harm)."""
    if attack in ("", "prefill"):
        return prune
    return RECOVERY if (prune, attack) == ("harm", "finetune_prefill") else f"{prune} ({attack})"


@dataclass
class CapabilityMatrix:
    """One model variant: rows (capability pruned), columns (label -> metric), cells and the run behind each row."""

    model: str
    alignment: str
    harm: str | None
    rows: list[str]
    columns: dict[str, str | None]
    cells: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, Mapping[str, Any]] = field(default_factory=dict)  # row -> its result
    also: dict[str, list[str]] = field(default_factory=dict)  # row -> further run ids (first by run id is shown)

    @property
    def name(self) -> str:
        return f"capabilities_{self.model}_{self.alignment}"

    def cell(self, row: str, capability: str) -> dict[str, Any]:
        label = next((c for c in self.columns if c.split(" (")[0] == capability), capability)
        return self.cells.get((row, label)) or dict(BLANK)

    def records(self) -> list[dict[str, Any]]:
        """Every (row, column) pair in matrix order; a pair with nothing measured keeps only its labels."""
        return [{"row": r, "column": c, **(self.cells.get((r, c)) or BLANK),
                 "metric": f"delta_{m}" if m else None, "run_id": self.runs[r].get("run_id")}
                for r in self.rows for c, m in self.columns.items()]  # fmt: skip


def capability_of(result: Mapping[str, Any]) -> tuple[str, str] | None:
    """(capability pruned, attack) from the run's capabilities block; None when it has none."""
    block = config_of(result).get("capabilities") or {}
    return (str(block["prune"]), str(block.get("attack") or "prefill")) if block.get("prune") else None


def build_matrices(results: Sequence[Mapping[str, Any]]) -> list[CapabilityMatrix]:
    """One matrix per (model, alignment) from the runs of the capabilities experiment."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for result in sorted(results, key=lambda r: str(r.get("run_id"))):
        if capability_of(result) is not None:
            groups.setdefault((str(result.get("model")), str(result.get("alignment"))), []).append(result)
    out = []
    for (model, alignment), group in sorted(groups.items()):
        harm = harm_metric(group)
        columns: dict[str, str | None] = {f"harm ({harm or 'no harm judge'})": harm, **MEASURED}
        columns |= {
            label: key for label, key in EXTRA.items() if any(change(r, key)["delta"] is not None for r in group)
        }
        matrix = CapabilityMatrix(model, alignment, harm, [], columns)
        for result in group:
            label = row_label(*capability_of(result))  # type: ignore[misc]
            if label in matrix.runs:
                matrix.also.setdefault(label, []).append(str(result.get("run_id")))
                continue
            matrix.runs[label] = result
            for column, key in columns.items():
                matrix.cells[label, column] = change(result, key) if key else dict(BLANK)
        known = [*CAPABILITIES, RECOVERY]
        matrix.rows = [r for r in known if r in matrix.runs] + sorted(set(matrix.runs) - set(known))
        out.append(matrix)
    return out


# ---------------------------------------------------------------- the reading


def dissociation_lines(matrix: CapabilityMatrix) -> list[str]:
    """Per capability beside harm, whether pruning each lowers itself but not the other (a double dissociation)."""
    out = []
    for other in CAPABILITIES[1:]:
        if "harm" not in matrix.runs or other not in matrix.runs:
            continue
        a, b = matrix.cell("harm", "harm"), matrix.cell("harm", other)
        c, d = matrix.cell(other, other), matrix.cell(other, "harm")
        facts = (f"pruning harm: harm {verdict(a)} {ci_text(a['delta'], a['lo'], a['hi'])}, {other} {verdict(b)} "
                 f"{ci_text(b['delta'], b['lo'], b['hi'])}; pruning {other}: {other} {verdict(c)} "
                 f"{ci_text(c['delta'], c['lo'], c['hi'])}, harm {verdict(d)} {ci_text(d['delta'], d['lo'], d['hi'])}")  # fmt: skip
        shown = [verdict(x) for x in (a, b, c, d)] == ["lowered", "not lowered", "lowered", "not lowered"]
        out.append(f"harm vs {other}: {'double dissociation' if shown else 'no double dissociation shown'} ({facts}).")
    return out


def recovery_line(matrix: CapabilityMatrix) -> str:
    """Harm before pruning -> after pruning -> after pruning and the fine-tuning attack, each with its interval."""
    key = matrix.harm
    if key is None:
        return "Recovery: no harm judge recorded."
    if RECOVERY not in matrix.runs:
        return "Recovery: no run with capabilities.attack=finetune_prefill among these runs."
    harm_run = matrix.runs.get("harm") or {}
    steps = [stage(harm_run, key, "before"), stage(harm_run, key, "after"), stage(matrix.runs[RECOVERY], key, "after")]
    text = [ci_text(s["value"], s["lo"], s["hi"], signed=False) or "—" for s in steps]
    return (f"Recovery ({key}): before pruning {text[0]} -> after pruning harm {text[1]} -> after pruning and the "
            f"fine-tuning attack {text[2]} (run {matrix.runs[RECOVERY].get('run_id')}).")  # fmt: skip


# ---------------------------------------------------------------- files and page


def plot(matrix: CapabilityMatrix, path: Path) -> Path:
    """Cells coloured by the change over the largest |change| of their column (the scales differ: 1-5, rates)."""
    from harmsweep.report.figures import annotated_grid

    cols = list(matrix.columns)
    scale = {c: max([abs(matrix.cells[r, c]["delta"]) for r in matrix.rows
                     if matrix.cells[r, c]["delta"] is not None] or [0.0]) or 1.0 for c in cols}  # fmt: skip
    colour = [[None if matrix.cells[r, c]["delta"] is None else matrix.cells[r, c]["delta"] / scale[c] for c in cols]
              for r in matrix.rows]  # fmt: skip
    texts = [[ci_text(matrix.cells[r, c]["delta"], matrix.cells[r, c]["lo"], matrix.cells[r, c]["hi"], "\n")
              for c in cols] for r in matrix.rows]  # fmt: skip
    return annotated_grid(colour, texts, matrix.rows, cols, path,
                          title=f"{EXPERIMENT} · {matrix.model}/{matrix.alignment}: after - before [95% CI]",
                          labels=("capability measured", "capability pruned", "change / largest |change| in column"))  # fmt: skip


def section(matrices: Sequence[CapabilityMatrix], pngs: Sequence[Path]) -> str:
    """Per variant: the PNG, the table, the double-dissociation reading and the recovery line."""
    parts = []
    for matrix, png in zip(matrices, pngs, strict=True):
        lines = [[f"<b>{page.esc(r)}</b>",
                  *(page.cell(ci_text(matrix.cells[r, c]["delta"], matrix.cells[r, c]["lo"], matrix.cells[r, c]["hi"])
                              or None) for c in matrix.columns),
                  page.cell(str(matrix.runs[r].get("run_id")), matrix.also.get(r))]
                 for r in matrix.rows]  # fmt: skip
        parts.append(f"<h3>{page.esc(matrix.model)} / {page.esc(matrix.alignment)}</h3>" + page.image(png, matrix.name))
        parts.append(page.table(["pruned \\ measured", *matrix.columns, "run"], lines))
        parts.append(page.note(
            "Cell: after - before pruning of the column's measure (harm: the judge named; explanation: 1-5 score; "
            "detection: accuracy; refusal: keyword refusal rate; coherence 0-1) with its 95% paired bootstrap "
            f"interval. Table: {matrix.name}.csv. Reading: a capability is lowered when its whole interval lies "
            "below 0; harm and another capability are doubly dissociated when pruning harm lowers harm but not the "
            "other, and pruning the other lowers it but not harm."
        ))  # fmt: skip
        parts.extend(page.note(line) for line in [*dissociation_lines(matrix), recovery_line(matrix)])
    return "".join(parts)


def capabilities_section(
    rows: Sequence[Mapping[str, Any]], out: Path, images: list[Path]
) -> tuple[str, str, str] | None:
    """The report's dissociation part: capabilities_<model>_<variant>.csv/.png per variant (None: no such runs)."""
    found = build_matrices(results_of(rows, EXPERIMENT))
    pngs = figure_files(out, "capabilities", found, COLUMNS, lambda x: x.records(), plot, images)
    if not found:
        return None
    return "Dissociation: capability x capability", "capabilities", section(found, pngs)
