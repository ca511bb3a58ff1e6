"""What a multirun did, said in a few lines at its end: how many runs ran, were done already or failed, where they
are, and the command that compares them. Launcher-agnostic: it reads the sweeper's JobReturns."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

RAN = "ran"  # what the harmsweep task returns after computing a run; a finished run found again returns "done"


def state(ret: Any) -> str:
    """failed, ran or done (already finished: found by the task, or not submitted again by the launcher)."""
    if getattr(getattr(ret, "status", None), "name", "") == "FAILED":
        return "failed"
    return RAN if getattr(ret, "_return_value", None) == RAN else "done"


def run_dir(ret: Any) -> str | None:
    """The run's folder: Hydra's runtime.output_dir where the job ran, else the launcher's working_dir."""
    from omegaconf import OmegaConf

    out = None
    with contextlib.suppress(Exception):
        out = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir", throw_on_missing=False)
    return str(out) if out else (getattr(ret, "working_dir", None) or None)


def outcome_lines(returns: Sequence[Any]) -> list[str]:
    """The sweep's last lines (none for a sweep that launched nothing)."""
    if not returns:
        return []
    states = [(state(r), run_dir(r)) for r in returns]
    dirs = [d for _, d in states if d]
    sweep = os.path.commonpath(dirs) if len(dirs) > 1 else (os.path.dirname(dirs[0]) if dirs else "?")
    counts = {s: sum(1 for t, _ in states if t == s) for s in (RAN, "done", "failed")}
    lines = [
        f"sweep {sweep}: {len(states)} runs: {counts[RAN]} ran, {counts['done']} were done already, "
        f"{counts['failed']} failed"
    ]
    lines += [f"  failed: {d or '(no folder)'} (its FAILED file says why)" for s, d in states if s == "failed"]
    if counts["failed"]:
        lines.append("  relaunch the same command to retry them: finished runs are not redone")
    if counts[RAN] + counts["done"]:
        lines.append(f"  compare them: harmsweep-report {sweep}")
    return lines
