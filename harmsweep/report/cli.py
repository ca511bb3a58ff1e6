"""The ``harmsweep-report`` command: finished sweep folders (or a W&B project) -> the compression report.

    harmsweep-report [FOLDER ...] [--out DIR] [--k-sparsity 5e-6] [--targets 0.5 0.8] [--utility-floor 0.95]
                     [--harm-measure NAME] [--utility-measure NAME] [--wandb [--wandb-mode auto|offline|online]
                     [--wandb-group G]] [--from-wandb ENTITY/PROJECT]

User errors (no finished run, unknown measure, missing folder, bad option) print one line
``harmsweep-report: error: ...`` and exit 2, like the ``harmsweep`` command.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import NoReturn

from harmsweep.errors import HarmsweepError, exit_usage

PROG = "harmsweep-report"
SWEEPS = Path("outputs") / "sweeps"


def _fail(message: str) -> NoReturn:
    exit_usage(message, PROG)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the usage block first)."""

    def error(self, message: str) -> NoReturn:
        _fail(message)


def parser() -> argparse.ArgumentParser:
    from harmsweep.intervals import HARM_MEASURES, UTILITY_MEASURES

    p = _Parser(prog=PROG, description="Aggregate finished harmsweep runs into the compression report.")
    p.add_argument(
        "folders",
        nargs="*",
        type=Path,
        help=f"sweep or run folders, or their parents (default: the newest folder under {SWEEPS})",
    )
    p.add_argument("--out", type=Path, help="where to write the report (default: <first folder>/report)")
    p.add_argument("--k-sparsity", type=float, default=5e-6, help="K = round(k * N) for metrics B and C")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.8], help="harm-reduction targets of metric A")
    p.add_argument("--utility-floor", type=float, default=0.95, help="utility ratio a run must keep for metric A")
    p.add_argument("--harm-measure", help=f"force one of {', '.join(HARM_MEASURES)} (default: first measured)")
    p.add_argument("--utility-measure", help=f"force one of {', '.join(UTILITY_MEASURES)} (default: first measured)")
    p.add_argument("--wandb", action="store_true", help="also log the report as a W&B run (job_type report)")
    p.add_argument("--wandb-mode", default="auto", choices=("auto", "offline", "online"))
    p.add_argument("--wandb-group", help="W&B group of the report run (default: the first folder's name); "
                   "with --from-wandb, the group to read")  # fmt: skip
    p.add_argument("--wandb-project", default="harmsweep", help="W&B project of the report run")
    p.add_argument("--wandb-entity", default=None, help="W&B entity of the report run")
    p.add_argument("--from-wandb", metavar="ENTITY/PROJECT", help="read the runs from the W&B API instead of folders")
    return p  # fmt: skip


def newest_sweep(root: Path = SWEEPS) -> Path:
    """The most recently modified folder under outputs/sweeps: the sweep just run, usually."""
    folders = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if not folders:
        _fail(f"no folders given and none under {root}")
    return max(folders, key=lambda p: p.stat().st_mtime)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from harmsweep.report.collect import check_measures, collect, from_wandb, require_rows

    try:
        check_measures(args.harm_measure, args.utility_measure)
        if args.from_wandb:
            if args.folders:
                _fail("give folders or --from-wandb, not both")
            collected = from_wandb(args.from_wandb, args.wandb_group, args.harm_measure, args.utility_measure)
            group = args.wandb_group or args.from_wandb.split("/")[-1]
            folders, out = [], args.out or Path("outputs") / "reports" / group
        else:
            folders = args.folders or [newest_sweep()]
            for folder in folders:
                if not folder.is_dir():
                    _fail(f"not a folder: {folder}" if folder.exists() else f"folder not found: {folder}")
            out = args.out or folders[0] / "report"
            group = args.wandb_group or folders[0].resolve().name
            collected = collect(folders, args.harm_measure, args.utility_measure)
        require_rows(collected)  # before the heavy imports (matplotlib, torch): errors come back fast
        from harmsweep.report.build import build_report, summary_text

        report = build_report(
            folders,
            out,
            k_sparsity=args.k_sparsity,
            targets=tuple(args.targets),
            utility_floor=args.utility_floor,
            harm_measure=args.harm_measure,
            utility_measure=args.utility_measure,
            collected=collected,
        )
    except HarmsweepError as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    print(summary_text(report))
    if args.wandb:
        from harmsweep.report.wandb_run import log_report

        run_id = log_report(report, group, args.wandb_project, args.wandb_entity, args.wandb_mode)
        print(f"W&B report run: {run_id} (group {group})" if run_id else "W&B report run: not logged (see warning)")


if __name__ == "__main__":
    main()
