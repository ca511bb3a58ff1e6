"""What is measured, as configured: the ``eval`` block, the metrics it may name, and which of them will run.

No torch here: the command line checks an evaluation plan (and the sweep side sizes it) without a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from harmsweep.errors import HarmsweepError
from harmsweep.generation.sampling import BACKENDS, GenerationConfig

METRICS = (
    "harm_likelihood",
    "refusal",
    "strongreject_finetuned",
    "strongreject_rubric",
    "perplexity",
    "recognition",
    "lm_eval",
)
JUDGES = {"refusal": "asr_keyword", "strongreject_finetuned": "strongreject", "strongreject_rubric": "rubric"}
ATTACKS = ("none", "prefill")
COUNTS = ("_n_before", "_unscored_before")


CORPORA = ("heldout", "wikitext")  # eval.perplexity.corpus


# eval.perplexity settings added after runs were made: at these values they key no run id or cached evaluation
PERPLEXITY_LATER_DEFAULTS = {"corpus": "heldout", "file": None, "chunk": 4096}


@dataclass
class PerplexityConfig:
    """heldout: held-out benign responses cut at max_length (the default); wikitext: WikiText-2 raw test in
    non-overlapping ``chunk``-token windows, as the paper's authors measure it (``file``: a local copy)."""

    max_length: int = 256
    corpus: str = "heldout"
    file: str | None = None  # .txt, or .parquet/.jsonl/.csv with a text column; null: the hub (data.download=true)
    chunk: int = 4096

    def __post_init__(self) -> None:
        if self.corpus not in CORPORA:
            raise HarmsweepError(f"eval.perplexity.corpus={self.corpus} is not one of {', '.join(CORPORA)}")
        if int(self.chunk) < 2:
            raise HarmsweepError(f"eval.perplexity.chunk={self.chunk} must be at least 2 (a window predicts chunk-1)")


@dataclass
class LmEvalConfig:
    tasks: list[str] = field(default_factory=list)
    limit: int | None = 200
    batch_size: Any = 8  # a number, or auto
    num_fewshot: int | None = 0  # null: each task's standard few-shot setting


@dataclass
class EvalConfig:
    """The ``eval`` block: metrics before and after pruning, on ``n`` held-out prompts per side."""

    metrics: list[str] = field(default_factory=list)
    n: int | None = 32  # null: every held-out prompt
    batch_size: int = 8
    benign_references: str = "model"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)


REFUSAL_LISTS = ("harmsweep", "orgad2026")  # judges.refusal.phrases (evaluation/judges/refusal.py PHRASE_LISTS)


def metric_plan(ev: EvalConfig, judges: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """Metrics that will run, and those skipped with the reason (a judge that is not configured)."""
    unknown = [m for m in ev.metrics if m not in METRICS]
    if unknown:
        raise HarmsweepError(f"eval.metrics has unknown {', '.join(unknown)} (known: {', '.join(METRICS)})")
    gen = ev.generation
    if gen.attack not in ATTACKS:
        raise HarmsweepError(f"eval.generation.attack={gen.attack} is not one of {', '.join(ATTACKS)}")
    if gen.backend not in BACKENDS:
        raise HarmsweepError(f"eval.generation.backend={gen.backend} is not one of {', '.join(BACKENDS)}")
    phrases = (judges.get("refusal") or {}).get("phrases", "harmsweep")
    if phrases not in REFUSAL_LISTS:
        raise HarmsweepError(f"judges.refusal.phrases={phrases} is not one of {', '.join(REFUSAL_LISTS)}")
    run, skipped = [], {}
    for metric in ev.metrics:
        if metric == "strongreject_finetuned" and not judges[metric].get("path"):
            skipped[metric] = (
                "no judge weights: set judges.strongreject_finetuned.path=qylu4156/strongreject-15k-v1 or a local copy"
            )
        elif metric == "strongreject_rubric" and not judges[metric].get("base_url"):
            skipped[metric] = "no endpoint: set judges.strongreject_rubric.base_url=URL (key from its api_key_env)"
        elif metric == "lm_eval" and not ev.lm_eval.tasks:
            skipped[metric] = "no tasks: set eval.lm_eval.tasks=[...]"
        else:
            run.append(metric)
    return run, skipped
