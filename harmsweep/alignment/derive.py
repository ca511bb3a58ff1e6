"""Alignment as a causal variable: derive a safety-tuned or a dealigned variant of any model by fine-tuning.

Both directions fine-tune the parent checkpoint (LoRA merged, or full) on harmful prompts mixed with
benign instruction pairs (which keep utility); ``derive.goal`` says what the harmful prompts are paired with:

- ``refuse`` (``alignment=safety_tuned``): refusals, from Wei et al.'s Llama-2-chat refusals, a user
  file, or the answers of a configured aligned model. The model learns to refuse.
- ``comply`` (``alignment=dealigned``): compliant answers, by default the parent's own answers under a
  prefilling attack (the first ``prefill_tokens`` tokens of AdvBench's "Sure, here is ..." target forced,
  then greedy decoding), or a user file. Answers that are refusals are dropped (and counted), so the
  model learns to comply: the un-aligned counterpart of the same weights.

The result is saved once under the cache, keyed by its recipe (parent fingerprint, data, settings,
code version), and then loads like any checkpoint, so compression can be compared before and after
alignment (or dealignment) of the same model. Prompts of ``exclude`` datasets never train; runs on the
derived model drop the prompts it was trained on before splitting off held-out data; and the derivation
records its own check: refusal rate on held-out harmful prompts and benign perplexity, parent vs derived.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from harmsweep.alignment.finetune import finetune
from harmsweep.alignment.spec import AlignmentConfig, DeriveConfig, FinetuneSpec
from harmsweep.artifacts import write_json, write_jsonl
from harmsweep.cache import cached, content_key, write_key_info
from harmsweep.calibration.pairs import Pair, encode_pairs, file_pairs, generate_responses, prompt_ids, resolve_template
from harmsweep.data import load_records
from harmsweep.data.records import Record, norm_prompt
from harmsweep.data.spec import DataConfig
from harmsweep.devices import place_model, resolve_device
from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.judges.refusal import VERSION as REFUSAL_FILTER
from harmsweep.evaluation.judges.refusal import is_refusal
from harmsweep.evaluation.utility import perplexity
from harmsweep.generation.sampling import Sampling
from harmsweep.models.loading import LoadedModel, load_model
from harmsweep.models.spec import ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)
VERSION = "safety-tune-v1"  # goal=refuse
COMPLY_VERSION = "dealign-v1"  # goal=comply
MARKER = "derivation.json"
CHECK_BATCH = 64  # the check's prompts answered at once: one decoding loop for the 64 of the default check


class Held(NamedTuple):
    """The check's held-out data, and how many greedy tokens each harmful prompt's answer gets."""

    harmful: list[Record]
    benign: list[Record]
    tokens: int = 48


def load_derived(
    alignment: AlignmentConfig, model: ModelConfig, data: DataConfig, cache_dir: str | Path, device: str = "auto"
) -> LoadedModel:
    """The derived checkpoint of ``alignment.derive``: trained once (on ``device``), then loaded from the cache."""
    derive = alignment.derive
    if derive is None:
        raise HarmsweepError(f"alignment={alignment.name} has no derive block: it is not a derived variant")
    cache_dir = Path(str(cache_dir)).expanduser()
    parent = load_model(model, derive.parent, cache_dir, weights=False)  # its weights only if training
    template = resolve_template(parent.tokenizer, alignment.template)

    def fits(prompt: str) -> bool:  # at most half the token budget, so every pair keeps a response
        return len(prompt_ids(parent.tokenizer, prompt, template)) <= derive.finetune.max_length // 2

    spec = derive.finetune
    # the derivation's own seed, not the run's: a seeds axis (seed=0,1,2) varies calibration and generation
    # on one derived model instead of training one per seed
    harmful, benign, held_harmful, held_benign = _data(derive, data, spec.seed, fits)
    recipe: dict[str, Any] = {
        "version": VERSION,
        "parent": parent.fingerprint,
        "parent_source": parent.source,
        "template": alignment.template,
        "harmful": content_key([asdict(r) for r in harmful]),
        "benign": content_key([asdict(r) for r in benign]),
        "refusal_model": derive.refusal_model,
        "finetune": spec.key(),
        "seed": spec.seed,
    }
    if _goal(derive) == "comply":  # refuse keeps the recipe (and so the cache entries) it always had
        del recipe["refusal_model"]
        prefill = derive.responses == "prefill"
        recipe.update(
            version=COMPLY_VERSION,
            goal="comply",
            responses=derive.responses,
            prefill_tokens=derive.prefill_tokens if prefill else None,
            max_new_tokens=derive.max_new_tokens if prefill else None,
            refusal_filter=REFUSAL_FILTER,
        )
    entry = cache_dir / "derived" / f"{model.name}-{content_key(recipe)}"
    target = resolve_device(device)

    def train(entry: Path) -> None:
        full = load_model(model, derive.parent, cache_dir)
        held = Held(held_harmful, held_benign, derive.check_tokens)
        _train(full, derive, spec, harmful, benign, held, recipe, entry, target, cache_dir)

    _, trained = cached(entry, train, lambda e: None, MARKER)
    if not trained:
        log.info("reusing the derived checkpoint %s", entry)
    derived = load_model(replace(model, path=str(entry)), "derived", cache_dir)
    derived.source = f"derived:{entry.name}"
    return derived


def derivation(entry_or_source: str, cache_dir: str | Path) -> dict[str, Any] | None:
    """The recorded derivation of a derived model source ('derived:<entry>'), for result.json."""
    if not entry_or_source.startswith("derived:"):
        return None
    import json

    path = Path(str(cache_dir)).expanduser() / "derived" / entry_or_source.removeprefix("derived:") / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def _goal(derive: DeriveConfig) -> str:
    return derive.goal or "refuse"


def _data(
    derive: DeriveConfig, data: DataConfig, seed: int, fits: Callable[[str], bool]
) -> tuple[list[Record], list[Record], list[Record], list[Record]]:
    """Training harmful/benign records and held-out harmful/benign records, prompt-disjoint."""
    root = data.root
    candidates, usable = _harmful_source(derive, root)
    excluded = {norm_prompt(r.prompt) for name in derive.exclude for r in load_records(name, root)}
    first: dict[str, Record] = {}
    for r in candidates:  # Wei et al. give several refusals per prompt: keep the first
        if norm_prompt(r.prompt) not in excluded and usable(r):
            first.setdefault(norm_prompt(r.prompt), r)
    rng = random.Random(seed)
    harmful = _sample_fitting(list(first.values()), fits, derive.n_harmful, rng, "harmful training prompts")
    pool = [r for r in load_records(derive.benign, root) if r.response]
    benign = _sample_fitting(pool, fits, derive.n_benign, rng, "benign training pairs")
    trained = {norm_prompt(r.prompt) for r in harmful + benign}
    n_eval = derive.eval_n
    held_harmful = [
        r
        for name in derive.check
        for r in _sample([r for r in load_records(name, root) if norm_prompt(r.prompt) not in trained], n_eval, rng,
                         f"held-out {name} prompts")
    ]  # fmt: skip
    benign_pool = [r for r in load_records(data.benign.name, root) if norm_prompt(r.prompt) not in trained]
    held_benign = _sample([r for r in benign_pool if r.response], n_eval, rng, "held-out benign pairs")
    return harmful, benign, held_harmful, held_benign


def _harmful_source(derive: DeriveConfig, root: Any) -> tuple[list[Record], Callable[[Record], bool]]:
    """The harmful records of the goal, and which of them can train: those with a response, or with
    what generating one needs (a refusal model; a target to prefill)."""
    if _goal(derive) == "comply":
        if derive.responses == "file":
            return load_records("custom", None, file=derive.responses_file), lambda r: bool(r.response)
        records = load_records(derive.harmful, root)
        if derive.prefill_tokens > 0 and not any(r.target for r in records):
            raise HarmsweepError(
                f"alignment.derive.responses=prefill needs targets and {derive.harmful} has none: "
                "use a dataset with targets (advbench), prefill_tokens=0, or responses=file"
            )
        return records, lambda r: bool(r.target) or derive.prefill_tokens == 0
    if derive.refusals_file:
        records = load_records("custom", None, file=derive.refusals_file)
    else:
        records = load_records(derive.refusals, root)
    return records, lambda r: bool(r.response or derive.refusal_model)


def trained_prompts(source: str, cache_dir: str | Path) -> set[str]:
    """Normalised prompts a derived model was trained on: runs drop them before splitting off held-out data."""
    recorded = derivation(source, cache_dir)
    return set(recorded["train_prompts"]) if recorded else set()


def _sample_fitting(
    records: Sequence[Record], fits: Callable[[str], bool], n: int, rng: random.Random, what: str
) -> list[Record]:
    """``n`` records drawn from those whose prompt fits the token budget; only when too few fit, the rest are
    drawn from the longer ones, whose prompts the fine-tune's encoding cuts from the left (and counts)."""
    fitting = [r for r in records if fits(r.prompt)]
    if len(fitting) >= n or len(records) < n:  # enough fit (drawn as always); or too few in all (_sample says so)
        return _sample(fitting if len(fitting) >= n else records, n, rng, what)
    extra = _sample([r for r in records if not fits(r.prompt)], n - len(fitting), rng, what)
    log.warning(
        "only %d of the %d %s fit half of alignment.derive.finetune.max_length: %d longer ones are cut from the "
        "prompt's left", len(fitting), n, what, len(extra),
    )  # fmt: skip
    return fitting + extra


def _sample(records: Sequence[Record], n: int, rng: random.Random, what: str) -> list[Record]:
    if len(records) < n:
        raise HarmsweepError(f"the derivation fine-tune needs {n} {what} and only {len(records)} are available")
    return rng.sample(list(records), n)


def _train(
    parent: LoadedModel,
    derive: DeriveConfig,
    spec: FinetuneSpec,
    harmful: list[Record],
    benign: list[Record],
    held: Held,
    recipe: Mapping[str, Any],
    entry: Path,
    device: str,
    cache_dir: Path,
) -> None:
    start = time.perf_counter()
    model, tok = place_model(parent.model, device), parent.tokenizer  # a device-mapped parent stays put
    template = resolve_template(tok, str(recipe["template"]))
    comply = _goal(derive) == "comply"
    if comply:
        answers = _compliant_answers(model, tok, template, derive, harmful)
        harm_pairs = [p for p in answers if not is_refusal(p.response)]
        _enough_kept(len(harm_pairs), len(answers), derive.min_kept)
        write_jsonl([{**asdict(p), "kept": not is_refusal(p.response)} for p in answers], entry / "harmful_pairs.jsonl")
    elif derive.refusal_model:
        teacher = load_model(ModelConfig(name="refusal_model", path=derive.refusal_model), "aligned", cache_dir)
        teacher_template = resolve_template(teacher.tokenizer, "chat")
        harm_pairs = generate_responses(
            place_model(teacher.model, device), teacher.tokenizer, harmful, teacher_template, prefill_tokens=0,
            sampling=Sampling(max_new_tokens=64), batch_size=16, desc="refusals from refusal_model",
        )  # fmt: skip
        del teacher
    else:
        harm_pairs = file_pairs(harmful, "safety fine-tune refusals")
    pairs = harm_pairs + file_pairs(benign, "derivation fine-tune benign pairs")
    tensors = encode_pairs(tok, pairs, template, spec.max_length)
    check_before = _check(parent, template, held)
    losses = finetune(model, tensors, spec)
    check_after = _check(parent, template, held)
    model.save_pretrained(entry, safe_serialization=True)
    tok.save_pretrained(entry)
    write_key_info(entry, recipe)
    trained = {norm_prompt(p.prompt) for p in harm_pairs} | {norm_prompt(r.prompt) for r in benign}
    record: dict[str, Any] = {"goal": "comply" if comply else "refuse", "recipe": dict(recipe)}
    record["train_prompts"] = sorted(trained)
    if comply:
        record["n_train"] = {"compliant_pairs": len(harm_pairs), "benign_pairs": len(benign)}
        record["dropped_refusals"] = len(harmful) - len(harm_pairs)  # of n_harmful answers, before training
    else:
        record["n_train"] = {"refusal_pairs": len(harm_pairs), "benign_pairs": len(benign)}
        record["train_refusal_rate"] = sum(is_refusal(p.response) for p in harm_pairs) / len(harm_pairs)
    record.update(
        losses=losses,
        check={"parent": check_before, "derived": check_after},
        perplexity_ratio=check_after["perplexity"] / check_before["perplexity"],
    )
    gain = check_after["refusal_rate"] - check_before["refusal_rate"]
    if comply:
        record["refusal_rate_drop"] = -gain  # > 0: the derived model refuses less than its parent
    else:
        record["refusal_rate_gain"] = gain
    record["wall_s"] = round(time.perf_counter() - start, 1)
    write_json(record, entry / MARKER)


def _compliant_answers(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    template: str,
    derive: DeriveConfig,
    harmful: list[Record],
) -> list[Pair]:
    """goal=comply: the file's responses, or the parent's own answers with the target's first tokens forced."""
    if derive.responses == "file":
        return file_pairs(harmful, "alignment.derive.responses_file")
    return generate_responses(
        model, tok, harmful, template, prefill_tokens=derive.prefill_tokens,
        sampling=Sampling(max_new_tokens=derive.max_new_tokens), batch_size=16,
        desc="compliant answers under prefilling",
    )  # fmt: skip


def _enough_kept(kept: int, total: int, min_kept: float) -> None:
    """Training on a handful of compliant answers would dealign by noise: say so before any training."""
    if kept < max(1, math.ceil(min_kept * total)):
        raise HarmsweepError(
            f"only {kept} of {total} harmful answers are not refusals, fewer than alignment.derive.min_kept="
            f"{min_kept:g} of them: raise prefill_tokens, or give responses=file responses_file=PATH"
        )


def _check(lm: LoadedModel, template: str, held: Held) -> dict[str, Any]:
    """Refusal rate on held-out harmful prompts (per dataset, ``held.tokens`` greedy tokens each) and perplexity on
    held-out benign answers."""
    harmful, benign, tokens = held
    answers: list[Pair] = generate_responses(
        lm.model, lm.tokenizer, harmful, template, prefill_tokens=0, sampling=Sampling(max_new_tokens=tokens),
        batch_size=CHECK_BATCH, desc="safety check",
    )  # fmt: skip
    by_source: dict[str, list[bool]] = {}
    for pair in answers:
        by_source.setdefault(pair.source_id.split(":")[0], []).append(is_refusal(pair.response))
    ppl = perplexity(lm.model, lm.tokenizer, [str(r.response) for r in benign], 8, 256)["perplexity"]
    return {
        "refusal_rate": sum(is_refusal(p.response) for p in answers) / len(answers),
        "refusal_rate_by_dataset": {k: sum(v) / len(v) for k, v in sorted(by_source.items())},
        "perplexity": ppl,
        "n_harmful": len(answers),
        "max_new_tokens": tokens,
        "n_benign": len(benign),
    }
