"""The inputs of experiment=orgad2026_em (btap_reference.md sections 2.4, 2.5 and 11): the domain's train/held-out
split, the prune rows (their EM loader: always a seeded permutation prefix), the answers file in their layout, and the
content keys that let every cell of a p x q grid share one EM model, one answer set and one EM-model evaluation.

No model here: ``check`` reads all of this before the model loads.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harmsweep.artifacts import atomic_path
from harmsweep.calibration.pairs import Pair
from harmsweep.config.schema import EMConfig
from harmsweep.errors import DataError, HarmsweepError
from harmsweep.experiments.em import message_pairs

VERSION = "orgad2026-em-v1"  # bump when stage 1, stage 2 or the EM-model evaluation changes its output
ANSWER_COLUMNS = ("clean_prompt", "clean_response")  # their selfgen prune files' raw columns


@dataclass(frozen=True)
class DomainSplit:
    """A domain's training pairs (stages 1 and 4) and held-out pairs (the prompts the EM model answers, stage 2)."""

    domain: str
    train: list[Pair]
    held_out: list[Pair]
    source: str  # "remove1000": their {domain}_remove1000.jsonl is the training set | "seeded": split here
    files: dict[str, str]  # file name -> sha256 of every file the split read

    def key(self, seed: int) -> dict[str, Any]:
        """What the split depends on (a seeded split also on the seed and its size)."""
        out: dict[str, Any] = {"domain": self.domain, "source": self.source, "files": dict(self.files)}
        if self.source == "seeded":
            out.update(seed=seed, held_out=len(self.held_out))
        return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def domain_files(em: EMConfig) -> tuple[Path, Path]:
    """({data_dir}/{domain}.jsonl, {data_dir}/{domain}_remove1000.jsonl): the full set and their training set."""
    if not em.domain:
        raise HarmsweepError(
            "experiment=orgad2026_em needs em.domain (risky_financial_advice, bad_medical_advice, ...)"
        )
    if not em.data_dir:
        raise HarmsweepError(
            "experiment=orgad2026_em needs em.data_dir (or $HARMSWEEP_EM_DATA): the folder with {domain}.jsonl"
        )
    root = Path(em.data_dir).expanduser()
    return root / f"{em.domain}.jsonl", root / f"{em.domain}_remove1000.jsonl"


def split_rows(total: int, held_out: int, seed: int) -> tuple[list[int], list[int]]:
    """(held-out rows, training rows), both in file order: held-out = the first ``held_out`` entries of
    ``numpy.random.default_rng(seed).permutation(total)``, training = the rest."""
    order = np.random.default_rng(seed).permutation(total)
    return sorted(int(i) for i in order[:held_out]), sorted(int(i) for i in order[held_out:])


def domain_split(em: EMConfig, seed: int) -> DomainSplit:
    """Their split when {domain}_remove1000.jsonl exists (held-out = the full file's rows whose prompt it lacks),
    else a seeded one (``split_rows`` with em.held_out); a split leaving either side empty is a DataError."""
    full_path, train_path = domain_files(em)
    full = message_pairs(full_path)
    files = {full_path.name: sha256(full_path)}
    if train_path.is_file():
        train = message_pairs(train_path)
        files[train_path.name] = sha256(train_path)
        trained = {p.prompt for p in train}
        held = [p for p in full if p.prompt not in trained]
        if not held:
            raise DataError(f"{train_path} holds every prompt of {full_path}: nothing is left to hold out")
        return DomainSplit(str(em.domain), train, held, "remove1000", files)
    if em.held_out < 1 or len(full) < em.held_out + 1:
        raise DataError(
            f"{full_path} has {len(full)} conversations; em.held_out={em.held_out} needs at least {em.held_out + 1} "
            "(one left to train on): lower em.held_out or add {domain}_remove1000.jsonl"
        )
    held_rows, train_rows = split_rows(len(full), em.held_out, seed)
    return DomainSplit(str(em.domain), [full[i] for i in train_rows], [full[i] for i in held_rows], "seeded", files)


def prune_rows(total: int, n: int, seed: int) -> list[int]:
    """Their EM loader's rows: ALWAYS shuffled (even when n >= total), then the first min(n, total) of
    ``numpy.random.default_rng(seed).permutation(total)`` (section 2.4)."""
    return [int(i) for i in np.random.default_rng(seed).permutation(total)[: min(n, total)]]


def write_answers(pairs: Sequence[Pair], path: Path) -> None:
    """The EM model's answers as their selfgen CSV: clean_prompt, clean_response (written atomically)."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(ANSWER_COLUMNS)
        writer.writerows([p.prompt, p.response] for p in pairs)


def read_answers(path: Path) -> list[Pair]:
    """``write_answers``' file back, strings exactly as written (the csv module, not pandas: an answer "NA" stays)."""
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [Pair(r["clean_prompt"], r["clean_response"], f"{path.stem}:{i}") for i, r in enumerate(rows)]


def answer_key(em: EMConfig, seed: int) -> dict[str, Any]:
    """What stage 2's answers depend on besides the EM model."""
    return {"answer_tokens": em.answer_tokens, "temperature": em.temperature, "top_p": em.top_p, "top_k": None,
            "seed": seed, "sampler": "per-prompt"}  # fmt: skip


def eval_key(em: EMConfig, questions_file: Path, seed: int, judges: Mapping[str, str | None]) -> dict[str, Any]:
    """What the EM-model evaluation depends on besides the EM model: questions, sampling, thresholds, judges."""
    return {
        "questions": sha256(questions_file), "question_ids": list(em.question_ids or []),
        "samples_per_question": em.samples_per_question, "max_new_tokens": em.max_new_tokens,
        "temperature": em.temperature, "top_p": em.top_p, "aligned_below": em.aligned_below,
        "coherent_above": em.coherent_above, "in_domain": em.in_domain, "domain": em.domain, "seed": seed,
        "judges": dict(judges),
    }  # fmt: skip
