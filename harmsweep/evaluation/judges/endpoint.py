"""The endpoint every API judge talks to: its settings (``Endpoint``) and one POST to an OpenAI-compatible
/chat/completions endpoint, with retries.

Only the standard library, so no SDK version decides what gets sent. Rate limits and server errors
are retried with exponential backoff; a wrong URL, model or key (401/403/404) stops the run with one
line, since every later item would fail the same way; anything else gives up on the item (None), to be
counted as unscored by the caller. The API key is read at request time and never logged or raised.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from harmsweep.errors import HarmsweepError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """Where an API judge sends its requests and how it retries: the settings of every endpoint judge."""

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable at request time, never stored
    max_retries: int = 4
    backoff_s: float = 1.0  # the first retry's wait, doubled per retry
    timeout_s: float = 60.0
    max_workers: int = 4  # concurrent requests

    @classmethod
    def of(cls, options: Mapping[str, Any], **defaults: Any) -> Endpoint:
        """The endpoint settings among a judge's options (others are the judge's own); unset ones default."""
        names = {f.name for f in fields(cls)}
        return cls(**{**defaults, **{k: v for k, v in options.items() if k in names and v is not None}})

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def require_key(self, who: str) -> None:
        """Stop before the first request when the key's variable is unset (the key itself is never shown)."""
        if not os.environ.get(self.api_key_env):
            raise HarmsweepError(
                f"{who} reads its API key from ${self.api_key_env}, which is not set; export it "
                "(any non-empty value for a local server without auth) or set judge.api_key_env"
            )

    def check_reachable(self, who: str, timeout_s: float = 5.0) -> None:
        """Stop before any work when nothing listens at the endpoint's host and port (a typo'd URL, a server that is
        down): one TCP connection, no request, so no key or quota is spent."""
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HarmsweepError(f"{who}: base_url={self.base_url} is not an http(s) URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
        except OSError as exc:
            raise HarmsweepError(
                f"{who}: the endpoint {self.base_url} cannot be reached ({type(exc).__name__}: {exc}); "
                "start the server or fix base_url"
            ) from None

    def post(self, body: bytes, who: str) -> dict[str, Any] | None:
        """``choices[0]`` of one request, or None once the retries are spent (see ``post_choice``)."""
        return post_choice(self.url, body, who=who, model=self.model, api_key_env=self.api_key_env,
                           max_retries=self.max_retries, backoff_s=self.backoff_s, timeout_s=self.timeout_s)  # fmt: skip


def post_choice(
    url: str, body: bytes, *, who: str, model: str, api_key_env: str, max_retries: int, backoff_s: float,
    timeout_s: float,
) -> dict[str, Any] | None:  # fmt: skip
    """``choices[0]`` of the response, or None after ``max_retries`` retries."""
    reason = "no attempt"
    for attempt in range(max_retries + 1):
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {os.environ.get(api_key_env, '')}"}
        request = urllib.request.Request(url, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                choice = json.loads(resp.read())["choices"][0]
            if not isinstance(choice, dict):
                raise TypeError
            return choice
        except urllib.error.HTTPError as exc:
            exc.close()
            reason = f"HTTP {exc.code}"
            if exc.code in (401, 403, 404):
                raise HarmsweepError(
                    f"{who} endpoint {url} answered HTTP {exc.code} for model={model}; "
                    f"check base_url, model and the key in ${api_key_env}"
                ) from None
            if exc.code != 429 and exc.code < 500:
                break  # a client error will not go away by retrying
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            reason = type(exc).__name__
        except (ValueError, KeyError, IndexError, TypeError):
            reason = "malformed response body"
            break
        if attempt < max_retries:
            time.sleep(backoff_s * 2**attempt)
    log.warning("%s: giving up on a judge request (%s); it is counted as unscored", who, reason)
    return None
