"""The paper's experiments beyond one pruning run: each builds on pipeline/'s stages.

An experiment preset sets ``experiment: <name>``; names listed in RUNNERS replace the single pruning
run with their own body, which returns (result, items) like one pruning run's and writes its matrices and
curves as JSON beside result.json (``result["figures"]`` names them, for the report and W&B).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from harmsweep.artifacts import write_json
from harmsweep.experiments.matrices import Matrix

RUNNERS = {
    "cross_harm": "harmsweep.experiments.cross_harm",
    "em": "harmsweep.experiments.em",
    "dissociation": "harmsweep.experiments.dissociation",
    "orgad2026_em": "harmsweep.experiments.orgad2026_em",
}
# experiments whose runs share stages a prepare job makes once for a group (their module's ``prepare``): the
# launcher groups them like plain runs (sweep.jobs.group_key) instead of running each alone
SHARED = ("orgad2026_em",)


class Experiment(NamedTuple):
    """An experiment's body: ``run(ctx) -> (result, items)`` in place of one pruning run's stages, an optional
    ``check(cfg)`` of its own inputs (files), run before the model loads, and an optional ``prepare(ctx, score kinds)
    -> artifacts``: the stages a group of its runs shares, made once by a prepare job."""

    run: Callable[[Any], tuple[dict[str, Any], list[dict[str, Any]]]]
    check: Callable[[Any], None] | None = None
    prepare: Callable[[Any, Any], dict[str, str]] | None = None


def runner(name: str | None) -> Experiment | None:
    """The body of experiment ``name``, or None for a plain pruning run (or a sweep-only preset)."""
    if name not in RUNNERS:
        return None
    module = importlib.import_module(RUNNERS[str(name)])
    return Experiment(module.run, getattr(module, "check", None), getattr(module, "prepare", None))


def save_figures(figures: Mapping[str, Matrix], run_dir: Path) -> dict[str, str]:
    """Write each figure as <run_dir>/<name>.json (atomically); returns name -> path for result.json."""
    paths = {}
    for name, matrix in figures.items():
        path = run_dir / f"{name}.json"
        write_json(matrix.to_json(), path)
        paths[name] = str(path)
    return paths
