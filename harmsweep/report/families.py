"""Which runs a report may pool: one family = one curve and one compression row per model and variant.

Runs pool only when they differ in nothing but the report's axes (sparsity and seed; rule and protect, which get a
curve each) and its grouping columns (model, variant). A selection option (scores, unit, N:M, sequential, ...) makes
a family named by that option (``scores=wanda``, ``2:4``); anything else that can change results (the rest of the
run identity of config/identity.py: evaluation, calibration, data, judges, ...) makes a family named by its experiment
when that tells the settings apart (``experiment=demo``), else by the keys that differ between the runs reported
(``eval.n=16``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from harmsweep.config.identity import identity

EXPERIMENTS = (  # runs with figures of their own: never on the compression curves
    "cross_harm", "em", "dissociation", "orgad2026_transfer", "orgad2026_capabilities", "orgad2026_em",
    "orgad2026_control",
)  # fmt: skip
# every option that changes which weights a rule selects (beside rule, sparsity and protect): runs that differ in one
# are separate families in the report, never pooled into one curve or compression row
SELECTION = ("method", "scoring", "granularity", "nm", "sequential", "replace", "order", "eligible", "layers",
             "harm_fraction", "benign_importance")  # fmt: skip
FAMILY_DEFAULTS = {"method": "prune", "scoring": "snip", "granularity": "global", "sequential": False,
                   "replace": "zero", "order": "top", "eligible": "positive", "layers": None}  # fmt: skip
# config keys a family's runs may differ in: the axes, the grouping columns, and what SELECTION labels already
AXES = ("seed", "experiment", "method", "pruning.sparsity", "pruning.rule", "pruning.protect", "lowrank.rank_harmful",
        "lowrank.rank_utility", "scoring.criterion", "pruning.criterion", "pruning.nm_n", "pruning.nm_m",
        *(f"pruning.{k}" for k in SELECTION))  # fmt: skip
GROUPING = ("model.", "alignment.")
SHOWN = 2  # differing keys named in a family's label; more are counted, with a digest that tells families apart


def selection(pruning: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """The run's selection options (SELECTION) and its family: those that differ from the defaults, e.g.
    ``scores=wanda, 2:4`` ('' for the default selection). Rule, sparsity and protect have columns of their own."""
    method = config.get("method", "prune")
    scoring = pruning.get("criterion") or (config.get("scoring") or {}).get("criterion") or "snip"
    granularity = pruning.get("granularity", "global")
    out = {
        "method": method, "scoring": None if method == "lowrank" else scoring, "granularity": granularity,
        "nm": f"{pruning.get('nm_n')}:{pruning.get('nm_m')}" if granularity == "nm" else None,
        **{k: pruning.get(k) for k in ("sequential", "replace", "order", "eligible", "layers", "harm_fraction",
                                        "benign_importance")},
    }  # fmt: skip
    if method == "lowrank":
        return {**out, "family": ""}
    parts = []
    for key, default in FAMILY_DEFAULTS.items():
        value = out.get(key)
        if key == "granularity" and value == "nm":
            continue  # said by nm
        if value is not None and value != default:
            parts.append(key if value is True else f"{'scores' if key == 'scoring' else key}={value}")
    if out["nm"]:
        parts.append(out["nm"])
    return {**out, "family": ", ".join(parts)}


def family_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The report's view of the rows: a run of a family other than the default is its own variant, labelled by
    what differs (``aligned [scores=wanda]``), so no curve, compression row or difference pools unlike runs."""
    return [{**r, "alignment": f"{r.get('alignment')} [{r['family']}]"} if r.get("family") else dict(r) for r in rows]


def setting_of(config: Mapping[str, Any]) -> dict[str, str]:
    """What else of a run's config can change its results, flattened to ``key -> JSON value``."""
    flat = _flatten(identity(config)) if config else {}
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in flat.items()
            if k not in AXES and not k.startswith(GROUPING)}  # fmt: skip


def with_settings(rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Mapping[str, str]]) -> list[dict[str, Any]]:
    """Rows with ``setting`` (a digest of the run's setting) and ``family`` extended by the setting keys that differ
    between runs of one method: runs that were evaluated, calibrated or fed differently are never pooled."""
    ids = [str(r.get("run_id")) for r in rows]
    digests = {i: _digest(sorted(settings.get(i, {}).items())) for i in ids}
    labels = {i: "" for i, r in zip(ids, rows, strict=True) if r.get("experiment") in EXPERIMENTS}  # on no curve
    for method in {r.get("method") for r in rows}:
        own = [r for r in rows if r.get("method") == method and r.get("experiment") not in EXPERIMENTS]
        labels |= _labels(own, settings, digests)
    return [{**r, "family": ", ".join(p for p in (r.get("family") or "", labels[i]) if p),
             "setting": digests[i] if settings.get(i) else None}
            for i, r in zip(ids, rows, strict=True)]  # fmt: skip


def _labels(
    rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Mapping[str, str]], digests: Mapping[str, str]
) -> dict[str, str]:
    """Run id -> what sets its setting apart from the other rows': the experiment when each experiment has one
    setting (``experiment=demo``), else the differing keys (``eval.n=16``), '' when all agree."""
    ids = [str(r.get("run_id")) for r in rows]
    if len({digests[i] for i in ids}) < 2:
        return dict.fromkeys(ids, "")
    experiments = {i: str(r.get("experiment") or "none") for i, r in zip(ids, rows, strict=True)}
    per_experiment = {e: {digests[i] for i in ids if experiments[i] == e} for e in set(experiments.values())}
    if all(len(d) == 1 for d in per_experiment.values()) and len(per_experiment) == len({digests[i] for i in ids}):
        return {i: f"experiment={experiments[i]}" for i in ids}
    own = [settings.get(i, {}) for i in ids]
    varying = sorted(k for k in {k for s in own for k in s} if len({s.get(k) for s in own}) > 1)
    out = {}
    for i, setting in zip(ids, own, strict=True):
        differs = [(k, setting.get(k)) for k in varying]
        label = [f"{k}={_shown(v)}" for k, v in differs[:SHOWN]]
        out[i] = ", ".join(
            label + ([f"+{len(differs) - SHOWN} more #{_digest(differs)}"] if len(differs) > SHOWN else [])
        )
    return out


def _flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _shown(value: str | None) -> str:
    return "unset" if value is None else str(json.loads(value)).replace(" ", "")


def _digest(items: Any) -> str:
    return hashlib.sha256(json.dumps(items, default=str).encode()).hexdigest()[:6]
