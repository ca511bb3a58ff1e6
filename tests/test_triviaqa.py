"""TriviaQA as the authors run it: their file layout and seeded draw, their prompts, answer cut and alias rule."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import tiny

from harmsweep.errors import DataError, HarmsweepError
from harmsweep.evaluation import triviaqa as tq
from harmsweep.generation.hf import generate
from harmsweep.generation.sampling import Sampling

N_QUESTIONS = 30


def _dev_file(tmp_path: Path, n: int = N_QUESTIONS) -> tuple[Path, list[dict]]:
    """A file in unfiltered-web-dev.json's layout (extra fields as theirs, ignored)."""
    rows = [
        {
            "Question": f"Question number {i}?",
            "QuestionId": f"tc_{i}",
            "QuestionSource": "http://www.triviacountry.com/",
            "Answer": {"Aliases": [f"Answer{i}", f"alias {i}"], "NormalizedAliases": [f"answer{i}"], "Value": f"A{i}"},
            "SearchResults": [],
        }
        for i in range(n)
    ]
    path = tmp_path / "unfiltered-web-dev.json"
    path.write_text(json.dumps({"Data": rows, "Domain": "Web", "Version": 1.0}))
    return path, rows


@pytest.mark.parametrize("n", [1, 10, N_QUESTIONS])
def test_draw_is_their_seeded_shuffle(tmp_path: Path, n: int) -> None:
    path, rows = _dev_file(tmp_path)
    theirs = list(rows)
    random.Random(42).shuffle(theirs)
    got = tq.read_triviaqa(path, n, 42, download=False)
    assert [(i.question, i.aliases, i.id) for i in got] == [
        (r["Question"], tuple(r["Answer"]["Aliases"]), r["QuestionId"]) for r in theirs[:n]
    ]
    assert [i.id for i in tq.read_triviaqa(path, None, 42, download=False)] == [r["QuestionId"] for r in theirs]
    other = tq.read_triviaqa(path, N_QUESTIONS, 7, download=False)
    assert [i.id for i in other] != [r["QuestionId"] for r in theirs]  # the seed matters
    assert sorted(i.id for i in other) == sorted(r["QuestionId"] for r in rows)


def test_bad_files_and_settings_fail_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _dev_file(tmp_path, 3)
    cases = [
        (lambda: tq.read_triviaqa(tmp_path / "missing.json", 3, 42, False), DataError, "not found"),
        (lambda: tq.read_triviaqa(path, 4, 42, False), DataError, "only 3 questions"),
        (lambda: tq.read_triviaqa(path, 0, 42, False), HarmsweepError, "at least 1"),
    ]
    bad = tmp_path / "bad.json"
    for text, message in [
        ("not json", "not JSON"),
        ('{"data": []}', '"Data" list'),
        ('{"Data": [{"Question": "Q?", "Answer": {"Value": "x"}}]}', "Aliases"),
        ('{"Data": [{"Question": 3, "Answer": {"Aliases": ["x"]}}]}', "Question"),
    ]:
        bad.write_text(text)
        with pytest.raises(DataError, match=message) as err:
            tq.read_triviaqa(bad, 1, 42, False)
        assert "\n" not in str(err.value)
    for call, kind, message in cases:
        with pytest.raises(kind, match=message) as err:
            call()
        assert "\n" not in str(err.value)
    monkeypatch.setattr("harmsweep.data.hub.offline", lambda: False)
    with pytest.raises(DataError, match=r"eval.triviaqa.file=PATH .* or data.download=true"):
        tq.read_triviaqa(None, 10, 42, download=False)


@pytest.mark.parametrize(
    "text,template,answer",
    [
        (" Paris\nQ: What is the capital of Italy?\nA: Rome", "plain", "Paris"),  # base: the first line only
        ("\n\nParis is the capital.\nmore", "plain", "Paris is the capital."),  # stripped before the cut
        ("The answer is Paris.", "chat", "The answer is Paris."),
        ("user\nWhat?assistant\n\n Paris \n", "chat", "Paris"),  # after the first "assistant"
        ("assistant: Rome. As an assistant, Paris", "chat", ": Rome. As an assistant, Paris"),
    ],
)
def test_answer_cut(text: str, template: str, answer: str) -> None:
    assert tq.extract_answer(text, template) == answer


@pytest.mark.parametrize(
    "answer,aliases,correct",
    [
        ("It is PARIS, France", ["Paris"], True),  # case folded on both sides
        ("paris", ["PARIS"], True),
        ("Parisian", ["Paris"], True),  # a substring, not a word match (theirs)
        ("Lyon", ["Paris", "Paname"], False),
        ("the city of paname", ["Paris", "Paname"], True),
        ("Paris", [], False),
    ],
)
def test_alias_substring_rule(answer: str, aliases: list[str], correct: bool) -> None:
    assert tq.is_correct(answer, aliases) is correct


def test_prompts_are_theirs() -> None:
    tok = tiny("llama").tokenizer
    q = "Which planet is closest to the sun?"
    chat = tq.triviaqa_prompt_ids(tok, q, "chat")
    theirs = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)  # tokenised
    assert chat == (theirs if isinstance(theirs, list) else list(theirs["input_ids"]))  # a list, or an encoding (v5)
    assert tok.decode(chat) == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
    assert tq.triviaqa_prompt_ids(tok, q, "plain") == tok(f"Q: {q}\nA:")["input_ids"]
    assert (tq.max_new_tokens("chat", None), tq.max_new_tokens("plain", None), tq.max_new_tokens("chat", 7)) == (
        100,
        50,
        7,
    )
    with pytest.raises(HarmsweepError, match="template=raw"):
        tq.triviaqa_prompt_ids(tok, q, "raw")


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_accuracy_on_stub_answers_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template: str) -> None:
    lm = tiny("llama")
    tok = lm.tokenizer
    path, _ = _dev_file(tmp_path, 8)
    items = tq.read_triviaqa(path, 8, 42, download=False)
    # per item the model's text: right (any alias, any case), right only past the cut, or wrong
    texts = {
        "chat": [
            "answer{k} it is",
            "ALIAS {k}",
            "Answer{k}? assistant\nno idea",
            "no idea",
            "Answer{k}",
            "nope",
            "x",
            "Alias {k}",
        ],
        "plain": [
            " Answer{k}\nQ:",
            "alias {k}",
            "\nAnswer{k}",
            "no idea",
            "wrong\nAnswer{k}",
            "nope",
            "x",
            "Alias {k}",
        ],
    }[template]
    expected = {  # chat: the alias before "assistant" is cut off; plain: the alias on the second line is not read
        "chat": [True, True, False, False, True, False, False, True],
        "plain": [True, True, True, False, False, False, False, True],
    }[template]
    seen: dict = {}

    def stub(model, tokenizer, prompts, sampling, batch_size, **kwargs):
        seen.update(prompts=[list(p) for p in prompts], sampling=sampling, batch_size=batch_size)
        return [
            tok(t.format(k=i.id.split("_")[1]), add_special_tokens=False)["input_ids"]
            for t, i in zip(texts, items, strict=True)
        ]

    monkeypatch.setattr(tq, "generate", stub)
    sampling = Sampling(max_new_tokens=tq.max_new_tokens(template, None), do_sample=True, temperature=0.6, seed=3)
    acc, rows = tq.triviaqa(lm.model, tok, items, template, sampling, batch_size=3)
    assert [r["correct"] for r in rows] == expected
    assert acc == 4 / 8 == sum(expected) / 8
    assert [r["id"] for r in rows] == [i.id for i in items]
    assert [r["question"] for r in rows] == [i.question for i in items]
    assert seen["prompts"] == [tq.triviaqa_prompt_ids(tok, i.question, template) for i in items]
    assert seen["sampling"] == sampling and seen["batch_size"] == 3


def test_real_generation_rows_follow_decoding() -> None:
    lm = tiny("llama")
    tok = lm.tokenizer
    items = [tq.TriviaItem(f"Who wrote book {k}?", (chr(ord("a") + k),), str(k)) for k in range(5)]
    greedy = Sampling(max_new_tokens=6)
    acc, rows = tq.triviaqa(lm.model, tok, items, "plain", greedy, batch_size=2)
    prompts = [tok(f"Q: {i.question}\nA:")["input_ids"] for i in items]
    direct = [tok.decode(c).strip().split("\n")[0] for c in generate(lm.model, tok, prompts, greedy, batch_size=1)]
    assert [r["answer"] for r in rows] == direct
    correct = [any(a.lower() in d.lower() for a in i.aliases) for d, i in zip(direct, items, strict=True)]
    assert [r["correct"] for r in rows] == correct
    assert acc == sum(correct) / 5
