"""The paper's experiments beyond one pruning run: each builds on run.py's stages.

An experiment preset sets ``experiment: <name>``; names listed in RUNNERS replace the single pruning
run with their own body, which returns (result, items) like run.py's and writes its matrices and
curves as JSON beside result.json (``result["figures"]`` names them, for the report and W&B).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from harmsweep.artifacts import write_json
from harmsweep.experiments.matrices import Matrix

RUNNERS = {
    "cross_harm": "harmsweep.experiments.cross_harm",
    "em": "harmsweep.experiments.em",
    "dissociation": "harmsweep.experiments.dissociation",
}


def runner(name: str | None) -> Callable[..., tuple[dict[str, Any], list[dict[str, Any]]]] | None:
    """The body of experiment ``name``, or None for a plain pruning run."""
    if name not in RUNNERS:
        return None
    return importlib.import_module(RUNNERS[str(name)]).run


def save_figures(figures: Mapping[str, Matrix], run_dir: Path) -> dict[str, str]:
    """Write each figure as <run_dir>/<name>.json (atomically); returns name -> path for result.json."""
    paths = {}
    for name, matrix in figures.items():
        path = run_dir / f"{name}.json"
        write_json(matrix.to_json(), path)
        paths[name] = str(path)
    return paths
