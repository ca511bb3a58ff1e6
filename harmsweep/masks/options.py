"""Checks of pruning.mask_file and pruning.intersect that need no model (no torch here: config checks call it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from harmsweep.errors import HarmsweepError

PICKLES = (".pkl", ".pickle", ".pt", ".pth", ".bin")
FORMATS = (".safetensors", ".json")
CONVERT = (
    "python -c \"import pickle,json,sys; d=pickle.load(open(sys.argv[1],'rb')); json.dump({str(l): {m: [[int(r), "
    "int(c)] for r, c in v] for m, v in cs.items()} for l, cs in d.items()}, open(sys.argv[2],'w'))\" IN.pkl OUT.json"
)


def refuse_pickle(path: str | Path, what: str = "mask file") -> None:
    """A pickle runs code when loaded: harmsweep never loads one, and says how to convert it to JSON once."""
    if Path(path).suffix.lower() in PICKLES:
        raise HarmsweepError(
            f"{what} {path} is a pickle, which harmsweep never loads (it can run code): convert it once to JSON "
            f'{{"<layer>": {{"<module>": [[row, col], ...]}}}} where you trust it, e.g. {CONVERT}'
        )


def check_mask_file(path: str | Path) -> None:
    """The file exists and has a format harmsweep reads (JSON or safetensors)."""
    refuse_pickle(path)
    if not Path(path).is_file():
        raise HarmsweepError(f"pruning.mask_file not found: {path}")
    if Path(path).suffix.lower() not in FORMATS:
        raise HarmsweepError(
            f"pruning.mask_file={path}: unknown format (use a .safetensors mask, or a .json of "
            '{"<layer>": {"<module>": [[row, col], ...]}} or [[layer, module, row, col], ...])'
        )


def check_given(
    mask_file: str | None,
    intersect: Sequence[str] | None,
    *,
    sequential: bool,
    method: str,
    experiment: str | None,
    score_rule: bool,
) -> None:
    """pruning.mask_file / pruning.intersect: their files, and the settings they cannot be combined with."""
    if mask_file is None and intersect is None:
        return
    key = "pruning.mask_file" if mask_file is not None else "pruning.intersect"
    if mask_file is not None and intersect is not None:
        raise HarmsweepError("pruning.mask_file and pruning.intersect both choose the mask: set one of them")
    if method != "prune":
        raise HarmsweepError(f"{key} gives a mask to prune, and method={method} prunes none: use method=prune")
    if experiment:
        raise HarmsweepError(f"{key} is for a pruning run; experiment={experiment} chooses its own masks")
    if sequential:
        raise HarmsweepError(f"{key} does not score layer by layer: drop pruning.sequential=true")
    if mask_file is not None:
        check_mask_file(mask_file)
        return
    if not intersect:
        raise HarmsweepError("pruning.intersect=[] names no file: give two or more harmful calibration files")
    if not score_rule:
        raise HarmsweepError("pruning.intersect intersects score-based masks: use a scoring rule (e.g. signed_snip)")
    for path in intersect:
        refuse_pickle(path, "pruning.intersect file")
        if not Path(path).is_file():
            raise HarmsweepError(f"pruning.intersect file not found: {path}")
