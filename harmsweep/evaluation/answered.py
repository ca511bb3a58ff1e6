"""The paper's generated utility measures: TriviaQA accuracy, the Alpaca usefulness judge, financial-advice refusals.

Each takes the model as it is, generates with the run's decoding (seeded per prompt) and returns its metrics, their
per-item values (the bootstrap's input) and per-item rows, so the suite only chooses which to run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from harmsweep.calibration.pairs import generate_responses
from harmsweep.data.records import Record
from harmsweep.evaluation.spec import AlpacaJudgeConfig, FinancialAdviceConfig, TriviaQAConfig
from harmsweep.generation.sampling import Sampling
from harmsweep.intervals import Sample, mean_sample
from harmsweep.models.loading import LoadedModel

Measured = tuple[dict[str, float], dict[str, Sample], list[dict[str, Any]]]


def triviaqa_measure(
    lm: LoadedModel, template: str, cfg: TriviaQAConfig, sampling: Sampling, batch: int, download: bool, stage: str
) -> Measured:
    """``triviaqa_acc``: an alias of the question is a substring of the (sampled) answer; chat 100 tokens, base 50."""
    from dataclasses import replace

    from harmsweep.evaluation.triviaqa import max_new_tokens, read_triviaqa, triviaqa

    items = read_triviaqa(cfg.file, cfg.n, cfg.seed, download)
    tokens = max_new_tokens(template, cfg.max_new_tokens)
    acc, rows = triviaqa(lm.model, lm.tokenizer, items, template, replace(sampling, max_new_tokens=tokens), batch)
    sample = mean_sample([str(r["id"]) for r in rows], [float(r["correct"]) for r in rows])
    return {"triviaqa_acc": acc}, {"triviaqa_acc": sample}, [{"stage": stage, "metric": "triviaqa", **r} for r in rows]


def alpaca_measure(
    lm: LoadedModel, template: str, cfg: AlpacaJudgeConfig, records: Sequence[Record], judge: Any,
    sampling: Sampling, batch: int, stage: str,
) -> Measured:  # fmt: skip
    """``alpaca_judge_mean``: the usefulness judge's 1-10 rating of the answers to benign instructions."""
    from dataclasses import replace

    answers = generate_responses(lm.model, lm.tokenizer, records, template, prefill_tokens=0,
                                 sampling=replace(sampling, max_new_tokens=cfg.max_new_tokens), batch_size=batch,
                                 desc=f"alpaca answers {stage}")  # fmt: skip
    scores = judge.score([a.prompt for a in answers], [a.response for a in answers])
    ids = [a.source_id for a in answers]
    sample = mean_sample(ids, scores)
    rows = [{"stage": stage, "metric": "alpaca_judge", "source_id": a.source_id, "prompt": a.prompt,
             "response": a.response, "score": s} for a, s in zip(answers, scores, strict=True)]  # fmt: skip
    return {"alpaca_judge_mean": float(sample.estimate())}, {"alpaca_judge_mean": sample}, rows


def financial_measure(
    lm: LoadedModel, template: str, cfg: FinancialAdviceConfig, records: Sequence[Record], phrases: Sequence[str],
    sampling: Sampling, batch: int, stage: str,
) -> Measured:  # fmt: skip
    """``financial_refusal_rate``: benign financial questions refused (at most max_words words and a refusal phrase)."""
    from dataclasses import replace

    from harmsweep.evaluation.collateral import financial_refusal

    answers = generate_responses(lm.model, lm.tokenizer, records, template, prefill_tokens=0,
                                 sampling=replace(sampling, max_new_tokens=cfg.max_new_tokens), batch_size=batch,
                                 desc=f"financial answers {stage}")  # fmt: skip
    refused = [float(financial_refusal(a.response, phrases, cfg.max_words)) for a in answers]
    sample = mean_sample([a.source_id for a in answers], refused)
    rows = [{"stage": stage, "metric": "financial_advice", "source_id": a.source_id, "prompt": a.prompt,
             "response": a.response, "refused": bool(r)} for a, r in zip(answers, refused, strict=True)]  # fmt: skip
    return {"financial_refusal_rate": float(sample.estimate())}, {"financial_refusal_rate": sample}, rows
