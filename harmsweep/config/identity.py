"""A run's identity: the hash of what can change its results, so the same config lands in the same folder.

Computed from the plain resolved config (never the typed one): the hash of a finished run must not change
when code moves or a dataclass gains a field, so relaunched sweeps find their results.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harmsweep.attacks.spec import default_attack_block
from harmsweep.calibration.spec import LATER_DEFAULTS as CALIBRATION_LATER_DEFAULTS
from harmsweep.config.schema import EM_LATER_DEFAULTS
from harmsweep.evaluation.spec import judges_key, without_later_defaults

# stage, prepare_scores: a prepare job is its group's first run with another stage (harmsweep/sweep/jobs.py)
NOT_IN_RUN_ID = (
    "paths", "logger", "launcher", "hydra", "scoring", "scores", "bootstrap", "stage", "prepare_scores",
)  # fmt: skip
# where the model sits (and its memory) changes no result; nor does architecture (what `harmsweep plan` sizes offline)
PLACEMENT_KEYS = ("device_map", "max_memory", "logits_chunk", "architecture")
# Settings added after sweeps were run: at their default they leave the run id as it was, so finished runs stay found.
LATER_DEFAULTS = {
    "pruning": {"counts": "round", "ties": "index", "order": "top", "nm_n": 2, "nm_m": 4, "replace": "zero",
                "sequential": False, "eligible": "positive", "layers": None, "alpha": 0, "freeze_first_top_q": False,
                "mask_file": None, "intersect": None, "finetune_before": False, "finetune_after": False},
    "calibration": CALIBRATION_LATER_DEFAULTS,
    "model": {"architecture": None, "chat_template_kwargs": {}},
    "em": EM_LATER_DEFAULTS,
    "": {"method": "prune", "attack": default_attack_block()},
}  # fmt: skip


def run_id(cfg: Mapping[str, Any]) -> str:
    """Hash of the resolved config minus where things are stored, placed, launched and logged."""
    return hashlib.sha256(json.dumps(identity(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


def identity(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What of the resolved config can change a run's results (the run id hashes it; the report compares it)."""
    kept = {k: v for k, v in cfg.items() if k not in NOT_IN_RUN_ID and v is not None}
    kept["data"] = {k: v for k, v in kept.get("data", {}).items() if k not in ("root", "download")}
    for side in ("harmful", "benign"):  # data.<side>.minus_category, category came later (nested): null leaves the id
        ref = kept["data"].get(side)
        if isinstance(ref, Mapping):
            ref = {k: v for k, v in ref.items() if not (k in ("minus_category", "category") and v is None)}
            if ref.get("category") is not None and not ref.get("categories"):  # category=C is categories=[C]
                ref = {**{k: v for k, v in ref.items() if k != "category"}, "categories": [ref["category"]]}
            kept["data"] = {**kept["data"], side: ref}
    if "calibration" in kept:  # their data folder is a location, like data.root (the files' content keys the cache)
        kept["calibration"] = {k: v for k, v in kept["calibration"].items() if k != "btap_data"}
    if "model" in kept:
        kept["model"] = {k: v for k, v in kept["model"].items() if k not in PLACEMENT_KEYS}
    for block, defaults in LATER_DEFAULTS.items():
        target = kept.get(block) if block else kept
        if isinstance(target, Mapping):
            target = {k: v for k, v in target.items() if not (k in defaults and v == defaults[k])}
            kept = {**kept, block: target} if block else target
    if isinstance(kept.get("eval"), Mapping):
        kept = {**kept, "eval": without_later_defaults(kept["eval"])}
    if isinstance(kept.get("judges"), Mapping):
        kept = {**kept, "judges": judges_key(kept["judges"])}
    if kept.get("method", "prune") == "prune":
        kept.pop("lowrank", None)  # read by method=lowrank only
    else:
        kept.pop("pruning", None)  # a low-rank removal selects no weights
    scoring = cfg.get("scoring") or {}
    changed = {
        k: scoring.get(k, d) for k, d in (("criterion", "snip"), ("accumulate", "fp32")) if scoring.get(k, d) != d
    }
    if changed:  # what the scores hold is part of a run; where their memory goes is not
        kept["scoring"] = changed
    return kept


RUN_FILE = "run.json"  # written first into a run folder: the run id (and config) that claims it


def stored_run_id(run_dir: Path) -> str | None:
    """The run id that claims ``run_dir`` (its run.json); None when unclaimed, "?" when run.json is unreadable."""
    identity = Path(run_dir) / RUN_FILE
    if not identity.is_file():
        return None
    try:
        stored = json.loads(identity.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return "?"
    return str(stored) if stored is not None else "?"


def another_run(run_dir: Path, stored: str, rid: str) -> str:
    """The one line that refuses a launch into a folder claimed by another run."""
    return f"{run_dir} holds run {stored}, not this config's run {rid}: use another hydra.run.dir or remove it"
