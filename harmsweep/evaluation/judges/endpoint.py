"""One POST to an OpenAI-compatible /chat/completions endpoint, with retries, for every API judge.

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
import time
import urllib.error
import urllib.request
from typing import Any

from harmsweep.errors import HarmsweepError

log = logging.getLogger(__name__)


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
