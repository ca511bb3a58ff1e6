"""The one record type every dataset loader returns.

A single flat type keeps the rest of the pipeline (calibration, generation, judging) independent of where a prompt came
from; `source_id` lets results be traced back to the exact row of the original file.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Record:
    """One prompt, optionally with a reference response, a category and an affirmative target.

    Frozen so records can be shared between splits and used as dict keys without defensive copies.
    """

    prompt: str
    response: str | None = None
    category: str | None = None
    source_id: str = ""  # "<dataset>:<row index or id>", stable across runs
    target: str | None = None  # affirmative prefix such as AdvBench's "Sure, here is ..." (prefilling attacks)


def norm_prompt(prompt: str) -> str:
    """A prompt as compared across datasets: case and whitespace do not make two prompts different."""
    return " ".join(prompt.casefold().split())
