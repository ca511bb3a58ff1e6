"""The report as one W&B run (job_type "report") in the sweep's group, beside the runs it summarises.

Same rules as harmsweep.tracking: W&B is a side channel, so every step is guarded (a failure is one warning
line, never a crash), and `auto` mode logs offline unless a key and a reachable server exist. The run id is
derived from the group, so re-building the report of a sweep resumes its report run instead of adding one.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harmsweep.report.build import Report
from harmsweep.tracking import _guarded, resolve_mode, where


def report_run_id(group: str, project: str) -> str:
    return "report-" + hashlib.sha256(f"{project}/{group}".encode()).hexdigest()[:12]


def table_data(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns (union, first-seen order) and rows; NaN/inf become None, which W&B tables accept."""
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return columns, [[clean(r.get(c)) for c in columns] for r in rows]


def log_report(
    report: Report,
    group: str,
    project: str = "harmsweep",
    entity: str | None = None,
    mode: str = "auto",
    dir: Path | str | None = None,
) -> str | None:
    """Log the compression and runs tables and every PNG; returns the W&B run id, or None when W&B failed. Files go
    to ``dir``, else $WANDB_DIR, else the report folder; where the run went is printed once."""
    resolved = resolve_mode(mode)  # a bad mode is the caller's error, not a W&B failure
    wb_dir = Path(dir or os.environ.get("WANDB_DIR") or report.out_dir)

    def start() -> Any:
        import wandb

        wb_dir.mkdir(parents=True, exist_ok=True)
        return wandb.init(
            project=project,
            entity=entity,
            id=report_run_id(group, project),
            name=f"report {group}",
            resume="allow",
            reinit="finish_previous",
            dir=str(wb_dir),
            mode=resolved,
            group=group,
            job_type="report",
            config={"report": dict(report.settings)},
            allow_val_change=True,
            settings=wandb.Settings(silent=True, console="off"),
        )

    run = _guarded("report init", start)
    if run is None:
        return None
    print(where(run), flush=True)
    import wandb

    def log_table(key: str, rows: Sequence[Mapping[str, Any]]) -> None:
        columns, data = table_data(rows)
        run.log({key: wandb.Table(columns=columns, data=data, allow_mixed_types=True)})

    failed = False
    for key, rows in (("compression", report.compression), ("runs", report.runs)):
        failed |= _guarded(f"{key} table", lambda key=key, rows=rows: log_table(key, rows) or True) is None
    for png in report.images:
        failed |= _guarded(f"image {png.name}", lambda png=png: run.log({f"figures/{png.stem}": wandb.Image(str(png))}) or True) is None  # fmt: skip
    _guarded("report summary", lambda: run.summary.update({"n_runs": len(report.runs), "n_failed": report.n_failed}))
    run_id = run.id
    _guarded("report finish", lambda: run.finish(exit_code=1 if failed else 0))
    return run_id
