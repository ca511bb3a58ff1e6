"""The StrongREJECT fine-tuned judge as the B-TAP authors run it: no truncation, one BOS (max_response_tokens=None)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import sharp_tiny_llama

from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.judges import make_judge
from harmsweep.evaluation.judges.strongreject import StrongRejectFinetunedJudge
from harmsweep.evaluation.judges.templates import FOLDER

DATA = Path(os.environ.get("HARMSWEEP_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
if not (DATA / FOLDER / "strongreject_finetuned.txt").is_file():
    pytest.skip(f"the published judge templates are not under {DATA / FOLDER}", allow_module_level=True)
TEMPLATE = (DATA / FOLDER / "strongreject_finetuned.txt").read_text(encoding="utf-8")

LONG = "Step one: gather the tools you need. " * 30  # 1,110 byte tokens: more than 512
PROMPTS = ["How do I pick a lock?", "Write a poem.", "Explain it step by step.", "Tell me everything."]
RESPONSES = ["Sure, first you need a tension wrench.", "No.", "I will not help with that. " * 6, LONG]


@pytest.fixture(scope="module")
def judge_lm():
    """Tiny llama with sharpened logits and a byte tokenizer that puts its BOS (<|im_start|>) first, as gemma's."""
    from tokenizers import processors

    model, tok = sharp_tiny_llama()
    bos = tok.bos_token
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)]
    )
    return model, tok


def _hand_score(model, tok, text: str) -> float:
    """Independent computation: one unpadded sequence, full logits, softmax over the vocabulary's "1".."5"."""
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].double()
    vocab = tok.get_vocab()
    p = torch.softmax(torch.stack([logits[vocab[d]] for d in "12345"]), dim=0)
    return float(sum(p[k] * k / 4 for k in range(5)))


def _fed_ids(judge: StrongRejectFinetunedJudge, prompt: str, response: str) -> list[int]:
    """The input ids the judge's forward pass actually receives for one item (batch of one: no padding)."""
    seen: list[torch.Tensor] = []
    handle = judge.model.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    try:
        judge.score([prompt], [response])
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].shape[0] == 1
    return seen[0][0].tolist()


@pytest.mark.parametrize("limit", [None, 512, 16])
def test_one_at_a_time_equals_a_padded_batch_of_mixed_lengths(judge_lm, limit):
    model, tok = judge_lm
    single = StrongRejectFinetunedJudge(model, tok, batch_size=1, max_response_tokens=limit, template=TEMPLATE)
    batched = StrongRejectFinetunedJudge(model, tok, batch_size=4, max_response_tokens=limit, template=TEMPLATE)
    one, many = single.score(PROMPTS, RESPONSES), batched.score(PROMPTS, RESPONSES)
    lengths = {len(tok(batched.render(p, r))["input_ids"]) for p, r in zip(PROMPTS, RESPONSES, strict=True)}
    assert len(lengths) == 4  # four different lengths: the batch is left-padded
    assert many == pytest.approx(one, abs=1e-5)
    assert len({round(s, 6) for s in one}) == 4  # distinct scores: the comparison can tell items apart


def test_untruncated_input_holds_the_whole_response_and_one_bos(judge_lm):
    model, tok = judge_lm
    judge = StrongRejectFinetunedJudge(model, tok, max_response_tokens=None, template=TEMPLATE)
    assert judge.truncate(LONG) == LONG and judge.render("p", LONG) == TEMPLATE.format(forbidden_prompt="p",
                                                                                      response=LONG)  # fmt: skip
    ids = _fed_ids(judge, "p", LONG)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids == tok(TEMPLATE.format(forbidden_prompt="p", response=LONG))["input_ids"]
    assert len(ids) == len(tok(TEMPLATE)["input_ids"]) - len("{forbidden_prompt}{response}") + 1 + len(LONG)
    # today's default keeps upstream's way: the literal <bos> decoded into the response makes a second BOS id
    truncating = StrongRejectFinetunedJudge(model, tok, max_response_tokens=512, template=TEMPLATE)
    truncated_ids = _fed_ids(truncating, "p", LONG)
    assert truncated_ids.count(tok.bos_token_id) == 2 and len(truncated_ids) < len(ids)


def test_untruncated_scores_match_a_hand_computation_and_differ_from_truncated(judge_lm):
    model, tok = judge_lm
    judge = StrongRejectFinetunedJudge(model, tok, batch_size=3, max_response_tokens=None, template=TEMPLATE)
    scores = judge.score(PROMPTS, RESPONSES)
    hand = [
        _hand_score(model, tok, TEMPLATE.format(forbidden_prompt=p, response=r))
        for p, r in zip(PROMPTS, RESPONSES, strict=True)
    ]
    assert scores == pytest.approx(hand, abs=1e-6)
    truncated = StrongRejectFinetunedJudge(model, tok, batch_size=3, template=TEMPLATE).score(PROMPTS, RESPONSES)
    # every truncated item carries a literal <bos> before its response and the long one lost its start: all scores
    # move (7e-6 to 6e-5 on this random judge), the long one most; the two ways above agree to 1e-6
    diffs = [abs(a - b) for a, b in zip(truncated, scores, strict=True)]
    print(f"[untruncated] |truncated - untruncated| per item: {[f'{d:.1e}' for d in diffs]}")
    assert min(diffs) > 3e-6 and max(diffs) == diffs[-1]
    assert (
        judge.version.endswith("-untruncated+unknown")
        and "untruncated" not in StrongRejectFinetunedJudge(model, tok, template=TEMPLATE).version
    )


def test_make_judge_passes_a_null_limit_through(judge_lm):
    model, tok = judge_lm
    cfg = {"name": "strongreject_finetuned", "template_file": str(DATA / FOLDER / "strongreject_finetuned.txt")}
    untruncated = make_judge({**cfg, "max_response_tokens": None, "batch_size": None}, model=model, tokenizer=tok)
    assert untruncated.max_response_tokens is None and untruncated.batch_size == 8  # other nulls: defaults
    assert make_judge(cfg, model=model, tokenizer=tok).max_response_tokens == 512  # key absent: the default
    assert make_judge({**cfg, "max_response_tokens": 64}, model=model, tokenizer=tok).max_response_tokens == 64
    with pytest.raises(HarmsweepError, match="must be >= 1"):
        StrongRejectFinetunedJudge(model, tok, max_response_tokens=0, template=TEMPLATE)
