"""The B-TAP authors' emergent-misalignment grid (experiment=orgad2026_em): the pruned model's EM rate over p x q.

Each run prunes the original model at one (p = pruning.protect, q = pruning.harm_fraction), fine-tunes it on the
EM domain and measures how often its answers are misaligned and coherent (btap_reference.md section 11); its
result.json holds ``em2026`` with both arms' rates and intervals ("em_model": the fine-tuned unpruned model,
"pruned") and their difference. Per (model, domain, hold_zeros) the runs become one grid, rows p ascending,
columns q ascending, each cell the pruned EM rate with its 95% interval, the EM model's rate as the reference:
em_grid_<model>_<domain>.csv and .png. The judge's version is named beside the numbers; a proxy judge (its
version contains "proxy") gives proxy numbers, which the section says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harmsweep.report import page
from harmsweep.report.capabilities import ci_text, results_of, stat
from harmsweep.report.collect import figure_files, is_number

EXPERIMENT = "orgad2026_em"
COLUMNS = ("p", "q", "em_rate", "lo", "hi", "delta", "delta_lo", "delta_hi", "coherent_mean", "in_domain_rate", "n",
           "run_id")  # fmt: skip


@dataclass
class EMGrid:
    """One (model, alignment, domain, hold_zeros): the p and q values, one cell per (p, q), the judges seen."""

    model: str
    alignment: str
    domain: str
    hold_zeros: bool
    name: str = ""
    cells: dict[tuple[float, float], dict[str, Any]] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)  # the EM model's em_rate {value, lo, hi, n}
    references: list[float] = field(default_factory=list)  # every run's EM-model rate (one EM model: all equal)
    judges: list[str] = field(default_factory=list)
    in_domain_judges: list[str] = field(default_factory=list)
    also: list[str] = field(default_factory=list)  # runs of a (p, q) already shown

    @property
    def ps(self) -> list[float]:
        return sorted({p for p, _ in self.cells})

    @property
    def qs(self) -> list[float]:
        return sorted({q for _, q in self.cells})

    @property
    def proxy(self) -> bool:
        return any("proxy" in j.lower() for j in self.judges)

    def records(self) -> list[dict[str, Any]]:
        """Every (p, q) of the grid, p then q ascending; a pair without a run keeps only p and q."""
        return [{"p": p, "q": q, **(self.cells.get((p, q)) or {})} for p in self.ps for q in self.qs]


def _arm(block: Mapping[str, Any], arm: str, metric: str) -> dict[str, Any]:
    return stat(((block.get("arms") or {}).get(arm) or {}).get(metric))


def cell_of(block: Mapping[str, Any], run_id: str) -> dict[str, Any]:
    """The CSV line of one run: pruned EM rate and interval, its change from the EM model, coherence, in-domain."""
    rate, delta = _arm(block, "pruned", "em_rate"), stat((block.get("delta") or {}).get("em_rate"))
    return {"em_rate": rate["value"], "lo": rate["lo"], "hi": rate["hi"], "delta": delta["value"],
            "delta_lo": delta["lo"], "delta_hi": delta["hi"], "coherent_mean": _arm(block, "pruned", "coherent_mean")["value"],
            "in_domain_rate": _arm(block, "pruned", "in_domain_rate")["value"], "n": rate["n"], "run_id": run_id}  # fmt: skip


def grids(results: Sequence[Mapping[str, Any]]) -> list[EMGrid]:
    """One grid per (model, alignment, domain, hold_zeros); runs without an em2026 block or a numeric p, q: left out."""
    found: dict[tuple[str, str, str, bool], EMGrid] = {}
    for result in sorted(results, key=lambda r: str(r.get("run_id"))):
        block = result.get("em2026") or {}
        p, q = block.get("p"), block.get("q")
        if not (is_number(p) and is_number(q)):
            continue
        key = (str(result.get("model")), str(result.get("alignment")), str(block.get("domain")),
               bool(block.get("hold_zeros")))  # fmt: skip
        grid = found.setdefault(key, EMGrid(*key))
        rid = str(result.get("run_id"))
        if (float(p), float(q)) in grid.cells:
            grid.also.append(rid)
            continue
        grid.cells[float(p), float(q)] = cell_of(block, rid)
        reference = _arm(block, "em_model", "em_rate")
        if reference["value"] is not None:
            grid.reference = grid.reference or reference
            grid.references.append(reference["value"])
        for names, value in ((grid.judges, block.get("judge")), (grid.in_domain_judges, block.get("in_domain_judge"))):
            if value and str(value) not in names:
                names.append(str(value))
    alignments = {(m, d): {a for (m2, a, d2, _) in found if (m2, d2) == (m, d)} for (m, _, d, _) in found}
    for (model, alignment, domain, hold), grid in found.items():
        suffix = (f"_{alignment}" if len(alignments[model, domain]) > 1 else "") + ("_hold_zeros" if hold else "")
        grid.name = f"em_grid_{model}_{domain}{suffix}"
    return [found[k] for k in sorted(found)]


def judge_text(grid: EMGrid) -> str:
    """Which judge made the numbers; proxy numbers said as such."""
    if not grid.judges:
        return "Judge: not recorded."
    text = f"Judge: {', '.join(grid.judges)}"
    if grid.in_domain_judges:
        text += f"; in-domain judge: {', '.join(grid.in_domain_judges)}"
    if grid.proxy:
        text += (". These are proxy numbers: an offline stand-in judge, not the authors' GPT-4o judge, so the rates "
                 "are not comparable to theirs")  # fmt: skip
    return text + "."


def reference_text(grid: EMGrid) -> str:
    ref = grid.reference
    rate = ci_text(ref.get("value"), ref.get("lo"), ref.get("hi"), signed=False) or "—"
    text = f"EM model (fine-tuned, unpruned): {rate}"
    if len(set(grid.references)) > 1:
        text += f" (runs disagree: {', '.join(f'{v:.3f}' for v in grid.references)})"
    return text


def plot(grid: EMGrid, path: Path) -> Path:
    from harmsweep.report.figures import annotated_grid

    ps, qs = grid.ps, grid.qs
    values = [[(grid.cells.get((p, q)) or {}).get("em_rate") for q in qs] for p in ps]
    texts = [[ci_text(c.get("em_rate"), c.get("lo"), c.get("hi"), "\n", signed=False) if c else ""
              for c in ((grid.cells.get((p, q)) or {}) for q in qs)] for p in ps]  # fmt: skip
    top = max([v for row in values for v in row if v is not None] + grid.references + [1e-6])
    hold = ", pruned weights held at 0" if grid.hold_zeros else ""
    proxy = " · PROXY judge" if grid.proxy else ""
    return annotated_grid(values, texts, [f"{p:g}" for p in ps], [f"{q:g}" for q in qs], path, cmap="Reds",
                          limits=(0.0, top), labels=("q (harm_fraction)", "p (protect)", "pruned EM rate"),
                          title=f"{grid.model} · {grid.domain}{hold}{proxy}\n{reference_text(grid)}")  # fmt: skip


def section(found: Sequence[EMGrid], pngs: Sequence[Path]) -> str:
    parts = []
    for grid, png in zip(found, pngs, strict=True):
        lines = [[f"<b>{p:g}</b>", *(page.cell(ci_text(c.get("em_rate"), c.get("lo"), c.get("hi"), signed=False)
                                               or None, c.get("run_id")) if c else ""
                                     for c in (grid.cells.get((p, q)) for q in grid.qs))] for p in grid.ps]  # fmt: skip
        hold = "held at zero during fine-tuning" if grid.hold_zeros else "not held at zero (the authors' setting)"
        parts.append(f"<h3>{page.esc(grid.model)} / {page.esc(grid.alignment)} · {page.esc(grid.domain)}</h3>"
                     + page.image(png, grid.name))  # fmt: skip
        parts.append(page.table(["p \\ q", *(f"{q:g}" for q in grid.qs)], lines))
        parts.append(page.note(
            f"Cell: EM rate of the pruned, then fine-tuned model (misaligned and coherent answers) with its 95% "
            f"interval; {reference_text(grid)}. Pruned weights {hold}. Table: {grid.name}.csv (with the change from "
            f"the EM model, coherence and in-domain rate)."
            + (f" Further runs of a shown (p, q): {' '.join(grid.also)}." if grid.also else "")
        ))  # fmt: skip
        parts.append(page.note(judge_text(grid)))
    return "".join(parts)


def em_grid_section(rows: Sequence[Mapping[str, Any]], out: Path, images: list[Path]) -> tuple[str, str, str] | None:
    """The report's EM part: em_grid_<model>_<domain>.csv/.png per grid (None: no such runs)."""
    found = grids(results_of(rows, EXPERIMENT))
    pngs = figure_files(out, "em_grid", found, COLUMNS, lambda x: x.records(), plot, images)
    if not found:
        return None
    return "Emergent misalignment: pruned EM rate over p x q", "em_grid", section(found, pngs)
