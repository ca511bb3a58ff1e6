"""A local OpenAI-compatible chat endpoint backed by a small offline model, so the API judges' code path runs for real.

    python bench/judge_server.py --model smollm2_135m [--port 0] [--host 127.0.0.1]
    python bench/judge_server.py --model-dir DIR          # any Hugging Face model folder (tests: a tiny random one)

Then point a judge at it, e.g. ``judges.alpaca_usefulness.base_url=http://127.0.0.1:PORT/v1`` with
``model=<the served name>`` (a request naming another model gets 404, so the recorded judge version names the model
that really answered) and any non-empty key in the judge's ``api_key_env`` (no auth is checked).

A 135M or 0.5B judge is NOT GPT-4o, Cohere command-a or any judge the papers used: this server exists so the
endpoint path (requests, retries, logprob parsing, score parsing) runs end to end offline. Scores it gives are not
comparable with published ones and must not be reported as such. Note also that SmolLM2's and Qwen2.5's tokenizers
split numbers into single digits, so the EM judge's 0-100 logprob score only ever sees the first digit (0-9) of the
number these models would write.

What it serves: ``POST /v1/chat/completions`` (messages rendered with the tokenizer's chat template and generation
prompt; greedy when temperature is 0, else sampled with a generator seeded by the request's ``seed`` or 0;
``max_tokens`` default 256; ``logprobs`` / ``top_logprobs`` (0-20): per generated token, its log-probability and the
k most likely tokens, log-softmax over the full vocabulary of the raw logits at that step) and ``GET /v1/models``.
An end-of-sequence token ends the answer: it is listed in ``logprobs`` (so a one-token request always has an
entry) but not in the content. One lock serialises the model: requests are answered one at a time.
Not supported (400): ``n`` > 1, ``stream``, ``stop``, tools.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("judge_server")

MAX_TOP_LOGPROBS = 20  # OpenAI's own limit
MAX_BODY_BYTES = 8 << 20


class RequestError(Exception):
    """What the client got wrong: answered with ``status`` and an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Request:
    """A validated chat completion request."""

    messages: list[dict[str, str]]
    max_tokens: int = 256
    temperature: float = 1.0  # OpenAI's default
    top_p: float = 1.0
    seed: int = 0
    top_logprobs: int | None = None  # None: no logprobs


def _number(body: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(f"{key}={value!r} must be a number from {low} to {high}", param=key)
    return float(value)


def _integer(body: Mapping[str, Any], key: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{key}={value!r} must be a whole number from {low} to {high}", param=key)
    return value


def _text(content: Any) -> str | None:
    """A message's content as text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return None


def parse_request(body: Any, served: str) -> Request:
    """The request in ``body`` (decoded JSON), or RequestError saying what is wrong with it."""
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("you must provide a model parameter", param="model")
    if model != served:
        raise RequestError(f"the model {model} does not exist here; this server serves {served}", 404, "model",
                           "model_not_found")  # fmt: skip
    for key, ok in (("n", lambda v: v in (None, 1)), ("stream", lambda v: not v), ("stop", lambda v: not v),
                    ("tools", lambda v: not v)):  # fmt: skip
        if not ok(body.get(key)):
            raise RequestError(f"{key}={body.get(key)!r} is not supported by this server", param=key)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list", param="messages")
    messages = []
    for i, m in enumerate(raw):
        text = _text(m.get("content")) if isinstance(m, Mapping) else None
        if text is None or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a role and a text content", param="messages")
        messages.append({"role": m["role"], "content": text})
    limit = body.get("max_completion_tokens") if body.get("max_tokens") is None else body.get("max_tokens")
    max_tokens = _integer({"max_tokens": limit}, "max_tokens", 256, 1, 1 << 20)
    logprobs = body.get("logprobs")
    if logprobs not in (None, True, False):
        raise RequestError(f"logprobs={logprobs!r} must be true or false", param="logprobs")
    top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if body.get("top_logprobs") is not None and not logprobs:
        raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
    return Request(
        messages=messages,
        max_tokens=int(max_tokens or 256),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=int(_integer(body, "seed", 0, -(1 << 63), (1 << 63) - 1) or 0),
        top_logprobs=top if logprobs else None,
    )


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy (argmax) when temperature is 0, else one draw from softmax(logits / temperature) within the top_p
    nucleus (the smallest set of most likely tokens whose mass reaches top_p; at least one token)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs[before >= top_p] = 0.0
        sorted_probs[0] = sorted_probs[0].clamp_min(1e-30)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Completion:
    """What one decode produced: the token ids, per step (log-softmax of the chosen token, top-k values, top-k ids)
    when logprobs were asked, and why it stopped."""

    ids: list[int]
    steps: list[tuple[float, list[float], list[int]]]
    finish_reason: str


@torch.no_grad()
def decode(model: Any, prompt: Sequence[int], request: Request, stops: set[int], context: int | None) -> Completion:
    """Token by token with the KV cache, so every step's full-vocabulary logits are at hand."""
    device = next(model.parameters()).device
    generator = None
    if request.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(request.seed)
    ids: list[int] = []
    steps: list[tuple[float, list[float], list[int]]] = []
    step_input = torch.tensor([list(prompt)], device=device)
    past = None
    budget = request.max_tokens if context is None else min(request.max_tokens, context - len(prompt))
    finish = "length"
    while len(ids) < budget:
        out = model(input_ids=step_input, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1].float()
        token = pick_token(logits, request.temperature, request.top_p, generator)
        ids.append(token)
        if request.top_logprobs is not None:
            logprobs = torch.log_softmax(logits, dim=-1)
            top = torch.topk(logprobs, request.top_logprobs)  # sorted, most likely first
            steps.append((float(logprobs[token]), top.values.tolist(), top.indices.tolist()))
        if token in stops:
            finish = "stop"
            break
        step_input = torch.tensor([[token]], device=device)
    return Completion(ids, steps, finish)


def stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokenizer's end-of-sequence id and those of the model's generation config."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    found = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return {int(t) for t in found if t is not None}


class Backend:
    """The model, its tokenizer and the lock that serialises them; turns a request body into a response body."""

    def __init__(self, model: Any, tokenizer: Any, name: str) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {name} has no chat template: it cannot render chat messages")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.stops = stop_ids(model, tokenizer)
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.lock = threading.Lock()
        self._pieces: dict[int, str] = {}

    def piece(self, token: int) -> str:
        """One token id's text (special tokens kept, so an end-of-sequence token reads as itself)."""
        if token not in self._pieces:
            self._pieces[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self._pieces[token]

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own checks (e.g. roles it does not accept) are the client's error
            raise RequestError(f"the chat template rejected the messages: {exc}", param="messages") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def complete(self, body: Any) -> dict[str, Any]:
        request = parse_request(body, self.name)
        with self.lock:
            prompt = self.render(request.messages)
            if self.context is not None and len(prompt) >= self.context:
                raise RequestError(f"the prompt is {len(prompt)} tokens; the model's context is {self.context}",
                                   param="messages", code="context_length_exceeded")  # fmt: skip
            done = decode(self.model, prompt, request, self.stops, self.context)
            text_ids = done.ids[:-1] if done.finish_reason == "stop" else done.ids
            content = self.tokenizer.decode(text_ids, skip_special_tokens=True)
            entries = [self._entry(t, *step) for t, step in zip(done.ids, done.steps, strict=False)]
        logprobs = None if request.top_logprobs is None else {"content": entries}
        message = {"role": "assistant", "content": content}
        n_prompt, n_done = len(prompt), len(done.ids)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": done.finish_reason}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_done, "total_tokens": n_prompt + n_done},
        }

    def _entry(self, token: int, logprob: float, values: list[float], tops: list[int]) -> dict[str, Any]:
        top = [{"token": self.piece(i), "logprob": v} for v, i in zip(values, tops, strict=True)]
        return {"token": self.piece(token), "logprob": logprob, "top_logprobs": top}

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "local"}]}


def _length(header: str | None) -> int:
    if header is None or not header.strip().isdigit():
        raise RequestError("the request needs a Content-Length header with the body's size in bytes")
    return int(header)


class Handler(BaseHTTPRequestHandler):
    server: Any  # the ThreadingHTTPServer, with .backend

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/models":
            self._send(200, self.server.backend.models())
        elif path == f"/v1/models/{self.server.backend.name}":
            self._send(200, self.server.backend.models()["data"][0])
        else:
            self._send(404, RequestError(f"no route GET {path}", 404, code="not_found").body())

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            length = _length(self.headers.get("Content-Length"))
            if length > MAX_BODY_BYTES:
                raise RequestError(f"the request body is over {MAX_BODY_BYTES} bytes", 413)
            raw = self.rfile.read(length)
            if path != "/v1/chat/completions":
                raise RequestError(f"no route POST {path}", 404, code="not_found")
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise RequestError(f"the request body is not valid JSON ({exc})") from None
            self._send(200, self.server.backend.complete(body))
        except RequestError as exc:
            self._send(exc.status, exc.body())
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout) before the answer was ready
            log.warning("%s: the client closed the connection before the reply", self.address_string())
        except Exception as exc:  # one failed request must not stop the server
            log.exception("chat completion failed")
            self._send(500, RequestError(f"the model failed: {type(exc).__name__}: {exc}", 500).body())

    def _send(self, status: int, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


def serve(
    model: Any, tokenizer: Any, host: str = "127.0.0.1", port: int = 0, *, name: str = "local"
) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Start serving ``model`` as ``name`` on a daemon thread; stop with ``server.shutdown(); server.server_close()``.
    The base URL is ``base_url(server)``."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.backend = Backend(model, tokenizer, name)  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True, name="judge-server")
    thread.start()
    return server, thread


def base_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/v1"


def load(model: str | None, model_dir: str | None) -> tuple[Any, Any, str]:
    """(model, tokenizer, served name) through harmsweep's own loader, so the same offline files as a run are read."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: a missing checkpoint fails in one line
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if model_dir:
        from harmsweep.models.loading import load_model
        from harmsweep.models.spec import ModelConfig

        name = Path(model_dir).resolve().name
        cache = os.environ.get("HARMSWEEP_CACHE", str(Path.home() / ".cache" / "harmsweep"))
        loaded = load_model(ModelConfig(name=name, path=str(model_dir)), "aligned", cache)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import common

        name = str(model)
        loaded = common.model(name)
    return loaded.model, loaded.tokenizer, name


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default="smollm2_135m", help="a preset of conf/model (its aligned checkpoint)")
    which.add_argument("--model-dir", help="a Hugging Face model folder instead of a preset")
    p.add_argument("--name", help="the model name requests must use (default: the preset or the folder's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from harmsweep.errors import HarmsweepError

    try:
        model, tokenizer, name = load(args.model, args.model_dir)
        server, thread = serve(model.to(args.device), tokenizer, args.host, args.port, name=args.name or name)
    except (HarmsweepError, ValueError, OSError) as exc:
        print(f"judge_server: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving {args.name or name} from {args.model_dir or 'conf/model/' + str(args.model)}", flush=True)
    print(f"listening on {base_url(server)}", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
