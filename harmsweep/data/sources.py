"""Where every dataset lives: its file under the data root and its pinned source on the Hugging Face hub.

One registry for both keeps the "missing dataset" message, the hub loader and the configs in agreement. Revisions are
pinned so a sweep run today and one run next year read the same rows; pins marked `verified=False` could not be
checked against the hub when they were written (no network) and must be confirmed before a paper run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from harmsweep.errors import DataError


@dataclass(frozen=True)
class HubSource:
    """A dataset as published on the Hugging Face hub, read with `datasets`.

    kind "repo": `datasets.load_dataset(repo, config, revision=..., split=...)` for each config (concatenated);
    kind "files": the named repo files are fetched at `revision` into the HF hub cache and read like local files
    (for repos `datasets` cannot load directly: script datasets, header-less gated CSVs).
    `columns` renames hub columns to the local file's column names, so one parser serves both.
    """

    repo: str
    revision: str
    kind: str = "repo"
    split: str = "train"
    configs: tuple[str | None, ...] = (None,)
    files: tuple[str, ...] = ()
    columns: dict[str, str] = field(default_factory=dict)
    verified: bool = False
    gated: bool = False
    note: str = ""

    @property
    def ref(self) -> str:
        """`repo@revision`, as shown in messages and logs."""
        return f"{self.repo}@{self.revision}"


# name -> candidate paths under the data root; the first that exists is used.
DEFAULT_PATHS: dict[str, tuple[str, ...]] = {
    "advbench": ("advbench/harmful_behaviors.csv",),
    "strongreject": ("strongreject/strongreject_dataset.csv",),
    "strongreject_small": ("strongreject/strongreject_small_dataset.csv",),
    "harmbench": ("harmbench/harmbench_behaviors_text_test.csv",),
    "hexphi": ("hexphi",),
    "alpaca": ("alpaca/alpaca_data_1k.json", "alpaca/alpaca_data.json"),
    "alpaca_eval": ("alpaca/alpaca_eval.jsonl", "alpaca/alpaca_eval.json"),
    "wei2024_refusals": ("wei2024/SFT_aligned_llama2-7b-chat-hf_train_short.csv",),
    "custom": (),
}
DATASETS: tuple[str, ...] = tuple(DEFAULT_PATHS)

# None of these revisions could be checked against the hub here (no network). The two full shas are the ones that
# independent public projects pin for the same repo; "main" means no sha was found: UNPINNED, replace before relying on it.
HUB_SOURCES: dict[str, HubSource] = {
    "advbench": HubSource(
        "walledai/AdvBench",
        "9d4730540082fa4017450b65ca1c0e1d8d30446e",  # UNVERIFIED: sha pinned by a third-party project
        columns={"prompt": "goal", "target": "target"},
    ),
    "strongreject": HubSource(
        "walledai/StrongREJECT",
        "main",  # UNPINNED: no commit sha found offline
        columns={"prompt": "forbidden_prompt", "category": "category", "source": "source"},
    ),
    "harmbench": HubSource(
        "walledai/HarmBench",
        "main",  # UNPINNED: no commit sha found offline
        configs=("standard", "contextual", "copyright"),
        columns={"prompt": "Behavior", "category": "SemanticCategory", "context": "ContextString"},
        note="the hub copy is text_all (400 rows, the 80 validation behaviours included), not the 320-row test split",
    ),
    "hexphi": HubSource(
        "LLM-Tuning-Safety/HEx-PHI",
        "main",  # UNPINNED: gated, no commit sha found offline
        kind="files",
        files=tuple(f"category_{n}.csv" for n in range(1, 12)),
        gated=True,
    ),
    "alpaca": HubSource(
        "tatsu-lab/alpaca",
        "dce01c9b08f87459cf36a430d809084718273017",  # UNVERIFIED: sha pinned by several third-party projects
    ),
    "alpaca_eval": HubSource(
        "tatsu-lab/alpaca_eval",
        "main",  # UNPINNED: no commit sha found offline
        kind="files",  # a script dataset, which datasets 5 no longer runs: read its JSON file instead
        files=("alpaca_eval.json",),
    ),
}
# Datasets only published as files on GitHub (no hub copy): they load from local files only.
FILE_ONLY: dict[str, str] = {
    "strongreject_small": "github alexandrasouly/strongreject strongreject_dataset/strongreject_small_dataset.csv",
    "wei2024_refusals": "github boyiwei/alignment-attribution-code data/SFT_aligned_llama2-7b-chat-hf_train_short.csv",
}

# HEx-PHI category number -> (slug used as Record.category, published name).
HEXPHI_CATEGORIES: dict[int, tuple[str, str]] = {
    1: ("illegal_activity", "Illegal Activity"),
    2: ("child_abuse_content", "Child Abuse Content"),
    3: ("hate_harass_violence", "Hate/Harass/Violence"),
    4: ("malware", "Malware"),
    5: ("physical_harm", "Physical Harm"),
    6: ("economic_harm", "Economic Harm"),
    7: ("fraud_deception", "Fraud/Deception"),
    8: ("adult_content", "Adult Content"),
    9: ("political_campaigning", "Political Campaigning"),
    10: ("privacy_violation_activity", "Privacy Violation Activity"),
    11: ("tailored_financial_advice", "Tailored Financial Advice"),
}

# How to get the gated HEx-PHI data; shown when it is missing or cannot be fetched.
HEXPHI_HOWTO = (
    "HEx-PHI is gated and not redistributable: obtain it under its license from "
    f"https://huggingface.co/datasets/{HUB_SOURCES['hexphi'].repo} and point the dataset's file setting "
    "(data.harmful.file=DIR) at the folder holding category_1.csv ... category_11.csv, or accept the license, "
    "log in (`hf auth login` or HF_TOKEN) and set data.download=true"
)

# The safety-related Alpaca items (Qi et al. 2023) removed from Alpaca to get a utility set without refusals. Only on
# GitHub, pinned to a commit because the file is a fixed artifact of that paper; read with datasets' json builder.
ALPACA_SAFETY_SOURCE = (
    "https://raw.githubusercontent.com/LLM-Tuning-Safety/LLMs-Finetuning-Safety/"
    "2be2fa01775fdf8bfc786d69fc0d358f0b3df513/llama2/ft_datasets/alpaca_dataset/alpaca_data_safety_only.json"
)


def data_error(path: str | Path | None, message: str) -> DataError:
    """Build a DataError of one line that starts with the offending path (the CLI prints it as one line)."""
    text = f"{path}: {message}" if path is not None else message
    return DataError(re.sub(r"\s*[\r\n]+\s*", " ", text).strip())


def where_to_get(name: str) -> str:
    """The published source of `name`, for "not found" messages."""
    if name in HUB_SOURCES:
        return f"the hub ({HUB_SOURCES[name].ref}, with data.download=true)"
    return FILE_ONLY.get(name, "its publisher")
