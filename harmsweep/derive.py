"""Alignment as a causal variable: derive a safety-tuned variant of any model by fine-tuning.

Harmful prompts paired with refusals (Wei et al.'s Llama-2-chat refusals, a user file, or the answers
of a configured aligned model), mixed with benign instruction pairs, train the parent checkpoint
(LoRA merged, or full). The result is saved once under the cache, keyed by its recipe (parent
fingerprint, data, settings, code version), and then loads like any checkpoint
(``alignment=safety_tuned``), so compression can be compared before and after alignment of the same
model. Prompts of ``exclude`` datasets never train; runs on the derived model drop the prompts it was
trained on before splitting off held-out data; and the derivation records its own check: refusal rate
on held-out harmful prompts and benign perplexity, parent vs derived.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harmsweep.artifacts import write_json
from harmsweep.cache import cached, content_key, write_key_info
from harmsweep.calibration import Pair, encode_pairs, file_pairs, generate_responses, prompt_ids, resolve_template
from harmsweep.data import Record, load_records
from harmsweep.devices import place_model, resolve_device
from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.utility import perplexity
from harmsweep.finetune import FinetuneSpec, finetune
from harmsweep.generation import Sampling
from harmsweep.judges.refusal import is_refusal
from harmsweep.models import LoadedModel, load_model

log = logging.getLogger(__name__)
VERSION = "safety-tune-v1"
MARKER = "derivation.json"


def load_derived(cfg: Mapping[str, Any]) -> LoadedModel:
    """The derived checkpoint of ``cfg.alignment.derive``: trained once, then loaded from the cache."""
    derive, model_cfg = cfg["alignment"]["derive"], cfg["model"]
    cache_dir = Path(str(cfg["paths"]["cache_dir"])).expanduser()
    parent = load_model(model_cfg, derive["parent"], cache_dir, weights=False)  # its weights only if training
    template = resolve_template(parent.tokenizer, cfg["alignment"]["template"])

    def fits(prompt: str) -> bool:  # at most half the token budget, so every pair keeps a response
        return len(prompt_ids(parent.tokenizer, prompt, template)) <= int(derive["finetune"]["max_length"]) // 2

    harmful, benign, held_harmful, held_benign = _data(derive, cfg["data"], int(cfg["seed"]), fits)
    spec = FinetuneSpec.from_config(derive["finetune"])
    recipe = {
        "version": VERSION,
        "parent": parent.fingerprint,
        "parent_source": parent.source,
        "template": cfg["alignment"]["template"],
        "harmful": content_key([asdict(r) for r in harmful]),
        "benign": content_key([asdict(r) for r in benign]),
        "refusal_model": derive.get("refusal_model"),
        "finetune": spec.key(),
        "seed": int(cfg["seed"]),
    }
    entry = cache_dir / "derived" / f"{model_cfg['name']}-{content_key(recipe)}"
    device = _device(cfg)

    def train(entry: Path) -> None:
        full = load_model(model_cfg, derive["parent"], cache_dir)
        _train(full, derive, spec, harmful, benign, (held_harmful, held_benign), recipe, entry, device, cache_dir)

    _, trained = cached(entry, train, lambda e: None, MARKER)
    if not trained:
        log.info("reusing the derived checkpoint %s", entry)
    derived = load_model({**model_cfg, "path": str(entry)}, "derived", cache_dir)
    derived.source = f"derived:{entry.name}"
    return derived


def derivation(entry_or_source: str, cache_dir: str | Path) -> dict[str, Any] | None:
    """The recorded derivation of a derived model source ('derived:<entry>'), for result.json."""
    if not entry_or_source.startswith("derived:"):
        return None
    import json

    path = Path(str(cache_dir)).expanduser() / "derived" / entry_or_source.removeprefix("derived:") / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def _device(cfg: Mapping[str, Any]) -> str:
    return resolve_device(str(cfg.get("device", "auto")))


def norm_prompt(prompt: str) -> str:
    return " ".join(prompt.casefold().split())


def _data(
    derive: Mapping[str, Any], data: Mapping[str, Any], seed: int, fits: Callable[[str], bool]
) -> tuple[list[Record], list[Record], list[Record], list[Record]]:
    """Training harmful/benign records and held-out harmful/benign records, prompt-disjoint."""
    root = data.get("root")
    if derive.get("refusals_file"):
        refusals = load_records("custom", None, file=derive["refusals_file"])
    else:
        refusals = load_records(derive["refusals"], root)
    excluded = {norm_prompt(r.prompt) for name in derive["exclude"] for r in load_records(name, root)}
    first: dict[str, Record] = {}
    for r in refusals:  # Wei et al. give several refusals per prompt: keep the first
        if norm_prompt(r.prompt) not in excluded and (r.response or derive.get("refusal_model")) and fits(r.prompt):
            first.setdefault(norm_prompt(r.prompt), r)
    rng = random.Random(seed)
    harmful = _sample(list(first.values()), int(derive["n_harmful"]), rng, "harmful training prompts")
    pool = [r for r in load_records(derive["benign"], root) if r.response and fits(r.prompt)]
    benign = _sample(pool, int(derive["n_benign"]), rng, "benign training pairs")
    trained = {norm_prompt(r.prompt) for r in harmful + benign}
    n_eval = int(derive["eval_n"])
    held_harmful = [
        r
        for name in derive["check"]
        for r in _sample([r for r in load_records(name, root) if norm_prompt(r.prompt) not in trained], n_eval, rng,
                         f"held-out {name} prompts")
    ]  # fmt: skip
    benign_pool = [r for r in load_records(data["benign"]["name"], root) if norm_prompt(r.prompt) not in trained]
    held_benign = _sample([r for r in benign_pool if r.response], n_eval, rng, "held-out benign pairs")
    return harmful, benign, held_harmful, held_benign


def trained_prompts(source: str, cache_dir: str | Path) -> set[str]:
    """Normalised prompts a derived model was trained on: runs drop them before splitting off held-out data."""
    recorded = derivation(source, cache_dir)
    return set(recorded["train_prompts"]) if recorded else set()


def _sample(records: Sequence[Record], n: int, rng: random.Random, what: str) -> list[Record]:
    if len(records) < n:
        raise HarmsweepError(f"the safety fine-tune needs {n} {what} and only {len(records)} are available")
    return rng.sample(list(records), n)


def _train(
    parent: LoadedModel,
    derive: Mapping[str, Any],
    spec: FinetuneSpec,
    harmful: list[Record],
    benign: list[Record],
    held: tuple[list[Record], list[Record]],
    recipe: Mapping[str, Any],
    entry: Path,
    device: str,
    cache_dir: Path,
) -> None:
    start = time.perf_counter()
    model, tok = place_model(parent.model, device), parent.tokenizer  # a device-mapped parent stays put
    template = resolve_template(tok, str(recipe["template"]))
    if derive.get("refusal_model"):
        teacher = load_model({"name": "refusal_model", "path": derive["refusal_model"]}, "aligned", cache_dir)
        teacher_template = resolve_template(teacher.tokenizer, "chat")
        harm_pairs = generate_responses(
            place_model(teacher.model, device), teacher.tokenizer, harmful, teacher_template, prefill_tokens=0,
            sampling=Sampling(max_new_tokens=64), batch_size=16, desc="refusals from refusal_model",
        )  # fmt: skip
        del teacher
    else:
        harm_pairs = file_pairs(harmful, "safety fine-tune refusals")
    pairs = harm_pairs + file_pairs(benign, "safety fine-tune benign pairs")
    tensors = encode_pairs(tok, pairs, template, spec.max_length)
    check_before = _check(parent, template, held)
    losses = finetune(model, tensors, spec)
    check_after = _check(parent, template, held)
    model.save_pretrained(entry, safe_serialization=True)
    tok.save_pretrained(entry)
    write_key_info(entry, recipe)
    write_json(
        {
            "recipe": dict(recipe),
            "train_prompts": sorted({norm_prompt(r.prompt) for r in harmful + benign}),
            "n_train": {"refusal_pairs": len(harm_pairs), "benign_pairs": len(benign)},
            "train_refusal_rate": sum(is_refusal(p.response) for p in harm_pairs) / len(harm_pairs),
            "losses": losses,
            "check": {"parent": check_before, "derived": check_after},
            "perplexity_ratio": check_after["perplexity"] / check_before["perplexity"],
            "refusal_rate_gain": check_after["refusal_rate"] - check_before["refusal_rate"],
            "wall_s": round(time.perf_counter() - start, 1),
        },
        entry / MARKER,
    )


def _check(lm: LoadedModel, template: str, held: tuple[list[Record], list[Record]]) -> dict[str, Any]:
    """Refusal rate on held-out harmful prompts (per dataset) and perplexity on held-out benign answers."""
    harmful, benign = held
    answers: list[Pair] = generate_responses(
        lm.model, lm.tokenizer, harmful, template, prefill_tokens=0, sampling=Sampling(max_new_tokens=48),
        batch_size=16, desc="safety check",
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
        "n_benign": len(benign),
    }
