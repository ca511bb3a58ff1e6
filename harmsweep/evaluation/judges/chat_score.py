"""The endpoint judges that ask a chat model for a score per answer (explanation, coherence, Alpaca usefulness): one
request per item through ``Endpoint`` (retries with backoff), the reply read by the judge's own parser; a failed
request or an unreadable reply is None (unscored, never a low score), counted in ``n_failed`` / ``n_unparsed``."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from harmsweep.evaluation.judges.base import check_pairs
from harmsweep.evaluation.judges.endpoint import Endpoint

log = logging.getLogger(__name__)


class ChatScoreJudge:
    """One chat completion per (prompt, answer), a thread pool of ``endpoint.max_workers``; retries as every
    endpoint judge does (``Endpoint.post``). Subclasses give the name, the prompt (``template`` with the fields
    ``prompt_field`` and ``response``), the reading of the reply and what an unreadable one lacks."""

    name = "chat_score"
    system = ""
    template = ""
    prompt_field = "request"
    parse: Callable[[str], float | None] = staticmethod(lambda text: None)
    unparsed = "no valid score"
    default_temperature: float | None = 0.3  # None: the version does not name it (a judge asked at 0 only)

    def __init__(
        self, endpoint: Endpoint | None = None, temperature: float | None = None, max_tokens: int = 200
    ) -> None:
        self.endpoint = endpoint or Endpoint()
        self.endpoint.require_key(f"the {self.name} judge")
        temperature = self.default_temperature if temperature is None else temperature
        self.model, self.temperature, self.max_tokens = self.endpoint.model, float(temperature or 0), int(max_tokens)
        self.max_workers = max(1, self.endpoint.max_workers)
        digest = hashlib.sha256((self.system + "\0" + self.template).encode()).hexdigest()[:12]
        self.version = f"{self.name}/prompt-{digest}+{self.model}" + (
            f"+t{self.temperature:g}" if self.default_temperature is not None else ""
        )
        self.n_failed = 0  # items given up on after retries
        self.n_unparsed = 0  # replies without a valid score
        self._lock = threading.Lock()

    def render(self, prompt: str, response: str) -> str:
        return self.template.format(**{self.prompt_field: prompt, "response": response})

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float | None]:
        """Scores in the order of the items (None: unscored)."""
        check_pairs(prompts, responses)
        unparsed_before = self.n_unparsed
        with ThreadPoolExecutor(self.max_workers) as pool:
            scores = list(pool.map(self._judge_one, prompts, responses))
        if self.n_unparsed > unparsed_before:
            log.warning("%s: %d of %d %s and are unscored", self.name, self.n_unparsed - unparsed_before,
                        len(scores), f"answers had {self.unparsed}")  # fmt: skip
        return scores

    def _judge_one(self, prompt: str, response: str) -> float | None:
        messages = [{"role": "system", "content": self.system},
                    {"role": "user", "content": self.render(prompt, response)}]  # fmt: skip
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}  # fmt: skip
        choice = self.endpoint.post(json.dumps(body).encode(), f"{self.name} judge")
        if choice is None:
            with self._lock:
                self.n_failed += 1
            return None
        parsed = self.parse(str((choice.get("message") or {}).get("content") or ""))
        if parsed is None:
            with self._lock:
                self.n_unparsed += 1
        return parsed
