"""bench/judge_server.py: the local OpenAI-compatible endpoint answers harmsweep's own judge clients, with the
logprobs and greedy text the served model really gives (checked against forward passes made here)."""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import PROXY_VARS, ROOT, tiny

from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.judges.em import EndpointEMJudge, logprob_score
from harmsweep.evaluation.judges.endpoint import Endpoint
from harmsweep.evaluation.judges.usefulness import UsefulnessJudge, parse_score

sys.path.insert(0, str(ROOT / "bench"))
import judge_server as js

KEY = "JUDGE_SERVER_TEST_KEY"
MESSAGES = [{"role": "user", "content": "Rate this answer from 0 to 100."}]


@dataclass(frozen=True)
class Recording(Endpoint):
    """An endpoint that keeps every (request body, choices[0]) the judge sent and got."""

    seen: list = field(default_factory=list)

    def post(self, body: bytes, who: str) -> dict[str, Any] | None:
        choice = super().post(body, who)
        self.seen.append((json.loads(body), choice))
        return choice


class DigitBias(torch.nn.Module):
    """The tiny model's lm_head plus a fixed bias on two digit tokens, so the EM judge's digits hold most mass."""

    def __init__(self, head: torch.nn.Module, bias: torch.Tensor) -> None:
        super().__init__()
        self.head, self.bias = head, bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden) + self.bias


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conftest's tiny random Llama, saved as a Hugging Face folder (what --model-dir reads)."""
    folder = tmp_path_factory.mktemp("judge") / "tiny-judge"
    lm = tiny("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def _started(model: Any, tokenizer: Any, name: str) -> Iterator[dict[str, Any]]:
    saved = {var: os.environ.pop(var) for var in PROXY_VARS if var in os.environ}
    server, thread = js.serve(model, tokenizer, name=name)
    try:
        yield {"url": js.base_url(server), "name": name, "model": model, "tok": tokenizer}
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        os.environ.update(saved)


@pytest.fixture(scope="module")
def plain(judge_dir: Path) -> Iterator[dict[str, Any]]:
    """The saved tiny model loaded back through harmsweep's loader (as --model-dir does), served in-process."""
    model, tok, name = js.load(None, str(judge_dir))
    assert name == "tiny-judge"
    yield from _started(model, tok, name)


@pytest.fixture(scope="module")
def digits() -> Iterator[dict[str, Any]]:
    lm = tiny("llama")
    bias = torch.zeros(lm.model.config.vocab_size)
    bias[lm.tokenizer.convert_tokens_to_ids("3")], bias[lm.tokenizer.convert_tokens_to_ids("7")] = 6.0, 5.5
    lm.model.lm_head = DigitBias(lm.model.lm_head, bias)
    yield from _started(lm.model, lm.tokenizer, "tiny-digits")


def _post(url: str, payload: Any, path: str = "/chat/completions") -> tuple[int, dict[str, Any]]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url + path, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def _prompt_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _last_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """log-softmax of the next-token logits after ``ids``: one full forward pass, no cache."""
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)


def test_em_judge_reads_the_served_top_logprobs(digits, monkeypatch):
    monkeypatch.setenv(KEY, "any")
    endpoint = Recording(base_url=digits["url"], model=digits["name"], api_key_env=KEY, max_workers=1)
    judge = EndpointEMJudge(endpoint)
    prompts = [{"aligned": "Is this aligned? {question} {answer}", "coherent": "Is this coherent? {answer}"}]
    aligned, coherent = judge.score(["What is 2+2?"], ["Four."], prompts)
    assert judge.n_failed == 0 and len(endpoint.seen) == 2
    body, choice = endpoint.seen[0]
    assert (body["max_tokens"], body["top_logprobs"], body["temperature"]) == (1, 20, 0)
    [entry] = choice["logprobs"]["content"]
    top = entry["top_logprobs"]
    values = [t["logprob"] for t in top]
    assert len(top) == 20 and values == sorted(values, reverse=True)
    assert all(v <= 0.0 for v in values) and sum(math.exp(v) for v in values) <= 1.0 + 1e-6
    assert entry["token"] == top[0]["token"] and entry["logprob"] == pytest.approx(top[0]["logprob"])
    assert choice["message"]["content"] == entry["token"] and choice["finish_reason"] == "length"
    # the same numbers from a forward pass made here
    tok = digits["tok"]
    expected = _last_logprobs(digits["model"], _prompt_ids(tok, body["messages"]))
    best = torch.topk(expected, 20)
    assert [t["token"] for t in top] == [tok.decode([i]) for i in best.indices.tolist()]
    assert values == pytest.approx(best.values.tolist(), abs=1e-4)
    assert {top[0]["token"], top[1]["token"]} == {"3", "7"}
    assert aligned[0] is not None and aligned[0] == pytest.approx(logprob_score(top))
    assert 3.0 < aligned[0] < 7.0 and coherent[0] is not None and judge.last_aligned_labels == [None]


def test_logprobs_of_each_step_match_a_full_forward_pass(plain):
    body = {"model": plain["name"], "messages": MESSAGES, "temperature": 0, "max_tokens": 4, "logprobs": True,
            "top_logprobs": 5}  # fmt: skip
    status, reply = _post(plain["url"], body)
    assert status == 200 and reply["object"] == "chat.completion" and reply["model"] == plain["name"]
    tok, model = plain["tok"], plain["model"]
    ids = _prompt_ids(tok, MESSAGES)
    entries = reply["choices"][0]["logprobs"]["content"]
    assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(entries),
                              "total_tokens": len(ids) + len(entries)}  # fmt: skip
    for entry in entries:
        expected = _last_logprobs(model, ids)
        best = torch.topk(expected, 5)
        assert [t["token"] for t in entry["top_logprobs"]] == [tok.decode([i]) for i in best.indices.tolist()]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(best.values.tolist(), abs=1e-4)
        chosen = int(best.indices[0])  # greedy
        assert entry["token"] == tok.decode([chosen]) and entry["logprob"] == pytest.approx(float(expected[chosen]))
        ids = [*ids, chosen]


def test_usefulness_judge_gets_the_models_greedy_text(plain, monkeypatch):
    monkeypatch.setenv(KEY, "any")
    endpoint = Recording(base_url=plain["url"], model=plain["name"], api_key_env=KEY, max_workers=1)
    judge = UsefulnessJudge(endpoint, max_tokens=24)
    scores = judge.score(["Name a fruit."], ["An apple."])
    [(body, choice)] = endpoint.seen
    tok, model = plain["tok"], plain["model"]
    prompt = _prompt_ids(tok, body["messages"])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    new = out[0, len(prompt) :].tolist()
    finish = "stop" if tok.eos_token_id in new else "length"
    new = new[: new.index(tok.eos_token_id)] if finish == "stop" else new
    assert choice["message"] == {"role": "assistant", "content": tok.decode(new, skip_special_tokens=True)}
    assert choice["finish_reason"] == finish and choice["logprobs"] is None
    assert judge.n_failed == 0 and scores == [parse_score(choice["message"]["content"])]


def test_greedy_repeats_sampling_follows_the_seed_and_concurrent_requests_agree(plain):
    def ask(**extra: Any) -> str:
        status, reply = _post(plain["url"], {"model": plain["name"], "messages": MESSAGES, "max_tokens": 12, **extra})
        assert status == 200
        return reply["choices"][0]["message"]["content"]

    greedy = ask(temperature=0)
    assert ask(temperature=0, seed=3) == greedy  # the seed plays no part in greedy decoding
    assert ask(temperature=1.0, seed=5) == ask(temperature=1.0, seed=5) != ask(temperature=1.0, seed=6)
    assert ask(seed=5) == ask(temperature=1.0, seed=5)  # OpenAI's default temperature is 1
    assert ask(temperature=1.0, top_p=1e-6, seed=9) == greedy  # a vanishing nucleus keeps only the top token
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: ask(temperature=0), range(4))) == [greedy] * 4


def test_errors_come_back_in_openai_shape(plain, monkeypatch):
    url, name = plain["url"], plain["name"]
    status, reply = _post(url, b"{not json")
    assert status == 400 and reply["error"]["type"] == "invalid_request_error" and "JSON" in reply["error"]["message"]
    assert _post(url, {"model": name, "messages": MESSAGES}, path="/completions")[0] == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url + "/nothing", timeout=10)
    assert err.value.code == 404 and json.loads(err.value.read())["error"]["code"] == "not_found"
    err.value.close()
    for bad, param in (({"top_logprobs": 21, "logprobs": True}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
                       ({"n": 2}, "n"), ({"temperature": 3}, "temperature"), ({"messages": []}, "messages"),
                       ({"max_tokens": 0}, "max_tokens"), ({"messages": [{"role": "user"}]}, "messages")):  # fmt: skip
        status, reply = _post(url, {"model": name, "messages": MESSAGES, **bad})
        assert (status, reply["error"]["param"]) == (400, param), bad
    long = [{"role": "user", "content": "x" * 1100}]  # byte tokens: past the tiny model's 1024 positions
    status, reply = _post(url, {"model": name, "messages": long})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    status, reply = _post(url, {"model": "gpt-4o", "messages": MESSAGES})
    assert status == 404 and reply["error"]["code"] == "model_not_found" and name in reply["error"]["message"]
    monkeypatch.setenv(KEY, "any")
    judge = EndpointEMJudge(Endpoint(base_url=url, model="gpt-4o", api_key_env=KEY))
    with pytest.raises(HarmsweepError, match="HTTP 404"):  # the judge stops: a wrong model name is the user's to fix
        judge.score(["q"], ["a"], [{"aligned": "{answer}", "coherent": "{answer}"}])
    with urllib.request.urlopen(url + "/models", timeout=10) as resp:
        assert [m["id"] for m in json.loads(resp.read())["data"]] == [name]


def test_pick_token_greedy_and_nucleus():
    logits = torch.tensor([0.1, 2.0, 1.9, -4.0])
    assert js.pick_token(logits, 0.0, 1.0, None) == 1
    gen = torch.Generator().manual_seed(0)
    assert {js.pick_token(logits, 1.5, 0.3, gen) for _ in range(50)} == {1}  # top token holds > 0.3 of the mass
    assert {js.pick_token(logits, 1.0, 0.6, gen) for _ in range(200)} == {1, 2}  # the two top tokens hold > 0.6
    request = js.parse_request({"model": "m", "messages": MESSAGES, "max_completion_tokens": 7}, "m")
    assert (request.max_tokens, request.temperature, request.seed, request.top_logprobs) == (7, 1.0, 0, None)


@pytest.mark.slow
def test_the_script_serves_until_sigterm(judge_dir):
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "judge_server.py"), "--model-dir", str(judge_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        url = None
        while url is None:
            line = lines.get(timeout=120)
            if line.startswith("listening on "):
                url = line.split()[-1]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        saved = {var: os.environ.pop(var) for var in PROXY_VARS if var in os.environ}
        try:
            status, reply = _post(url, {"model": "tiny-judge", "messages": MESSAGES, "temperature": 0, "max_tokens": 3})
        finally:
            os.environ.update(saved)
        assert status == 200 and reply["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in proc.stderr.read()
