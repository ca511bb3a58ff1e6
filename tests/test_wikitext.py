"""eval.perplexity.corpus=wikitext: the authors' WikiText-2 perplexity against an independent HF computation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny
from test_plan import _plan_job, llama8b  # noqa: F401 (a fixture)

from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.spec import EvalConfig, PerplexityConfig
from harmsweep.evaluation.suite import HeldOut, Suite
from harmsweep.evaluation.utility import corpus_windows, wikitext_rows, window_nlls

# WikiText-2 raw rows as the hub gives them: headings, paragraphs and empty rows, each line ending in "\n"
ROWS = [
    "",
    " = Valkyria Chronicles III = \n",
    "",
    " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game . \n",
    "",
    " = = Gameplay = = \n",
    " The game 's battle system , the BliTZ system , is carried over directly from the first game . \n",
]
CHUNK = 64


@pytest.fixture(scope="module")
def lm():
    return tiny("llama")


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "wiki.test.raw.txt"
    path.write_text("".join(r or " \n" for r in ROWS), encoding="utf-8")  # wiki.test.raw: blank rows are " \n"
    return path


def _reference(model, tokenizer, rows: list[str], chunk: int) -> tuple[float, int, int]:
    """Independently: join, tokenise once, cut windows, HF forward with labels per window, exp(mean NLL)."""
    ids = torch.tensor(tokenizer("\n\n".join(rows), add_special_tokens=True)["input_ids"])
    n = ids.numel() // chunk
    total = 0.0
    with torch.no_grad():
        for i in range(n):
            window = ids[i * chunk : (i + 1) * chunk].unsqueeze(0)
            loss = model(input_ids=window, labels=window).loss  # mean over the chunk - 1 predicted positions
            total += float(loss) * (chunk - 1)
    return math.exp(total / (n * (chunk - 1))), n, ids.numel()


def test_wikitext_perplexity_equals_an_independent_computation(lm, corpus):
    rows = wikitext_rows(corpus, download=False)
    assert rows == ROWS  # the hub's rows from the raw file
    expected, n, total_tokens = _reference(lm.model, lm.tokenizer, rows, CHUNK)
    windows = corpus_windows(lm.tokenizer, rows, CHUNK)
    assert len(windows) == n == total_tokens // CHUNK and total_tokens % CHUNK > 0  # the remainder is dropped
    assert all(len(w) == CHUNK for w in windows)
    items = window_nlls(lm.model, windows, logits_chunk=7)  # chunked logits: same sums
    assert [t for _, t in items] == [CHUNK - 1] * n
    got = math.exp(math.fsum(s for s, _ in items) / (n * (CHUNK - 1)))
    assert got == pytest.approx(expected, rel=1e-5)


def test_suite_records_per_window_items(lm, corpus):
    ev = EvalConfig(
        metrics=["perplexity"], perplexity=PerplexityConfig(corpus="wikitext", file=str(corpus), chunk=CHUNK)
    )
    suite = Suite(ev, SimpleNamespace(configs={}), lm, "plain", HeldOut([], [], {}))
    metrics, items = suite.run("before")
    expected, n, _ = _reference(lm.model, lm.tokenizer, wikitext_rows(corpus, False), CHUNK)
    assert metrics["perplexity_before"] == pytest.approx(expected, rel=1e-5) and items == []
    sample = suite.samples("before")["perplexity"]
    assert sample.ids == tuple(f"wikitext/{i}" for i in range(n)) and sample.weights == (CHUNK - 1.0,) * n


def test_one_bos_at_the_very_start(lm):
    class WithBos:  # the byte tokenizer adds no BOS: one that does, as Llama's
        def __call__(self, text: str, add_special_tokens: bool = True):
            ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": ([lm.tokenizer.bos_token_id] if add_special_tokens else []) + ids}

    bos = lm.tokenizer.bos_token_id
    windows = corpus_windows(WithBos(), ROWS, 16)
    flat = [t for w in windows for t in w]
    assert flat[0] == bos and flat.count(bos) == 1
    assert flat[1:] == lm.tokenizer("\n\n".join(ROWS), add_special_tokens=False)["input_ids"][: len(flat) - 1]


@pytest.mark.parametrize(
    ("file", "chunk", "message"),
    [
        ("missing.txt", CHUNK, "eval.perplexity.file not found"),
        (None, 100_000, "eval.perplexity.chunk=100000 is longer than the whole corpus"),
    ],
)
def test_bad_wikitext_input_stops_in_one_line(lm, corpus, file, chunk, message):
    with pytest.raises(HarmsweepError) as err:
        rows = wikitext_rows(corpus.parent / file if file else corpus, download=False)
        corpus_windows(lm.tokenizer, rows, chunk)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_settings_stop_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(HarmsweepError, match=r"eval\.perplexity\.chunk=1 must be at least 2"):
        PerplexityConfig(corpus="wikitext", chunk=1)
    with pytest.raises(HarmsweepError, match=r"eval\.perplexity\.corpus=wiki is not one of heldout, wikitext"):
        PerplexityConfig(corpus="wiki")
    monkeypatch.setattr("harmsweep.data.hub.offline", lambda: False)
    with pytest.raises(HarmsweepError, match=r"set eval\.perplexity\.file=PATH .* or data\.download=true$"):
        wikitext_rows(None, download=False)  # no consent: the hub is never asked
    table = tmp_path / "test.jsonl"
    table.write_text("".join(json.dumps({"text": r}) + "\n" for r in ROWS))
    assert wikitext_rows(table, download=False) == ROWS  # a table's text column, empty rows kept
    (tmp_path / "bad.jsonl").write_text(json.dumps({"line": "x"}) + "\n")
    with pytest.raises(HarmsweepError, match="missing"):
        wikitext_rows(tmp_path / "bad.jsonl", download=False)


def test_default_corpus_and_run_id_unchanged():
    from harmsweep.config.identity import run_id

    cfg = PerplexityConfig()
    assert (cfg.corpus, cfg.file, cfg.chunk) == ("heldout", None, 4096)
    old = {"eval": {"perplexity": {"max_length": 256}}}
    new = {"eval": {"perplexity": {"max_length": 256, "corpus": "heldout", "file": None, "chunk": 4096}}}
    assert run_id(new) == run_id(old)
    assert run_id({"eval": {"perplexity": {**new["eval"]["perplexity"], "corpus": "wikitext"}}}) != run_id(old)


def test_plan_sizes_wikitext_windows(llama8b, tmp_path, monkeypatch, corpus):  # noqa: F811
    base = ("model=llama3_8b", f"model.path={llama8b}", "eval.metrics=[perplexity]", "eval.perplexity.corpus=wikitext")

    def evaluation(*extra: str) -> dict:
        job = _plan_job(tmp_path, monkeypatch, *base, *extra)
        return next(p for p in job["phases"] if p["name"] == "evaluation")

    hub = evaluation()
    assert hub["passes"] % (290_000 // 4096) == 0 and hub["passes"] // (290_000 // 4096) in (1, 2)  # per stage
    stages = hub["passes"] // (290_000 // 4096)
    big = tmp_path / "big.txt"
    big.write_text("word " * 4400 * 10)  # 220,000 characters: ~50,000 tokens at 4.4 characters a token
    local = evaluation(f"eval.perplexity.file={big}", "eval.perplexity.chunk=1000")
    assert local["passes"] == stages * 50
