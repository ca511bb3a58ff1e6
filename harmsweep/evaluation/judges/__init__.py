"""Harmfulness judges: one interface (``Judge.score``), one factory (``make_judge``), one summary.

The factory keeps config handling in one place so a run records ``judge.version`` next to its
numbers, whichever judge produced them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.judges.base import Judge, summarize
from harmsweep.evaluation.judges.endpoint import Endpoint
from harmsweep.evaluation.judges.explanation import CoherenceJudge, ExplanationJudge
from harmsweep.evaluation.judges.refusal import REFUSAL_PHRASES, RefusalJudge, is_compliant, is_refusal
from harmsweep.evaluation.judges.rubric import RubricJudge, parse_rubric
from harmsweep.evaluation.judges.strongreject import DEFAULT_JUDGE, StrongRejectFinetunedJudge
from harmsweep.evaluation.judges.templates import judge_template
from harmsweep.evaluation.judges.usefulness import UsefulnessJudge, parse_score

KNOWN_JUDGES = (
    "refusal",
    "strongreject_finetuned",
    "strongreject_rubric",
    "alpaca_usefulness",
    "explanation",
    "coherence",
)
_FINETUNED_KEYS = ("batch_size", "max_response_tokens", "min_digit_mass")
_NULL_MEANS = ("max_response_tokens",)  # set to null on purpose (no truncation), not "use the default"


def make_judge(cfg: Mapping[str, Any], data_root: str | None = None, online: bool = False, **kwargs: Any) -> Judge:
    """Build the judge ``cfg["name"]`` names; StrongREJECT judges read their published prompts under
    ``data_root`` (or their ``template_file``; online from the published source with ``online``).

    strongreject_finetuned: cfg ``path`` (hub id or local dir), ``revision``, ``base_revision``, ``dtype``,
    ``device``, ``batch_size``, ``max_response_tokens``, ``template_file``; kwargs ``cache_dir``, or
    ``model`` + ``tokenizer`` to reuse an already loaded judge (tests). strongreject_rubric: cfg
    ``base_url``, ``model``, ``api_key_env``, ``max_retries``, ``backoff_s``, ``timeout_s``, ``max_tokens``,
    ``max_workers``, ``system_file``, ``template_file``. alpaca_usefulness: the endpoint settings and ``max_tokens``.
    explanation, coherence: the endpoint settings, ``temperature`` and ``max_tokens`` (their 0.3 and 200 when unset).
    """
    name = cfg.get("name")
    if name == "refusal":
        return RefusalJudge(str(cfg.get("phrases") or "harmsweep"))
    if name == "strongreject_rubric":
        system = judge_template("strongreject_rubric_system", data_root, cfg.get("system_file"), online)
        user = judge_template("strongreject_rubric_user", data_root, cfg.get("template_file"), online)
        max_tokens = cfg.get("max_tokens")
        return RubricJudge(system, user, Endpoint.of(cfg), 1000 if max_tokens is None else int(max_tokens))
    if name == "alpaca_usefulness":
        max_tokens = cfg.get("max_tokens")
        return UsefulnessJudge(Endpoint.of(cfg), max_tokens=200 if max_tokens is None else int(max_tokens))
    if name in ("explanation", "coherence"):
        judge = ExplanationJudge if name == "explanation" else CoherenceJudge
        temperature, max_tokens = cfg.get("temperature"), cfg.get("max_tokens")
        return judge(Endpoint.of(cfg), 0.3 if temperature is None else float(temperature),
                     200 if max_tokens is None else int(max_tokens))  # fmt: skip
    if name == "strongreject_finetuned":
        options: dict[str, Any] = {
            k: cfg[k] for k in _FINETUNED_KEYS if cfg.get(k) is not None or (k in _NULL_MEANS and k in cfg)
        }
        options["template"] = judge_template("strongreject_finetuned", data_root, cfg.get("template_file"), online)
        path = str(cfg.get("path") or DEFAULT_JUDGE)
        if kwargs.get("model") is not None and kwargs.get("tokenizer") is not None:
            return StrongRejectFinetunedJudge(kwargs["model"], kwargs["tokenizer"], model_id=path, **options)
        return StrongRejectFinetunedJudge.load(
            path=path,
            revision=cfg.get("revision"),
            base_revision=cfg.get("base_revision"),
            dtype=str(cfg.get("dtype") or "bfloat16"),
            device=str(kwargs.get("device") or cfg.get("device") or "auto"),
            cache_dir=kwargs.get("cache_dir") or cfg.get("cache_dir") or ".cache/harmsweep",
            **options,
        )
    raise HarmsweepError(f"judge.name={name} is not a known judge; pick one of {', '.join(KNOWN_JUDGES)}")


__all__ = [
    "DEFAULT_JUDGE",
    "KNOWN_JUDGES",
    "REFUSAL_PHRASES",
    "CoherenceJudge",
    "ExplanationJudge",
    "Judge",
    "RefusalJudge",
    "RubricJudge",
    "StrongRejectFinetunedJudge",
    "UsefulnessJudge",
    "is_compliant",
    "is_refusal",
    "judge_template",
    "make_judge",
    "parse_rubric",
    "parse_score",
    "summarize",
]
