"""A run's data: seeded prompt-disjoint splits, and the calibration and reference sets built from them.

Sets are cached by content (model fingerprint, template, records, settings), so every run, sweep job
or experiment that asks for the same data reads the same tokenised tensors; the model's answers to
held-out benign prompts are cached on their own, since runs that differ only on the harmful side
share them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from harmsweep.artifacts import write_jsonl
from harmsweep.cache import VERSIONS, cached, content_key, write_key_info
from harmsweep.calibration.pairs import (
    Pair,
    encode_btap,
    encode_pairs,
    file_pairs,
    generate_responses,
    load_sets,
    save_sets,
)
from harmsweep.calibration.spec import FORMATS, LATER_DEFAULTS, ROWS, CalibrationConfig
from harmsweep.data import load_records, split_disjoint, split_indices
from harmsweep.data.btap import btap_files, btap_rows, read_pairs
from harmsweep.data.records import Record, norm_prompt
from harmsweep.data.spec import DataConfig, DatasetRef
from harmsweep.errors import HarmsweepError
from harmsweep.generation.sampling import Sampling
from harmsweep.models.loading import LoadedModel

log = logging.getLogger(__name__)
# Where the pairs come from, not what they hold: the records' content keys the cache (a moved folder shares it).
NOT_IN_CACHE_KEY = ("batch_size", "btap_data", "prune_data", "preserve_data")


def calibrate(
    cal: CalibrationConfig,
    lm: LoadedModel,
    template: str,
    splits: Splits,
    root: Path,
    *,
    dtype: str,
    benign_references: str,
    references: bool = True,
) -> tuple[dict[str, dict[str, torch.Tensor]], Path, bool]:
    """The calibration and reference sets of ``splits`` (cached by content): sets, cache entry, computed?

    ``dtype`` (the model's) keys the cache; ``benign_references`` (eval.benign_references) says whether the
    held-out benign references are the model's own answers or the dataset's; ``references=False``: none are made
    (no metric reads them: the held-out reference sets are empty, and no held-out prompt is answered here).
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
        "calibration": cache_settings(cal),
        "benign_references": benign_references,
        **({} if references else {"references": False}),
    }
    entry = root / "calibration" / content_key(cal_info)
    sets, computed = cached(
        entry,
        lambda e: _calibrate(
            cal,
            benign_references,
            dtype,
            lm,
            template,
            splits,
            e / "calibration.safetensors",
            cal_info,
            root,
            references,
        ),
        lambda e: load_sets(e / "calibration.safetensors"),
        "calibration.safetensors",
    )
    return sets, entry, computed


def cache_settings(cal: CalibrationConfig) -> dict[str, Any]:
    """The calibration settings that key the cache: not where the files are, and settings added later only when
    they differ from their defaults (so entries made before them stay found)."""
    later = LATER_DEFAULTS
    return {k: v for k, v in asdict(cal).items() if k not in NOT_IN_CACHE_KEY and not (k in later and v == later[k])}


@dataclass(frozen=True)
class Splits:
    """Calibration and held-out records; the two never share a prompt.

    ``source`` says where each part comes from (result.json's ``calibration_source``); ``answer_harmful_cal`` /
    ``answer_harmful_eval``: whether the model answers those harmful prompts (else the records' responses are used).
    """

    harmful_cal: list[Record]
    harmful_eval: list[Record]
    benign_cal: list[Record]
    benign_eval: list[Record]
    source: dict[str, Any] = field(default_factory=dict)
    answer_harmful_cal: bool = True
    answer_harmful_eval: bool = True
    benign_as: str = "benign"  # format=btap: the benign set's tokenisation (harmful: their align-file branch)


@dataclass(frozen=True)
class _Source:
    """One side's calibration records and where they come from."""

    records: list[Record]
    label: str  # "file PATH" or "data.harmful: advbench"
    responses: bool  # the records carry the responses to score (a file, the benign dataset)
    layout: bool = False  # a file in the authors' layout: its rows are used as they are
    align: bool = True  # such a file read like an align file (clean_* columns, tokenised like harmful pairs)


def held_out_splits(
    cal: CalibrationConfig,
    data: DataConfig,
    n_eval: int | None,
    seed: int,
    exclude: Collection[str] = frozenset(),
    basename: str | None = None,
    fixed_eval: bool = False,
) -> Splits:
    """Calibration/evaluation splits of the harmful and benign data that share no prompt.

    ``n_eval`` (eval.n): held-out prompts per side, None for the whole held-out set. ``exclude``: normalised
    prompts to drop first (those a derived model was fine-tuned on; files in the authors' layout keep every row
    and lose them from the held-out side only). ``basename``: the model's name in the authors' file names
    (calibration.btap_data). ``fixed_eval``: the harmful evaluation prompts come from a file (eval.harmful_file,
    ``with_eval_prompts``), so with rows=btap none are held out here. Rows: calibration.rows=split, a seeded split; rows=btap, the authors' choice
    (``btap_rows``), evaluated on the rest of the permutation, or, when a file is used whole, on data.harmful
    (data.benign) minus the calibration prompts.
    """
    for key, value, choices in (("rows", cal.rows, ROWS), ("format", cal.format, FORMATS)):
        if value not in choices:
            raise HarmsweepError(f"calibration.{key}={value} is not one of {', '.join(choices)}")
    n_benign = cal.n if cal.n_benign is None else cal.n_benign
    files = btap_files(cal.btap_data, cal.prune_data, cal.preserve_data, basename or "") if cal.btap_data else {}
    if files and not basename:
        raise HarmsweepError("calibration.btap_data names files by the model's basename, and none was given")
    harmful, benign = _harmful_source(cal, data, files), _benign_source(cal, data, files)
    if cal.rows == "btap":
        if fixed_eval:  # their validation file replaces the held-out side: data.harmful is never read for it
            h_cal = _btap_split(harmful, cal.n, 0, seed, exclude, data, "harmful", fixed=True)[0]
            h_eval, h_from, h_own = [], "eval.harmful_file", True
        else:
            h_cal, h_eval, h_from, h_own = _btap_split(harmful, cal.n, n_eval, seed, exclude, data, "harmful")
        b_cal, b_eval, b_from, _ = _btap_split(benign, n_benign, n_eval, seed, exclude, data, "benign")
    else:
        h_cal, h_eval = split_disjoint(_without(harmful.records, exclude), cal.n, n_eval, seed)
        b_cal, b_eval = split_disjoint(_without(benign.records, exclude), n_benign, n_eval, seed)
        h_from, b_from, h_own = f"split of {harmful.label}", f"split of {benign.label}", True
    for a, b in ((h_cal, h_eval), (b_cal, b_eval)):
        if {r.prompt for r in a} & {r.prompt for r in b}:
            raise RuntimeError("a held-out prompt is also a calibration prompt")
    answer_cal = not harmful.responses
    answer_eval = answer_cal or not h_own
    answered = _answered(cal)
    source: dict[str, Any] = {
        "harmful": answered if answer_cal else harmful.label,
        **({"harmful_prompts": harmful.label} if answer_cal else {}),
        "benign": benign.label,
        "eval_harmful": h_from + (f"; responses {answered}" if answer_eval else "; responses from the file"),
        "eval_benign": b_from,
        "format": cal.format,
        **({"separator": cal.separator} if cal.format == "btap" else {}),
        "rows": cal.rows,
        "n": cal.n,
        "n_benign": n_benign,
    }
    benign_as = "harmful" if benign.align else "benign"
    if cal.format == "btap":
        alpaca = "tok(prompt) ++ tok('\\n' + response)"  # their Alpaca branch; an align file: the harmful one's
        source["benign_tokens"] = "tok(prompt + separator) ++ tok(response)" if benign.align else alpaca
    return Splits(h_cal, h_eval, b_cal, b_eval, source, answer_cal, answer_eval, benign_as)


def with_eval_prompts(splits: Splits, records: list[Record], n_eval: int | None, label: str) -> Splits:
    """``splits`` with fixed evaluation prompts (eval.harmful_file: the authors' validation file) in place of the
    held-out harmful split: every row in file order (the first ``n_eval``), minus any prompt calibration scores (their
    validation files share none; a file that does loses those rows, logged). Rows with responses keep them as the
    likelihood references; otherwise the model answers them, as for held-out prompts."""
    taken = {norm_prompt(r.prompt) for r in splits.harmful_cal}
    kept = [r for r in records if norm_prompt(r.prompt) not in taken]
    if len(kept) < len(records):
        log.warning("%s: %d evaluation prompts are calibration prompts and are left out", label,
                    len(records) - len(kept))  # fmt: skip
    kept = kept if n_eval is None else kept[:n_eval]
    if not kept:
        raise HarmsweepError(f"{label}: no evaluation prompt is left (every row is a calibration prompt)")
    answer = any(not r.response for r in kept)
    how = "; responses generated" if answer else "; responses from the file"
    source = {**splits.source, "eval_harmful": f"file {label} ({len(kept)} prompts){how}"}
    return replace(splits, harmful_eval=kept, source=source, answer_harmful_eval=answer)


def _answered(cal: CalibrationConfig) -> str:
    """How the model answers harmful prompts that come without responses."""
    if cal.harmful.responses == "prefill":
        return f"generated: prefill, {cal.harmful.prefill_tokens} tokens"
    return "generated: on_policy"


def _dataset(ref: DatasetRef, data: DataConfig) -> list[Record]:
    return load_records(ref.name, data.root, file=ref.file, categories=ref.categories, download=data.download,
                        minus_category=ref.minus_category)  # fmt: skip


def _file(path: Path | str, authors: bool, align: bool) -> _Source:
    """A pair file: in the authors' layout (read as is), or harmsweep's custom format (cleaned like a dataset)."""
    path = Path(path).expanduser()
    records = read_pairs(path, align) if authors else load_records("custom", None, file=path)
    return _Source(records, f"file {path}", True, authors, align)


def _harmful_source(cal: CalibrationConfig, data: DataConfig, files: Mapping[str, tuple[Path, str, bool]]) -> _Source:
    if files:
        return _file(files["harmful"][0], True, True)
    if cal.harmful.responses == "file":
        return _file(str(cal.harmful.file), cal.format == "btap", True)
    return _Source(_dataset(data.harmful, data), f"data.harmful: {data.harmful.name}", False)


def _benign_source(cal: CalibrationConfig, data: DataConfig, files: Mapping[str, tuple[Path, str, bool]]) -> _Source:
    if files:
        path, _, align = files["benign"]
        return _file(path, True, align)
    if cal.benign.file:  # read like their Alpaca file: prompt/response
        return _file(cal.benign.file, cal.format == "btap", False)
    return _Source(_dataset(data.benign, data), f"data.benign: {data.benign.name}", True, align=False)


def _without(records: list[Record], exclude: Collection[str]) -> list[Record]:
    return [r for r in records if norm_prompt(r.prompt) not in exclude] if exclude else records


def _btap_split(
    source: _Source,
    n: int,
    n_eval: int | None,
    seed: int,
    exclude: Collection[str],
    data: DataConfig,
    side: str,
    fixed: bool = False,
) -> tuple[list[Record], list[Record], str, bool]:
    """The authors' rows of one side, its held-out records (up to n_eval), where those come from, and whether they
    are rows of the source itself (so they carry the source's responses)."""
    records = source.records if source.layout else _without(source.records, exclude)
    used, rest = btap_rows(len(records), n, seed)
    cal = [records[i] for i in used]
    if fixed:  # the held-out side comes from elsewhere (eval.harmful_file)
        return cal, [], "", True
    if rest:
        candidates, origin, own = [records[i] for i in rest], f"rest of the permutation of {source.label}", True
    else:
        ref = data.harmful if side == "harmful" else data.benign
        pool = _dataset(ref, data)
        order = split_indices([r.prompt for r in pool], 0, None, seed)[1]  # seeded, like harmsweep's held-out split
        candidates, own = [pool[i] for i in order], False
        origin = f"data.{side}: {ref.name} minus the calibration prompts"
    taken = {norm_prompt(r.prompt) for r in cal} | set(exclude)
    held = [r for r in candidates if norm_prompt(r.prompt) not in taken]
    held = held if n_eval is None else held[:n_eval]
    if not held:
        raise HarmsweepError(
            f"calibration.rows=btap: no {side} prompt is left for evaluation ({origin}; calibration uses "
            f"{len(cal)} of {len(records)} rows of {source.label}): lower the calibration count or use other data.{side}"
        )
    if n_eval is not None and len(held) < n_eval:
        log.warning("only %d %s prompts are held out for evaluation (eval.n=%d): %s", len(held), side, n_eval, origin)
    return cal, held, origin, own


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
    references: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Harmful and benign pairs for scoring, plus the held-out reference responses for harm likelihood."""
    harm = cal.harmful
    harm_cal, harm_eval, ben_eval = splits.harmful_cal, splits.harmful_eval, splits.benign_eval
    if not references:
        harm_eval, ben_eval = [], []
        splits = replace(splits, answer_harmful_eval=False)
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

    # the prompts the model answers, in one call (calibration first): the file's responses for the rest
    k = harm.prefill_tokens if harm.responses == "prefill" else 0
    asked = (harm_cal if splits.answer_harmful_cal else []) + (harm_eval if splits.answer_harmful_eval else [])
    generated = answers(asked, k, "harmful responses") if asked else []
    if splits.answer_harmful_cal:
        cal_pairs, generated = generated[: len(harm_cal)], generated[len(harm_cal) :]
    else:
        cal_pairs = file_pairs(harm_cal, "calibration harmful data")
    eval_pairs = generated if splits.answer_harmful_eval else file_pairs(harm_eval, "evaluation harmful data")
    if benign_references == "model" and ben_eval:
        ben_eval_pairs = _references(
            cal, dtype, lm, template, ben_eval, root, lambda: answers(ben_eval, 0, "benign references")
        )
    else:
        ben_eval_pairs = file_pairs(ben_eval, "benign evaluation data")
    pairs: dict[str, list[Pair]] = {
        "harmful": cal_pairs,
        "eval_harmful": eval_pairs,
        "benign": file_pairs(splits.benign_cal, "benign calibration data"),
        "eval_benign": ben_eval_pairs,
    }
    max_len, tok = cal.max_length, lm.tokenizer
    sets = {  # format=btap: the scoring sets only; the held-out references stay in the run's template
        name: encode_btap(tok, ps, splits.benign_as if name == "benign" else name, cal.separator, max_len)
        if cal.format == "btap" and name in ("harmful", "benign")
        else encode_pairs(tok, ps, template, max_len)
        if ps
        else _empty()
        for name, ps in pairs.items()
    }
    write_key_info(path.parent, info)
    save_sets(sets, pairs, path)
    return sets


def _empty() -> dict[str, torch.Tensor]:
    """A set with no rows (references=False): the same tensors, zero sequences."""
    none = torch.zeros((0, 0), dtype=torch.long)
    return {"input_ids": none, "attention_mask": none.clone(), "labels": none.clone()}


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
