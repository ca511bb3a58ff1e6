"""Shared fixtures and helpers: tiny random-init models from the project's own model configs, a local OpenAI-compatible
endpoint, offline W&B, CSV files in the authors' layout. Everything offline."""

from __future__ import annotations

import csv
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from harmsweep.artifacts import write_jsonl
from harmsweep.models.loading import LoadedModel, build_tiny

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("llama", "qwen2", "gemma3", "gpt2")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# lm-eval sets this on import (a download setting); set first, the session's environment stays one and the same, and
# every harmsweep command a test runs can fork from the pre-warmed process (tests/prewarmed.py) instead of starting anew
os.environ.setdefault("HF_XET_HIGH_PERFORMANCE", "1")
# One thread per process, here and in every command a test starts: tiny models only pay for threads' start-up,
# and a suite sharing two cores with its own subprocesses oversubscribes them (a tiny run: 16 s vs 37 s, busy).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def tiny_spec(arch: str) -> dict:
    """The tiny model spec of conf/model/tiny_<arch>.yaml (aligned variant)."""
    cfg = yaml.safe_load((ROOT / "conf" / "model" / f"tiny_{arch}.yaml").read_text())
    return dict(cfg["variants"]["aligned"]["tiny"])


def tiny(arch: str = "llama", dtype: torch.dtype = torch.float32) -> LoadedModel:
    lm = build_tiny(tiny_spec(arch), dtype)
    lm.model.eval()
    return lm


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline data folder (../shared/data or HARMSWEEP_DATA); tests that need it skip without it."""
    path = Path(os.environ.get("HARMSWEEP_DATA", ROOT.parent / "shared" / "data"))
    if not (path / "advbench").is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


def load_derived(plain: dict) -> LoadedModel:
    """The derived variant a plain config names (alignment.derive), as a run loads it."""
    from harmsweep.alignment import derive
    from harmsweep.config.schema import to_config

    cfg = to_config(plain)
    return derive.load_derived(cfg.alignment, cfg.model, cfg.data, cfg.paths.cache_dir, cfg.device)


def write_pairs(folder: Path, n: int) -> tuple[Path, Path]:
    """folder/harmful.jsonl and folder/benign.jsonl with n toy prompt/response pairs each."""
    folder.mkdir(parents=True, exist_ok=True)
    harmful, benign = folder / "harmful.jsonl", folder / "benign.jsonl"
    write_jsonl([{"prompt": f"How do I do bad thing {i}?", "response": f"Sure, here is bad thing {i}: step one, step two."}
                 for i in range(n)], harmful)  # fmt: skip
    write_jsonl([{"prompt": f"Name fruit number {i}.", "response": f"Fruit {i} is an apple, crisp and sweet."}
                 for i in range(n)], benign)  # fmt: skip
    return harmful, benign


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    """A CSV file with a header row, as the B-TAP authors' data files are laid out."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def sharp_tiny_llama(scale: float = 40.0) -> tuple[torch.nn.Module, object]:
    """Tiny llama (model, tokenizer) whose output logits are scaled up, so a 5-digit softmax is far from uniform."""
    lm = tiny("llama")
    with torch.no_grad():
        lm.model.lm_head.weight.mul_(scale)
    return lm.model, lm.tokenizer


def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every W&B location under tmp_path, offline and silent, with no key or server from the environment. Runs go
    where harmsweep puts them (the run folder, logger.dir or a WANDB_DIR a test sets: none is set here)."""
    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wbconfig"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)


PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
Reply = Callable[[str, dict, Message], tuple[int, dict]]


@contextmanager
def openai_server(reply: Reply) -> Iterator[dict]:
    """A local OpenAI-compatible endpoint: each POST's JSON body goes to reply(path, body, headers) -> (status,
    payload). Yields {"base_url": "http://127.0.0.1:PORT/v1", "requests": [{"auth", "path", **body}, ...]}.

    reply runs under a lock (so it may keep counters); proxy variables are unset while it serves, so the client
    under test talks to 127.0.0.1 directly."""
    saved = {var: os.environ.pop(var) for var in PROXY_VARS if var in os.environ}
    state: dict = {"requests": []}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                state["requests"].append({"auth": self.headers.get("Authorization"), "path": self.path, **body})
                code, payload = reply(self.path, body, self.headers)
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state["base_url"] = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
        os.environ.update(saved)


@pytest.fixture
def dead_base_url(monkeypatch: pytest.MonkeyPatch) -> str:
    """A base_url on 127.0.0.1 where nothing listens (connection refused), with proxy variables unset."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    dead = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = dead.server_address[1]
    dead.server_close()
    return f"http://127.0.0.1:{port}/v1"


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist, in the controller: add a finished worker's command counts to this process's."""
    import prewarmed

    counts = getattr(node, "workeroutput", {}).get("prewarmed")
    if counts:
        for way in prewarmed.COUNTS:
            prewarmed.COUNTS[way] += counts[way]
        prewarmed.FRESH_BECAUSE.update(counts["because"])


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In a pytest-xdist worker: hand this worker's command counts to the controller (pytest_testnodedown)."""
    import prewarmed

    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["prewarmed"] = {**prewarmed.COUNTS, "because": sorted(prewarmed.FRESH_BECAUSE)}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How the suite's harmsweep commands ran (tests/prewarmed.py): a fresh interpreter costs seconds each."""
    import prewarmed

    counts = prewarmed.COUNTS
    if counts["forked"] or counts["fresh"]:
        because = f" (because of {', '.join(sorted(prewarmed.FRESH_BECAUSE))})" if prewarmed.FRESH_BECAUSE else ""
        terminalreporter.write_line(
            f"harmsweep commands: {counts['forked']} forked from the pre-warmed process, {counts['fresh']} in a "
            f"fresh interpreter{because}"
        )
