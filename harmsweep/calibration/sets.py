"""A run's data: seeded prompt-disjoint splits, and the calibration and reference sets built from them.

Sets are cached by content (model fingerprint, template, records, settings), so every run, sweep job
or experiment that asks for the same data reads the same tokenised tensors; the model's answers to
held-out benign prompts are cached on their own, since runs that differ only on the harmful side
share them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from harmsweep.artifacts import write_jsonl
from harmsweep.cache import VERSIONS, cached, content_key, write_key_info
from harmsweep.calibration.pairs import Pair, encode_pairs, file_pairs, generate_responses, load_sets, save_sets
from harmsweep.calibration.spec import CalibrationConfig
from harmsweep.data import load_records, split_disjoint
from harmsweep.data.records import Record, norm_prompt
from harmsweep.data.spec import DataConfig
from harmsweep.generation.sampling import Sampling
from harmsweep.models.loading import LoadedModel


def calibrate(
    cal: CalibrationConfig,
    lm: LoadedModel,
    template: str,
    splits: Splits,
    root: Path,
    *,
    dtype: str,
    benign_references: str,
) -> tuple[dict[str, dict[str, torch.Tensor]], Path, bool]:
    """The calibration and reference sets of ``splits`` (cached by content): sets, cache entry, computed?

    ``dtype`` (the model's) keys the cache; ``benign_references`` (eval.benign_references) says whether the
    held-out benign references are the model's own answers or the dataset's.
    """
    cal_info = {
        "version": VERSIONS["calibration"],
        "model": lm.fingerprint,
        "dtype": dtype,
        "template": template,
        "records": content_key(
            [
                asdict(r)
                for part in (splits.harmful_cal, splits.harmful_eval, splits.benign_cal, splits.benign_eval)
                for r in part
            ]
        ),
        "calibration": {k: v for k, v in asdict(cal).items() if k != "batch_size"},
        "benign_references": benign_references,
    }
    entry = root / "calibration" / content_key(cal_info)
    sets, computed = cached(
        entry,
        lambda e: _calibrate(
            cal, benign_references, dtype, lm, template, splits, e / "calibration.safetensors", cal_info, root
        ),
        lambda e: load_sets(e / "calibration.safetensors"),
        "calibration.safetensors",
    )
    return sets, entry, computed


@dataclass(frozen=True)
class Splits:
    """Calibration and held-out records; the two never share a prompt."""

    harmful_cal: list[Record]
    harmful_eval: list[Record]
    benign_cal: list[Record]
    benign_eval: list[Record]


def held_out_splits(
    cal: CalibrationConfig, data: DataConfig, n_eval: int | None, seed: int, exclude: Collection[str] = frozenset()
) -> Splits:
    """Seeded, prompt-disjoint calibration/evaluation splits of the harmful and benign data.

    ``n_eval`` (eval.n): held-out prompts per side, None for the whole held-out set. ``exclude``: normalised
    prompts to drop first (those a derived model was fine-tuned on).
    """
    n = cal.n
    if cal.harmful.responses == "file":
        harmful = load_records("custom", None, file=cal.harmful.file)
    else:
        ref = data.harmful
        harmful = load_records(ref.name, data.root, file=ref.file, categories=ref.categories, download=data.download)
    if cal.benign.file:
        benign = load_records("custom", None, file=cal.benign.file)
    else:
        benign = load_records(data.benign.name, data.root, file=data.benign.file, download=data.download)
    if exclude:
        harmful = [r for r in harmful if norm_prompt(r.prompt) not in exclude]
        benign = [r for r in benign if norm_prompt(r.prompt) not in exclude]
    splits = Splits(*split_disjoint(harmful, n, n_eval, seed), *split_disjoint(benign, n, n_eval, seed))
    for a, b in ((splits.harmful_cal, splits.harmful_eval), (splits.benign_cal, splits.benign_eval)):
        if {r.prompt for r in a} & {r.prompt for r in b}:
            raise RuntimeError("a held-out prompt is also a calibration prompt")
    return splits


def _calibrate(
    cal: CalibrationConfig,
    benign_references: str,
    dtype: str,
    lm: LoadedModel,
    template: str,
    splits: Splits,
    path: Path,
    info: Mapping[str, Any],
    root: Path,
) -> dict[str, dict[str, torch.Tensor]]:
    """Harmful and benign pairs for scoring, plus the held-out reference responses for harm likelihood."""
    n, harm = cal.n, cal.harmful
    harm_cal, harm_eval, ben_eval = splits.harmful_cal, splits.harmful_eval, splits.benign_eval
    greedy = Sampling(max_new_tokens=harm.max_new_tokens)

    def answers(records: list[Record], prefill_tokens: int, desc: str) -> list[Pair]:
        batch = cal.gen_batch_size
        return generate_responses(
            lm.model,
            lm.tokenizer,
            records,
            template,
            prefill_tokens=prefill_tokens,
            sampling=greedy,
            batch_size=batch,
            desc=desc,
        )

    if harm.responses == "file":
        harm_pairs = file_pairs(harm_cal + harm_eval, "calibration.harmful.file")
    else:
        k = harm.prefill_tokens if harm.responses == "prefill" else 0
        harm_pairs = answers(harm_cal + harm_eval, k, "harmful responses")
    if benign_references == "model":
        ben_eval_pairs = _references(
            cal, dtype, lm, template, ben_eval, root, lambda: answers(ben_eval, 0, "benign references")
        )
    else:
        ben_eval_pairs = file_pairs(ben_eval, "benign evaluation data")
    pairs: dict[str, list[Pair]] = {
        "harmful": harm_pairs[:n],
        "eval_harmful": harm_pairs[n:],
        "benign": file_pairs(splits.benign_cal, "benign calibration data"),
        "eval_benign": ben_eval_pairs,
    }
    max_len = cal.max_length
    sets = {name: encode_pairs(lm.tokenizer, ps, template, max_len) for name, ps in pairs.items()}
    write_key_info(path.parent, info)
    save_sets(sets, pairs, path)
    return sets


def _references(
    cal: CalibrationConfig,
    dtype: str,
    lm: LoadedModel,
    template: str,
    records: list[Record],
    root: Path,
    generate: Callable[[], list[Pair]],
) -> list[Pair]:
    """The model's answers to held-out benign prompts, cached by content: runs (and cross-harm
    categories) whose calibration differs only on the harmful side generate them once."""
    info = {"version": VERSIONS["references"], "model": lm.fingerprint, "dtype": dtype,
            "template": template, "records": content_key([asdict(r) for r in records]),
            "max_new_tokens": cal.harmful.max_new_tokens, "batch_size": cal.gen_batch_size}  # fmt: skip

    def compute(entry: Path) -> list[Pair]:
        pairs = generate()
        write_key_info(entry, info)
        write_jsonl([asdict(p) for p in pairs], entry / "references.jsonl")
        return pairs

    def load(entry: Path) -> list[Pair]:
        return [Pair(**json.loads(line)) for line in (entry / "references.jsonl").read_text().splitlines()]

    pairs, _ = cached(root / "references" / content_key(info), compute, load, "references.jsonl")
    return pairs
