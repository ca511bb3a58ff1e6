"""lm-eval as the authors run it: the chat template on or off, base-model shots, and their mean / pooled stderr."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny

from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.utility import flatten_results, lm_eval_choice, lm_eval_mean, lm_eval_tasks

TASK = "harmsweep_tiny_qa"
LIMIT = 5


@pytest.mark.parametrize(
    "setting,template,shots,base_shots,expected",
    [
        ("auto", "chat", 0, 3, (True, 0)),  # theirs: chat models 0-shot with the template
        ("auto", "plain", 0, 3, (False, 3)),  # base models 3-shot without
        ("auto", "plain", 0, None, (False, 0)),  # no base setting: the common one
        (True, "plain", None, 3, (True, 3)),  # true / false force it whatever the model
        ("true", "chat", 5, 3, (True, 5)),
        (False, "chat", None, None, (False, None)),
        ("False", "chat", 2, 3, (False, 2)),
    ],
)
def test_lm_eval_choice(setting, template: str, shots, base_shots, expected) -> None:
    assert lm_eval_choice(setting, template, shots, base_shots) == expected


def test_lm_eval_choice_rejects_unknown_setting() -> None:
    with pytest.raises(HarmsweepError, match="chat_template=sometimes"):
        lm_eval_choice("sometimes", "chat", 0, None)


def test_flatten_keeps_stderr_only_when_asked() -> None:
    raw = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "em,strict": 1, "em_stderr,strict": "N/A"}}
    assert flatten_results(raw) == {"lm_eval/t/acc": 0.5, "lm_eval/t/em/strict": 1.0}
    assert flatten_results(raw, stderr=True) == {
        "lm_eval/t/acc": 0.5,
        "lm_eval/t/acc_stderr": 0.1,
        "lm_eval/t/em/strict": 1.0,
    }


def test_lm_eval_mean_is_the_plain_mean_and_pooled_stderr() -> None:
    accs, ses = [0.8, 0.55, 0.3, 0.71, 0.42, 0.6], [0.01, 0.02, 0.03, 0.015, 0.025, 0.005]
    tasks = ["boolq", "rte", "hellaswag", "winogrande", "arc_challenge", "openbookqa"]
    flat = {f"lm_eval/{t}/acc": a for t, a in zip(tasks, accs, strict=True)}
    flat |= {f"lm_eval/{t}/acc_stderr": s for t, s in zip(tasks, ses, strict=True)}
    flat |= {f"lm_eval/{t}/acc_norm": 0.0 for t in tasks}  # other metrics do not enter
    got = lm_eval_mean(flat, tasks)
    assert got["lm_eval/mean/acc"] == pytest.approx(3.38 / 6)
    pooled = math.sqrt(0.01**2 + 0.02**2 + 0.03**2 + 0.015**2 + 0.025**2 + 0.005**2) / 6
    assert got["lm_eval/mean/acc_stderr"] == pytest.approx(pooled)
    assert set(got) == {"lm_eval/mean/acc", "lm_eval/mean/acc_stderr"}
    # over the tasks asked for only
    two = lm_eval_mean(flat, tasks[:2])
    assert two == {"lm_eval/mean/acc": pytest.approx(0.675), "lm_eval/mean/acc_stderr": pytest.approx(0.05**0.5 / 20)}


def test_lm_eval_mean_missing_metric_or_stderr() -> None:
    flat = {"lm_eval/a/acc": 0.5, "lm_eval/a/acc_stderr": 0.1, "lm_eval/b/acc": 0.7}
    got = lm_eval_mean(flat, ["a", "b"])
    assert got["lm_eval/mean/acc"] == pytest.approx(0.6) and math.isnan(got["lm_eval/mean/acc_stderr"])
    assert lm_eval_mean(flat, ["a", "c"]) == {}  # c has no acc: no partial mean
    filt = {"lm_eval/g/exact_match/strict-match": 0.25, "lm_eval/g/exact_match_stderr/strict-match": 0.04}
    assert lm_eval_mean(filt, ["g"], metric="exact_match/strict-match") == {
        "lm_eval/mean/exact_match/strict-match": 0.25,
        "lm_eval/mean/exact_match_stderr/strict-match": pytest.approx(0.04),
    }
    with pytest.raises(HarmsweepError, match="at least one task"):
        lm_eval_mean(flat, [])


def _rescore(model, tokenizer, pairs: list[list[tuple[str, str]]], answers: list[int]) -> float:
    """Accuracy from summed log-likelihoods of each (context, continuation), computed here on the whole string."""
    correct = 0
    for choices, answer in zip(pairs, answers, strict=True):
        lls = []
        for ctx, cont in choices:
            c = tokenizer(ctx, add_special_tokens=False)["input_ids"]
            t = tokenizer(cont, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([c + t])).logits[0].double(), dim=-1)
            lls.append(sum(float(logp[len(c) - 1 + j, tok]) for j, tok in enumerate(t)))
        correct += max(range(len(lls)), key=lls.__getitem__) == answer
    return correct / len(answers)


def test_chat_template_changes_what_lm_eval_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval.models.huggingface import HFLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    sent: list[tuple[str, str]] = []
    original = HFLM.loglikelihood

    def recording(self, requests, *args, **kwargs):
        sent.extend(r.args for r in requests)
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "loglikelihood", recording)
    rows = [json.loads(line) for line in (ROOT / "conf" / "lm_eval_tasks" / f"{TASK}.jsonl").read_text().splitlines()]
    rows = rows[:LIMIT]
    lm = tiny("llama")
    tok = lm.tokenizer
    questions = [f"Question: {r['question']}\nAnswer:" for r in rows]
    chat_ctx = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    expected = {  # with the template the assistant turn starts the answer: lm-eval drops the " " target delimiter
        False: [[(q, " " + c) for c in r["choices"]] for q, r in zip(questions, rows, strict=True)],
        True: [[(q, c) for c in r["choices"]] for q, r in zip(chat_ctx, rows, strict=True)],
    }
    for chat in (False, True):
        sent.clear()
        got = lm_eval_tasks(lm.model, tok, [TASK], limit=LIMIT, batch_size=4, apply_chat_template=chat, stderr=True)
        assert sorted(sent) == sorted(pair for choices in expected[chat] for pair in choices)
        assert got[f"lm_eval/{TASK}/acc"] == pytest.approx(
            _rescore(lm.model, tok, expected[chat], [r["answer"] for r in rows])
        )
        acc = got[f"lm_eval/{TASK}/acc"]
        assert got[f"lm_eval/{TASK}/acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (LIMIT - 1)))
    assert all(ctx.startswith("<|im_start|>user\nQuestion: ") for ctx, _ in expected[True][0])


def test_chat_template_without_one_is_refused() -> None:
    lm = tiny("llama")
    lm.tokenizer.chat_template = None
    with pytest.raises(HarmsweepError, match="no chat template"):
        lm_eval_tasks(lm.model, lm.tokenizer, [TASK], limit=1, batch_size=1, apply_chat_template=True)


def test_utility_full_preset_composes_and_checks() -> None:
    from test_config import plain

    from harmsweep.config.checks import check_config
    from harmsweep.config.schema import to_config

    ev = plain("eval=utility_full", "hardware=gpu80")["eval"]
    assert ev["lm_eval"]["tasks"] == [
        "mmlu", "mmlu_pro", "gpqa_main_zeroshot", "truthfulqa_mc2", "gsm8k", "minerva_math", "ifeval"
    ]  # fmt: skip
    assert (ev["lm_eval"]["limit"], ev["lm_eval"]["chat_template"], ev["lm_eval"]["num_fewshot"]) == (None, True, None)
    assert "lm_eval" in ev["metrics"] and "triviaqa" in ev["metrics"]
    assert (ev["triviaqa"]["n"], ev["triviaqa"]["seed"]) == (1000, 42)
    check_config(to_config(plain("eval=utility_full", "data.root=/tmp", "data.download=true")))
