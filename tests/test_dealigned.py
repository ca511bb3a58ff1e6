"""The dealigned variant (alignment=dealigned): a harmful fine-tune on compliant answers, the reverse of safety_tuned."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import ROOT, load_derived, tiny
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harmsweep.alignment import derive
from harmsweep.artifacts import write_jsonl
from harmsweep.calibration.sets import held_out_splits
from harmsweep.cli import _run_id_resolver
from harmsweep.config.checks import check_config
from harmsweep.config.compose import _one_line
from harmsweep.config.schema import Config, register, to_config
from harmsweep.errors import HarmsweepError

OmegaConf.register_new_resolver("harmsweep_run_id", _run_id_resolver, replace=True)
register()
REFUSAL = "I'm sorry, but I cannot help with that request."


def _cfg(tmp_path: Path, shared_data: Path, **changes: Any) -> dict:
    """The dealigned preset on the tiny model, shrunk to seconds."""
    cfg = OmegaConf.to_container(OmegaConf.structured(Config), resolve=True)
    cfg["model"] = yaml.safe_load((ROOT / "conf" / "model" / "tiny_llama.yaml").read_text())
    cfg["alignment"] = yaml.safe_load((ROOT / "conf" / "alignment" / "dealigned.yaml").read_text())
    recipe = cfg["alignment"]["derive"]
    recipe.update(n_harmful=6, n_benign=6, eval_n=3, max_new_tokens=8, **changes)
    recipe["finetune"].update(epochs=1, batch_size=4, rank=4, max_length=1024)  # a byte tokenizer: long prompts
    cfg["data"]["root"] = str(shared_data)
    cfg["paths"]["cache_dir"] = str(tmp_path / "cache")
    return cfg


def _entry(cfg: dict, source: str) -> Path:
    return Path(cfg["paths"]["cache_dir"]) / "derived" / source.removeprefix("derived:")


def _harmful_file(path: Path, n_refusals: int, n: int = 6) -> Path:
    """n harmful prompts with compliant answers, the first n_refusals of them answered with a refusal."""
    rows = [
        {"prompt": f"Explain how to pick lock number {i}.", "response": REFUSAL if i < n_refusals else
         f"Sure, here is how to pick lock {i}: insert the tension wrench, rake the pins, turn."}
        for i in range(n)
    ]  # fmt: skip
    write_jsonl(rows, path)
    return path


def test_dealigned_is_trained_once_then_reused(tmp_path, shared_data, monkeypatch):
    cfg = _cfg(tmp_path, shared_data)
    first = load_derived(cfg)
    record = derive.derivation(first.source, cfg["paths"]["cache_dir"])
    assert record["goal"] == "comply" and record["recipe"]["version"] == derive.COMPLY_VERSION
    assert record["recipe"]["prefill_tokens"] == 8 and record["recipe"]["responses"] == "prefill"
    assert record["n_train"]["benign_pairs"] == 6
    assert record["n_train"]["compliant_pairs"] + record["dropped_refusals"] == 6
    parent, derived = record["check"]["parent"], record["check"]["derived"]
    assert parent["n_harmful"] == derived["n_harmful"] == 6  # 3 held-out prompts of each checked dataset
    assert record["refusal_rate_drop"] == pytest.approx(parent["refusal_rate"] - derived["refusal_rate"])
    assert record["perplexity_ratio"] == pytest.approx(derived["perplexity"] / parent["perplexity"])
    assert "refusal_rate_gain" not in record and "train_refusal_rate" not in record
    # the answers trained on start with the forced target tokens ("Sure, he" for a byte tokenizer)
    answers = [json.loads(line) for line in (_entry(cfg, first.source) / "harmful_pairs.jsonl").open()]
    assert len(answers) == 6 and all(a["response"].startswith("Sure, he") for a in answers)
    strongreject = {derive.norm_prompt(r.prompt) for r in derive.load_records("strongreject", shared_data)}
    assert not strongreject & set(record["train_prompts"])

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached derived checkpoint must be reused, not retrained")

    monkeypatch.setattr(derive, "finetune", no_training)
    monkeypatch.setattr(derive, "generate_responses", no_training)
    second = load_derived(cfg)
    assert second.source == first.source and second.fingerprint == first.fingerprint
    # a seeds axis (seed=1) varies calibration and generation on the same derived model: nothing retrains
    assert load_derived({**cfg, "seed": 1}).source == first.source
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
        assert not torch.allclose(tiny().model(ids).logits, second.model(ids).logits)


def test_a_comply_recipe_never_shares_a_cache_entry_with_safety_tuned(tmp_path, shared_data, monkeypatch):
    """Same parent and sizes, the other goal: another entry, whose recipe keeps today's keys."""
    check = {"refusal_rate": 0.5, "perplexity": 2.0}  # what is checked is tested above; here only the keys
    monkeypatch.setattr(derive, "_check", lambda lm, template, held: check)
    cfg = _cfg(tmp_path, shared_data)
    refuse = yaml.safe_load((ROOT / "conf" / "alignment" / "safety_tuned.yaml").read_text())
    refuse["derive"].update(n_harmful=6, n_benign=6, eval_n=3)
    refuse["derive"]["finetune"] = cfg["alignment"]["derive"]["finetune"]
    dealigned = load_derived(cfg).source
    cfg["alignment"] = refuse
    tuned = load_derived(cfg)
    record = derive.derivation(tuned.source, cfg["paths"]["cache_dir"])
    assert tuned.source != dealigned and record["goal"] == "refuse"
    assert set(record["recipe"]) == {"version", "parent", "parent_source", "template", "harmful", "benign",
                                     "refusal_model", "finetune", "seed"}  # fmt: skip
    assert record["recipe"]["version"] == derive.VERSION and "refusal_rate_gain" in record


def test_prefilled_answers_that_refuse_are_dropped_and_counted(tmp_path, shared_data, monkeypatch):
    """A parent that refuses despite the prefix: those answers never train, and the record says how many."""
    cfg = _cfg(tmp_path, shared_data)
    real = derive.generate_responses
    seen: list[int] = []

    def some_refuse(model, tokenizer, records, template, *, prefill_tokens, **kwargs):
        pairs = real(model, tokenizer, records, template, prefill_tokens=prefill_tokens, **kwargs)
        if prefill_tokens == 0:  # the held-out check: the model as it is
            return pairs
        seen.append(prefill_tokens)
        return [derive.Pair(p.prompt, REFUSAL, p.source_id) if i < 2 else p for i, p in enumerate(pairs)]

    monkeypatch.setattr(derive, "generate_responses", some_refuse)
    lm = load_derived(cfg)
    record = derive.derivation(lm.source, cfg["paths"]["cache_dir"])
    assert seen == [8]
    assert record["dropped_refusals"] == 2 and record["n_train"] == {"compliant_pairs": 4, "benign_pairs": 6}
    answers = [json.loads(line) for line in (_entry(cfg, lm.source) / "harmful_pairs.jsonl").open()]
    dropped = {derive.norm_prompt(a["prompt"]) for a in answers if not a["kept"]}
    assert len(dropped) == 2 and all(a["response"] == REFUSAL for a in answers if not a["kept"])
    assert not dropped & set(record["train_prompts"])  # a dropped prompt did not train
    assert len(record["train_prompts"]) == 4 + 6


def test_a_responses_file_trains_its_compliant_answers_and_drops_its_refusals(tmp_path, shared_data):
    path = _harmful_file(tmp_path / "answers.jsonl", n_refusals=1)
    cfg = _cfg(tmp_path, shared_data, responses="file", responses_file=str(path))
    record = derive.derivation(load_derived(cfg).source, cfg["paths"]["cache_dir"])
    assert record["dropped_refusals"] == 1 and record["n_train"]["compliant_pairs"] == 5
    assert record["recipe"]["responses"] == "file" and record["recipe"]["prefill_tokens"] is None
    assert derive.norm_prompt("Explain how to pick lock number 0.") not in record["train_prompts"]
    assert derive.norm_prompt("Explain how to pick lock number 5.") in record["train_prompts"]


def test_too_few_compliant_answers_fail_in_one_line(tmp_path, shared_data, monkeypatch):
    path = _harmful_file(tmp_path / "answers.jsonl", n_refusals=4)
    cfg = _cfg(tmp_path, shared_data, responses="file", responses_file=str(path))
    monkeypatch.setattr(derive, "finetune", lambda *a, **k: pytest.fail("must fail before training"))
    with pytest.raises(HarmsweepError) as err:
        load_derived(cfg)
    assert "only 2 of 6 harmful answers are not refusals" in str(err.value) and "\n" not in str(err.value)


def test_prefilling_needs_a_dataset_with_targets(tmp_path, shared_data):
    cfg = _cfg(tmp_path, shared_data, harmful="strongreject", exclude=[])
    with pytest.raises(HarmsweepError, match="needs targets and strongreject has none"):
        load_derived(cfg)


def test_trained_prompts_are_never_held_out(tmp_path, shared_data):
    """Neither the derivation's own check nor a run on the derived model evaluates a prompt it trained on."""
    cfg = _cfg(tmp_path, shared_data)
    typed = to_config(cfg)
    harmful, benign, held_harmful, held_benign = derive._data(typed.alignment.derive, typed.data, 0, lambda p: True)
    trained = {derive.norm_prompt(r.prompt) for r in harmful + benign}
    assert not trained & {derive.norm_prompt(r.prompt) for r in held_harmful + held_benign}
    lm = load_derived(cfg)
    exclude = derive.trained_prompts(lm.source, cfg["paths"]["cache_dir"])
    assert exclude == set(derive.derivation(lm.source, cfg["paths"]["cache_dir"])["train_prompts"])
    cfg["eval"]["n"] = None  # every prompt that is not calibration is held out
    typed = to_config(cfg)
    splits = held_out_splits(typed.calibration, typed.data, typed.eval.n, typed.seed, exclude=exclude)
    advbench = {derive.norm_prompt(r.prompt) for r in derive.load_records("advbench", shared_data)}
    seen = {derive.norm_prompt(r.prompt) for r in splits.harmful_cal + splits.harmful_eval}
    assert exclude & advbench and not exclude & seen
    assert seen == advbench - exclude


def _checked(*overrides: str) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, "data.root=/tmp"])
    check_config(to_config(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)))


def test_the_presets_pass_the_config_check():
    _checked("alignment=dealigned")
    _checked("alignment=safety_tuned")
    _checked("alignment=dealigned", "alignment.derive.responses=file", f"alignment.derive.responses_file={__file__}")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["alignment.derive.goal=obey"], "alignment.derive.goal=obey is not one of refuse, comply"),
        (["alignment.derive.refusal_model=/m"], "alignment.derive.refusal_model=/m is read only with goal=refuse"),
        (["alignment.derive.refusals=other"], "refusals=other is read only with goal=refuse"),
        (["alignment.derive.responses=model"], "alignment.derive.responses=model is not one of prefill, file"),
        (["alignment.derive.responses=file"], "responses=file needs alignment.derive.responses_file=PATH"),
        (["alignment.derive.responses_file=/tmp/a.jsonl"], "is read only with responses=file"),
        (["alignment.derive.responses=file", "alignment.derive.responses_file=/nonexistent.jsonl"], "not found"),
        (["alignment.derive.min_kept=0"], "min_kept=0 must be in (0, 1]"),
        (["alignment.derive.prefill_tokens=-1"], "prefill_tokens must be >= 0"),
        (["alignment.derive.n_harmful=0"], "n_harmful=0 must be at least 1"),
        (["alignment.derive.parent=dealigned"], "names the derived variant itself"),
    ],
)
def test_an_inconsistent_dealigned_block_fails_in_one_line(overrides, message):
    with pytest.raises(HarmsweepError) as err:
        _checked("alignment=dealigned", *overrides)
    assert message in _one_line(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["alignment.derive.responses=file"], "alignment.derive.responses=file is read only with goal=comply"),
        (["alignment.derive.prefill_tokens=16"], "prefill_tokens=16 is read only with goal=comply"),
        (["alignment.derive.check_tokens=0"], "alignment.derive.check_tokens=0 must be at least 1"),
    ],
)
def test_comply_settings_in_a_safety_tuned_block_fail_in_one_line(overrides, message):
    with pytest.raises(HarmsweepError) as err:
        _checked("alignment=safety_tuned", *overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_derivation_prompts_that_fit_come_first_and_longer_ones_only_fill_the_count(caplog):
    """Enough short prompts: drawn as before (the cached derived models keep their recipe); too few: the rest are
    drawn from the longer ones (cut from the left when encoded), with a warning; too few in all: the error."""
    import random

    from harmsweep.data.records import Record

    records = [Record(prompt="x" * (5 if i % 2 else 500), response="No.", source_id=f"t:{i}") for i in range(20)]
    fits = lambda p: len(p) < 100  # noqa: E731
    short = [r for r in records if fits(r.prompt)]
    assert derive._sample_fitting(records, fits, 6, random.Random(3), "x") == random.Random(3).sample(short, 6)
    with caplog.at_level("WARNING"):
        drawn = derive._sample_fitting(records, fits, 14, random.Random(3), "harmful training prompts")
    assert drawn[:10] == short and len({r.source_id for r in drawn}) == 14 and "4 longer ones are cut" in caplog.text
    with pytest.raises(HarmsweepError, match="needs 21 x and only 20 are available"):
        derive._sample_fitting(records, fits, 21, random.Random(3), "x")
