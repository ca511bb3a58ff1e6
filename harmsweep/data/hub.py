"""Where each dataset was originally published, and the opt-in download of it.

Experiments usually run offline, so nothing here is called unless the user asks for `download=True`. Downloads are
written to a temporary file next to the destination and moved into place with `os.replace`, so an interrupted
download never leaves a truncated file that a later offline run would silently parse.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import BinaryIO

from harmsweep.errors import DataError

_RAW = "https://raw.githubusercontent.com"
_SR = f"{_RAW}/alexandrasouly/strongreject/main/strongreject_dataset"

HEXPHI_REPO = "LLM-Tuning-Safety/HEx-PHI"

# name -> URL of the original published file (for users with internet).
HUB_SOURCES: dict[str, str] = {
    "advbench": f"{_RAW}/llm-attacks/llm-attacks/main/data/advbench/harmful_behaviors.csv",
    "strongreject": f"{_SR}/strongreject_dataset.csv",
    "strongreject_small": f"{_SR}/strongreject_small_dataset.csv",
    # The test split, not `_text_all.csv`: the default local file is the test split, and `_all` also holds the
    # validation behaviors, which must not leak into evaluation.
    "harmbench": f"{_RAW}/centerforaisafety/HarmBench/main/data/behavior_datasets/harmbench_behaviors_text_test.csv",
    "hexphi": f"https://huggingface.co/datasets/{HEXPHI_REPO}",
    "alpaca": f"{_RAW}/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
    "alpaca_eval": "https://huggingface.co/datasets/tatsu-lab/alpaca_eval/resolve/main/alpaca_eval.json",
    "wei2024_refusals": (
        f"{_RAW}/boyiwei/alignment-attribution-code/main/data/SFT_aligned_llama2-7b-chat-hf_train_short.csv"
    ),
}

# How to get the gated HEx-PHI data; shown when it is missing or cannot be downloaded.
HEXPHI_HOWTO = (
    "HEx-PHI is gated and not redistributable: obtain it under its license from "
    f"{HUB_SOURCES['hexphi']} and point the dataset's file setting (data.harmful.file=DIR) at the folder holding "
    "category_1.csv ... category_11.csv, or accept the license, log in (`huggingface-cli login` or HF_TOKEN) "
    "and set download=true"
)

# The safety-related Alpaca items (Qi et al. 2023) that are removed from Alpaca to get a utility set without refusals.
# Pinned to a commit because the file is a fixed artifact of that paper.
ALPACA_SAFETY_SOURCE = (
    f"{_RAW}/LLM-Tuning-Safety/LLMs-Finetuning-Safety/2be2fa01775fdf8bfc786d69fc0d358f0b3df513/"
    "llama2/ft_datasets/alpaca_dataset/alpaca_data_safety_only.json"
)


def data_error(path: str | Path | None, message: str) -> DataError:
    """Build a DataError of one line that starts with the offending path (the CLI prints it as one line)."""
    text = f"{path}: {message}" if path is not None else message
    return DataError(re.sub(r"\s*[\r\n]+\s*", " ", text).strip())


def _write_atomic(dest: Path, source: BinaryIO) -> None:
    """Copy a byte stream to `dest` through a temporary file in the same folder, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def download_url(url: str, dest: Path, *, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` atomically; any network or file problem becomes a one-line DataError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            _write_atomic(dest, response)
    except OSError as exc:  # URLError and HTTPError are OSErrors
        reason = getattr(exc, "reason", None) or exc
        message = f"download from {url} failed ({reason}); fetch the file by hand and put it here"
        raise data_error(dest, message) from exc
    return dest


def download_hexphi(dest_dir: Path) -> Path:
    """Fetch HEx-PHI's category_N.csv files from the gated Hugging Face dataset into `dest_dir`.

    Needs the license accepted on the dataset page and a token (`huggingface-cli login` or HF_TOKEN). Missing
    category files are skipped because category_2 was removed upstream.
    """
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as exc:
        raise data_error(dest_dir, f"downloading HEx-PHI needs the huggingface_hub package; {HEXPHI_HOWTO}") from exc
    fetched = 0
    for number in range(1, 12):
        filename = f"category_{number}.csv"
        try:
            cached = hf_hub_download(HEXPHI_REPO, filename, repo_type="dataset")
        except EntryNotFoundError:
            continue
        except Exception as exc:  # gated, offline, auth, HTTP: all mean the same to the user
            message = f"could not download HEx-PHI {filename} ({type(exc).__name__}); {HEXPHI_HOWTO}"
            raise data_error(dest_dir, message) from exc
        with open(cached, "rb") as source:
            _write_atomic(dest_dir / filename, source)
        fetched += 1
    if not fetched:
        raise data_error(dest_dir, f"HEx-PHI download found no category_N.csv files in {HEXPHI_REPO}; {HEXPHI_HOWTO}")
    return dest_dir


def fetch_dataset(name: str, dest: Path) -> Path:
    """Download dataset `name` from its published source to `dest` (a folder for hexphi, else a file)."""
    if name == "hexphi":
        return download_hexphi(dest)
    if name not in HUB_SOURCES:
        raise data_error(dest, f"dataset {name!r} has no published source to download; provide the file yourself")
    return download_url(HUB_SOURCES[name], dest)
