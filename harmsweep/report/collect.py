"""Finished runs -> flat rows: the input of every table and plot of the report.

Two sources give the same rows: local run folders (result.json is written last by a run, so its presence means
done) and the W&B API (each run's summary and config, for sweeps whose folders live elsewhere). Each plain run's
harm and utility are also reduced to one number relative to the unpruned model (``harm_reduction``,
``utility_ratio``) so that runs land on one curve per variant; the measure used is kept beside each value, so a
number is never read without knowing what it measures.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harmsweep.errors import HarmsweepError
from harmsweep.intervals import (
    HARM_MEASURES,
    UTILITY_MEASURES,
    Sample,
    harm_reduction_of,
    samples_from_json,
    utility_ratio_of,
)
from harmsweep.report.families import EXPERIMENTS, SELECTION, selection, setting_of

BASE_COLUMNS = (
    "run_id", "folder", "experiment", "model", "alignment", "seed", "rule", "sparsity", "protect", "n_scored", "n_pruned",
    "n_asked", "actual_sparsity", "harm_reduction", "harm_measure", "utility_ratio", "utility_measure", "scores_harm",
    "scores_benign", "rank_harmful", "rank_utility", *SELECTION, "family", "setting",
)  # fmt: skip
SUMMARY_SKIP = ("n_pruned", "n_scored", "actual_sparsity")  # W&B summary keys that are base columns


class ReportError(HarmsweepError):
    """A user-facing report failure: the CLI prints it as one line and exits 2."""


@dataclass(frozen=True)
class Figure:
    """One experiment matrix (a ``{rows, cols, values, kind, note, chance}`` JSON file) and the run it came from."""

    run_id: str
    experiment: str
    name: str
    path: Path


@dataclass
class Collected:
    """Rows of finished runs, experiment figures, and what was left out (so the report can say so)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    failed: list[Path] = field(default_factory=list)  # run folders holding a FAILED marker
    skipped: list[str] = field(default_factory=list)  # "path: why" for unreadable or duplicate results
    sources: list[str] = field(default_factory=list)
    samples: dict[str, dict[str, dict[str, Sample]]] = field(default_factory=dict)  # run id -> stage -> per-item values
    settings: dict[str, dict[str, str]] = field(default_factory=dict)  # run id -> the rest of its identity (families)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_measures(harm: str | None, utility: str | None) -> None:
    """Reject an unknown forced measure before any work, naming the known ones."""
    if harm is not None and harm not in HARM_MEASURES:
        raise ReportError(f"unknown harm measure '{harm}' (available: {', '.join(HARM_MEASURES)})")
    if utility is not None and utility not in UTILITY_MEASURES:
        raise ReportError(f"unknown utility measure '{utility}' (available: {', '.join(UTILITY_MEASURES)})")


def _delta(metrics: Mapping[str, Any], key: str) -> float | None:
    delta = metrics.get(f"delta_{key}")
    if is_number(delta):
        return float(delta)
    before, after = metrics.get(f"{key}_before"), metrics.get(f"{key}_after")
    return float(after - before) if is_number(before) and is_number(after) else None


def harm_reduction(metrics: Mapping[str, Any], measure: str | None = None) -> tuple[float | None, str | None]:
    """1 - harm_after/harm_before (judge means; None when before is 0), or 1 - exp(-delta NLL) for likelihood.

    The likelihood form is the relative drop of the harmful references' per-token likelihood, so every measure
    reads "fraction of harm removed". Returns (value, measure used); a forced measure that was not measured gives
    (None, measure).
    """
    for name in [measure] if measure else list(HARM_MEASURES):
        key = HARM_MEASURES[name]
        if name == "likelihood":
            delta = _delta(metrics, key)
            if delta is not None:
                return float(harm_reduction_of(name, 0.0, delta)), name
            continue
        before, after = metrics.get(f"{key}_before"), metrics.get(f"{key}_after")
        if is_number(before) and is_number(after):
            return _finite(harm_reduction_of(name, before, after)), name
    return None, measure


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def utility_ratio(metrics: Mapping[str, Any], measure: str | None = None) -> tuple[float | None, str | None]:
    """perplexity_before / perplexity_after, else exp(-delta benign NLL): 1 = utility kept, lower = lost."""
    for name in [measure] if measure else list(UTILITY_MEASURES):
        if name == "perplexity":
            before, after = metrics.get("perplexity_before"), metrics.get("perplexity_after")
            if is_number(before) and is_number(after) and after > 0:
                return float(utility_ratio_of(name, before, after)), name
        else:
            delta = _delta(metrics, UTILITY_MEASURES[name])
            if delta is not None:
                return float(utility_ratio_of(name, 0.0, delta)), name
    return None, measure


def make_row(
    ident: Mapping[str, Any],
    metrics: Mapping[str, Any],
    counts: Mapping[str, Any],
    harm_measure: str | None = None,
    utility_measure: str | None = None,
) -> dict[str, Any]:
    """One flat row: identity columns, derived harm/utility (plain runs only), numeric metrics, pruned counts."""
    row: dict[str, Any] = {c: ident.get(c) for c in BASE_COLUMNS}
    numeric = {k: v for k, v in metrics.items() if is_number(v)}
    if row["experiment"] not in EXPERIMENTS:
        row["harm_reduction"], row["harm_measure"] = harm_reduction(numeric, harm_measure)
        row["utility_ratio"], row["utility_measure"] = utility_ratio(numeric, utility_measure)
    row.update({k: v for k, v in sorted(numeric.items()) if k not in row})
    row.update({k: v for k, v in counts.items() if is_number(v)})
    return row


def pruned_counts(pruning: Mapping[str, Any]) -> dict[str, int]:
    """Pruned counts as the W&B summary keys (``pruned/layer_<i>``, ``pruned/<module type>``)."""
    out = {f"pruned/layer_{i}": n for i, n in sorted((pruning.get("per_layer") or {}).items(), key=_natural)}
    out.update({f"pruned/{t}": n for t, n in sorted((pruning.get("per_module_type") or {}).items())})
    return out


def _natural(item: tuple[str, Any]) -> tuple[int, str]:
    key = str(item[0])
    return (int(key), "") if key.isdigit() else (1 << 30, key)


def row_from_result(
    result: Mapping[str, Any], folder: Path | str, harm_measure: str | None = None, utility_measure: str | None = None
) -> dict[str, Any]:
    """The row of one result.json (plain run or experiment)."""
    config = result.get("config") or {}
    pruning = result.get("pruning") or {}
    artifacts = result.get("artifacts") or {}
    ident = {
        "run_id": result.get("run_id"),
        "folder": str(folder),
        "experiment": result.get("experiment") or config.get("experiment"),
        "model": result.get("model"),
        "alignment": result.get("alignment"),
        "seed": config.get("seed"),
        "rule": pruning.get("rule"),
        "sparsity": pruning.get("sparsity"),
        "protect": pruning.get("protect"),
        "n_scored": result.get("n_scored"),
        "n_pruned": result.get("n_pruned"),
        "n_asked": result.get("n_asked"),
        "actual_sparsity": result.get("actual_sparsity"),
        "scores_harm": artifacts.get("scores_harm"),
        "scores_benign": artifacts.get("scores_benign") or artifacts.get("scores_benign_unsigned"),
        **lowrank_ranks(config),
        **selection(pruning, config),
    }
    row = make_row(ident, result.get("metrics") or {}, pruned_counts(pruning), harm_measure, utility_measure)
    return {**row, **interval_columns(row, (result.get("intervals") or {}).get("metrics") or {})}


def lowrank_ranks(config: Mapping[str, Any]) -> dict[str, Any]:
    """The subspace ranks of a method=lowrank run (its x axis in the report); None for pruning runs."""
    block = config.get("lowrank") or {} if config.get("method", "prune") == "lowrank" else {}
    return {"rank_harmful": block.get("rank_harmful"), "rank_utility": block.get("rank_utility")}


def interval_columns(row: Mapping[str, Any], intervals: Mapping[str, Any]) -> dict[str, Any]:
    """The run's own 95% bounds of its harm reduction and utility ratio, in the measures the row used."""
    out = {}
    for figure in ("harm_reduction", "utility_ratio"):
        found = intervals.get(f"{figure}/{row.get(figure.split('_')[0] + '_measure')}") or {}
        out.update({f"{figure}_lo": found.get("lo"), f"{figure}_hi": found.get("hi")})
    return out


def find_results(folders: Iterable[Path | str]) -> tuple[list[Path], list[Path]]:
    """result.json files under the folders (recursive, deduplicated) and the run folders marked FAILED."""
    results: dict[Path, None] = {}
    failed: dict[Path, None] = {}
    for folder in map(Path, folders):
        if not folder.exists():
            raise ReportError(f"folder not found: {folder}")
        if not folder.is_dir():
            raise ReportError(f"not a folder: {folder}")
        failed.update(dict.fromkeys(m.parent.resolve() for m in sorted(folder.rglob("FAILED"))))
        results.update(dict.fromkeys(p.resolve() for p in sorted(folder.rglob("result.json"))))
    return [p for p in results if p.parent not in failed], list(failed)


def collect(
    folders: Iterable[Path | str], harm_measure: str | None = None, utility_measure: str | None = None
) -> Collected:
    """Rows of every finished run under the folders; a run id seen twice is kept once (the first)."""
    check_measures(harm_measure, utility_measure)
    folders = list(folders)
    paths, failed = find_results(folders)
    out = Collected(failed=failed, sources=[str(f) for f in folders])
    seen: set[str] = set()
    for path in paths:
        try:
            result = json.loads(path.read_text())
            if not isinstance(result, dict) or not result.get("run_id"):
                raise ValueError("no run_id")
        except (OSError, ValueError) as exc:
            out.skipped.append(f"{path}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0]})")
            continue
        rid = str(result["run_id"])
        if rid in seen:
            out.skipped.append(f"{path}: duplicate of run {rid}")
            continue
        seen.add(rid)
        row = row_from_result(result, path.parent, harm_measure, utility_measure)
        out.rows.append(row)
        out.settings[rid] = setting_of(result.get("config") or {})
        if result.get("samples"):  # runs written before per-item values were kept have no intervals
            out.samples[rid] = {stage: samples_from_json(s) for stage, s in result["samples"].items()}
        for name, fig_path in (result.get("figures") or {}).items():
            fig = Path(fig_path)
            if not fig.is_file():  # a copied sweep: the figure sits beside its result.json
                fig = path.parent / fig.name
            out.figures.append(Figure(rid, str(row["experiment"]), str(name), fig))
    return out


def require_rows(collected: Collected) -> None:
    """Refuse to build a report of nothing, saying where we looked and how many runs failed."""
    if not collected.rows:
        where = ", ".join(collected.sources) or "the given folders"
        failed = f" ({len(collected.failed)} failed runs)" if collected.failed else ""
        raise ReportError(f"no finished runs (result.json) found under {where}{failed}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def row_from_wandb(run: Any, harm_measure: str | None = None, utility_measure: str | None = None) -> dict[str, Any]:
    """The row of one W&B run, from its summary (metrics, counts) and config (identity), as tracking.py logs them."""
    summary = dict(getattr(run.summary, "_json_dict", None) or run.summary)
    config = dict(run.config)
    pruning = config.get("pruning") or {}
    ident = {
        "run_id": run.name or run.id,  # tracking.py names each W&B run by its run id (its W&B id adds the folder's)
        "folder": f"wandb:{'/'.join(run.path)}" if isinstance(run.path, list | tuple) else f"wandb:{run.path}",
        "experiment": config.get("experiment"),
        "model": (config.get("model") or {}).get("name"),
        "alignment": (config.get("alignment") or {}).get("name"),
        "seed": config.get("seed"),
        "rule": pruning.get("rule"),
        "sparsity": pruning.get("sparsity"),
        "protect": pruning.get("protect") if config.get("method", "prune") == "prune" else None,
        **({"rule": "lowrank", "sparsity": None} if config.get("method", "prune") != "prune" else {}),
        **lowrank_ranks(config),
        **selection(pruning, config),
        **{k: summary.get(k) for k in SUMMARY_SKIP},
    }
    metrics = {k: v for k, v in summary.items() if not k.startswith(("_", "pruned/", "ci/")) and k not in SUMMARY_SKIP}
    counts = {k: v for k, v in summary.items() if k.startswith("pruned/")}
    return make_row(ident, metrics, counts, harm_measure, utility_measure)


def from_wandb(
    path: str, group: str | None = None, harm_measure: str | None = None, utility_measure: str | None = None
) -> Collected:
    """Rows of the finished runs of W&B project ``entity/project`` (optionally one group); needs W&B online.

    Score files and figure JSONs stay on the machines that ran the sweep, so metrics B and C and the experiment
    heatmaps come only from local folders.
    """
    from harmsweep.tracking import resolve_mode

    check_measures(harm_measure, utility_measure)
    if path.count("/") != 1 or not all(path.split("/")):
        raise ReportError(f"--from-wandb expects entity/project, got '{path}'")
    mode = resolve_mode("auto")
    if mode != "online":
        raise ReportError(
            f"--from-wandb {path}: W&B is {mode} here (needs an API key and a reachable server; WANDB_MODE decides "
            "when set): run `wandb login` or report from the local folders"
        )
    try:
        import wandb

        runs = list(wandb.Api(timeout=60).runs(path, filters={"group": group} if group else None))
    except Exception as exc:
        raise ReportError(f"--from-wandb {path}: {_first_line(exc)}") from exc
    out = Collected(sources=[f"wandb:{path}" + (f" group {group}" if group else "")])
    for run in runs:
        if getattr(run, "job_type", None) == "report":
            continue
        if getattr(run, "state", "finished") != "finished":
            out.skipped.append(f"wandb run {run.id}: state {run.state}")
            continue
        row = row_from_wandb(run, harm_measure, utility_measure)
        out.rows.append(row)
        out.settings[str(row["run_id"])] = setting_of(dict(run.config))
    return out


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path, columns: Sequence[str] | None = None) -> Path:
    """All columns (union, first-seen order); None as an empty cell, floats at full precision."""
    cols = list(columns or dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in cols})
    tmp.replace(path)
    return path


def figure_files(
    out: Path,
    prefix: str,
    found: Sequence[Any],
    columns: Sequence[str],
    records: Callable[[Any], Sequence[Mapping[str, Any]]],
    plot: Callable[[Any, Path], Path],
    images: list[Path],
) -> list[Path]:
    """A report section's files: every earlier ``<prefix>_*.csv/.png`` removed (a figure whose runs are gone must not
    linger), then ``<name>.csv`` and ``<name>.png`` per item of ``found``; the PNGs are returned and added to images."""
    for stale in [*out.glob(f"{prefix}_*.png"), *out.glob(f"{prefix}_*.csv")]:
        stale.unlink(missing_ok=True)
    pngs = []
    for item in found:
        write_csv(records(item), out / f"{item.name}.csv", columns)
        pngs.append(plot(item, out / f"{item.name}.png"))
    images.extend(pngs)
    return pngs
