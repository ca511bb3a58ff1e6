"""The few lines a finished run prints (and a relaunch prints again from its result.json): what was pruned, by which
rule in full, harm reduction and utility ratio with the sign in words, each headline metric before -> after."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SUMMARY = (
    ("harmful NLL", "nll_harmful"),
    ("benign NLL", "nll_benign"),
    ("keyword ASR", "asr_keyword_mean"),
    ("refusal rate", "refusal_rate"),
    ("short answers", "short_answer_rate"),
    ("StrongREJECT", "strongreject_mean"),
    ("rubric score", "rubric_mean"),
    ("perplexity", "perplexity"),
    ("ppl attacked", "perplexity_attacked"),
    ("recognition", "recognition_accuracy"),
    ("lm-eval mean", "lm_eval/mean/acc"),
    ("TriviaQA", "triviaqa_acc"),
    ("Alpaca judge", "alpaca_judge_mean"),
    ("financial ref", "financial_refusal_rate"),
)


def summary(result: dict[str, Any]) -> str:
    """A few lines: what was pruned, and each headline metric before -> after."""
    from harmsweep.intervals import with_stage

    m = result["metrics"]
    if result.get("figures") is not None:  # an experiment: its headline numbers and where its figures are
        lines = [
            f"run {result['run_id']}: experiment {result['experiment']} on {result['model']} ({result['alignment']})"
        ]
        lines += [f"  {k:<40}{v:10.4f}" for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)]
        lines += [f"  figure {name}: {path}" for name, path in result["figures"].items()]
        return "\n".join(lines)
    rule = result["pruning"]["rule"] if result.get("lowrank") else rule_text(result["pruning"])
    lines = [f"run {result['run_id']}: {result['model']} ({result['alignment']}), rule {rule}"]
    if result.get("lowrank"):
        low = result["lowrank"]
        lines.append(
            f"  removed a rank-{low['spec']['rank_harmful']} harmful subspace (utility rank {low['spec']['rank_utility']}) "
            f"from {len(low['per_matrix'])} matrices (mean |dW|/|W| {low['summary']['relative_norm_mean']:.3g})"
        )
    else:
        verb = "reverted to base" if result["pruning"].get("replace") == "base" else "pruned"
        lines.append(
            f"  {verb} {result['n_pruned']:,} of {result['n_scored']:,} scored weights "
            f"(actual sparsity {result['actual_sparsity']:.3g})"
        )
        asked = result.get("n_asked")
        if not result["n_pruned"]:
            lines.append("  NOTHING WAS PRUNED: no weight was eligible (the figures below are the unpruned model's)")
        elif asked and result["n_pruned"] < asked:
            lines.append(f"  PRUNED FEWER THAN ASKED: {result['n_pruned']:,} of the {asked:,} the sparsity asks for "
                         "(no more weights were eligible)")  # fmt: skip
    ci = (result.get("intervals") or {}).get("metrics") or {}
    level = f"{(result.get('intervals') or {}).get('settings', {}).get('level', 0.95):.0%}"

    def bounds(key: str, digits: int = 3) -> str:
        lo, hi = (ci.get(key) or {}).get("lo"), (ci.get(key) or {}).get("hi")
        return f" {level} CI [{lo:+.{digits}f}, {hi:+.{digits}f}]" if lo is not None and hi is not None else ""

    lines += _relative_lines(ci, level)
    if result.get("attack"):
        lines.append(
            f"  answers under attack {result['attack']['name']} (applied to the model before and after pruning)"
        )
    for label, key in SUMMARY:
        before, after = m.get(with_stage(key, "before")), m.get(with_stage(key, "after"))
        if isinstance(before, int | float) and isinstance(after, int | float):
            lines.append(f"  {label:<13}{before:8.3f} -> {after:8.3f} ({after - before:+.3f}){bounds(f'delta_{key}')}")
    if m.get("selectivity") is not None:
        lines.append(
            f"  selectivity  {m['selectivity']:8.2f}  (harmful NLL rise / benign NLL rise){bounds('selectivity', 2)}"
        )
    n = (ci.get("nll_harmful_after") or ci.get("refusal_rate_after") or {}).get("n")
    if ci and n:
        lines.append(f"  intervals: paired bootstrap over {n} held-out harmful prompts (result.json intervals)")
    lines += [f"  skipped {name}: {why}" for name, why in result.get("skipped_metrics", {}).items()]
    return "\n".join(lines)


def rule_text(pruning: Mapping[str, Any]) -> str:
    """The rule in full: its name, the scores it ranks, the protected benign share, the unit, and every other
    selection option that is not the default (as result.json's pruning block holds them)."""
    from dataclasses import fields

    from harmsweep.pruning.spec import PruningConfig

    default = PruningConfig()
    unit = pruning.get("granularity", "global")
    unit = f"{pruning.get('nm_n')}:{pruning.get('nm_m')} per row" if unit == "nm" else unit
    parts = [f"scores {pruning.get('criterion', 'snip')}", unit]
    if pruning["rule"] in ("signed_snip", "unsigned_snip"):  # the set-difference rules (PruneSpec.protects)
        parts.insert(1, f"minus the top {pruning.get('protect')} by {pruning.get('benign_importance')} benign score")
    shown = {"rule", "sparsity", "protect", "benign_importance", "granularity", "nm_n", "nm_m"}
    parts += [f"{f.name}={pruning[f.name]}" for f in fields(PruningConfig)
              if f.name not in shown and f.name in pruning and pruning[f.name] != getattr(default, f.name)]  # fmt: skip
    return f"{pruning['rule']} ({', '.join(parts)})"


def _relative_lines(ci: Mapping[str, Any], level: str) -> list[str]:
    """Harm reduction and utility ratio, the sign in words: the first measure the run has a finite value for."""
    from harmsweep.intervals import HARM_MEASURES, UTILITY_MEASURES

    lines = []
    for key, measures in (("harm_reduction", HARM_MEASURES), ("utility_ratio", UTILITY_MEASURES)):
        for measure in measures:
            entry = ci.get(f"{key}/{measure}") or {}
            value, lo, hi = entry.get("value"), entry.get("lo"), entry.get("hi")
            if not isinstance(value, int | float) or value != value or abs(value) == float("inf"):
                continue
            if key == "utility_ratio":
                band = f" {level} CI [{lo:.2f}, {hi:.2f}]" if _numbers(lo, hi) else ""
                lines.append(f"  utility ratio {value:.2f}{band} ({measure}, after vs before; 1 = unchanged)")
            else:
                tail = f"{measure}; 1 = all removed" if value >= 0 else measure
                lines.append(f"  {harm_words(value, lo, hi, f'{level} CI ')} ({tail})")
            break
    return lines


def harm_words(value: float, lo: Any = None, hi: Any = None, band: str = "") -> str:
    """A harm reduction with its sign in words ("-7% [7%, 7%]" read both ways): "harm reduced by 0.47 [0.15, 0.73]",
    or "harm INCREASED by 0.02 [...]" with the interval turned round; ``band`` prefixes the interval."""
    both = _numbers(lo, hi)
    if value >= 0:
        return f"harm reduced by {value:.2f}" + (f" {band}[{lo:.2f}, {hi:.2f}]" if both else "")
    return f"harm INCREASED by {-value:.2f}" + (f" {band}[{-hi:.2f}, {-lo:.2f}]" if both else "")


def _numbers(*values: Any) -> bool:
    return all(isinstance(v, int | float) for v in values)
