"""Harmfulness judges: one interface (``Judge.score``), one factory (``make_judge``), one summary.

The factory keeps config handling in one place so a run records ``judge.version`` next to its
numbers, whichever judge produced them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harmsweep.errors import HarmsweepError
from harmsweep.judges.base import Judge, summarize
from harmsweep.judges.refusal import REFUSAL_PHRASES, RefusalJudge, is_compliant, is_refusal
from harmsweep.judges.rubric import RubricJudge, parse_rubric
from harmsweep.judges.strongreject import (
    DEFAULT_JUDGE,
    FINETUNED_TEMPLATE,
    StrongRejectFinetunedJudge,
    load_template,
)

KNOWN_JUDGES = ("refusal", "strongreject_finetuned", "strongreject_rubric")
_RUBRIC_KEYS = (
    "base_url",
    "model",
    "api_key_env",
    "max_retries",
    "backoff_s",
    "timeout_s",
    "max_tokens",
    "max_workers",
)
_FINETUNED_KEYS = ("batch_size", "max_response_tokens", "min_digit_mass")


def make_judge(cfg: Mapping[str, Any], **kwargs: Any) -> Judge:
    """Build the judge ``cfg["name"]`` names.

    strongreject_finetuned: cfg ``path`` (hub id or local dir), ``dtype``, ``device``, ``batch_size``,
    ``max_response_tokens``, ``template_file``; kwargs ``cache_dir``, or ``model`` + ``tokenizer`` to
    reuse an already loaded judge (tests). strongreject_rubric: cfg ``base_url``, ``model``,
    ``api_key_env``, ``max_retries``, ``backoff_s``, ``timeout_s``, ``max_tokens``, ``max_workers``.
    """
    name = cfg.get("name")
    if name == "refusal":
        return RefusalJudge()
    if name == "strongreject_rubric":
        return RubricJudge(**{k: cfg[k] for k in _RUBRIC_KEYS if cfg.get(k) is not None})
    if name == "strongreject_finetuned":
        options: dict[str, Any] = {k: cfg[k] for k in _FINETUNED_KEYS if cfg.get(k) is not None}
        if cfg.get("template_file"):
            options["template"] = load_template(cfg["template_file"])
        path = str(cfg.get("path") or DEFAULT_JUDGE)
        if kwargs.get("model") is not None and kwargs.get("tokenizer") is not None:
            return StrongRejectFinetunedJudge(kwargs["model"], kwargs["tokenizer"], model_id=path, **options)
        return StrongRejectFinetunedJudge.from_config(
            path=path,
            dtype=str(cfg.get("dtype") or "bfloat16"),
            device=str(kwargs.get("device") or cfg.get("device") or "auto"),
            cache_dir=kwargs.get("cache_dir") or cfg.get("cache_dir") or ".cache/harmsweep",
            **options,
        )
    raise HarmsweepError(f"judge.name={name} is not a known judge; pick one of {', '.join(KNOWN_JUDGES)}")


__all__ = [
    "DEFAULT_JUDGE",
    "FINETUNED_TEMPLATE",
    "KNOWN_JUDGES",
    "REFUSAL_PHRASES",
    "Judge",
    "RefusalJudge",
    "RubricJudge",
    "StrongRejectFinetunedJudge",
    "is_compliant",
    "is_refusal",
    "load_template",
    "make_judge",
    "parse_rubric",
    "summarize",
]
