"""Fine-tuning: LoRA and full, with a fixed pruning mask; the derived safety-tuned variant and its cache."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import ROOT, load_derived, tiny
from omegaconf import OmegaConf

from harmsweep.alignment import derive
from harmsweep.alignment.finetune import finetune
from harmsweep.alignment.spec import FinetuneSpec
from harmsweep.calibration.pairs import Pair, encode_pairs
from harmsweep.config.schema import Config
from harmsweep.errors import HarmsweepError
from harmsweep.models import loading as models

DOWN = "model.layers.0.mlp.down_proj.weight"
Q = "model.layers.1.self_attn.q_proj.weight"


def _tensors(lm, n: int = 8) -> dict[str, torch.Tensor]:
    pairs = [Pair(f"Question {i}?", f"Answer {i} is always the same text.", f"t:{i}", None) for i in range(n)]
    return encode_pairs(lm.tokenizer, pairs, "plain", 128)


def _mask() -> dict[str, torch.Tensor]:
    return {DOWN: torch.tensor([0, 5, 77, 200, 4095], dtype=torch.int64), Q: torch.tensor([3, 64, 1000])}


def _logits(lm, tensors) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fixed_mask_keeps_pruned_weights_zero_and_trains_the_rest(method):
    lm = tiny()
    tensors = _tensors(lm)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    losses = finetune(lm.model, tensors, FinetuneSpec(method=method, rank=4, lr=5e-3, epochs=4, batch_size=4),
                      frozen=_mask())  # fmt: skip
    named = dict(lm.model.named_parameters())
    for name, idx in _mask().items():
        assert torch.count_nonzero(named[name].view(-1)[idx]) == 0
        others = torch.ones(named[name].numel(), dtype=torch.bool)
        others[idx] = False
        assert (named[name].view(-1)[others] - before[name].view(-1)[others]).abs().max() > 0
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert type(lm.model).__name__ == "LlamaForCausalLM"  # adapters merged: a plain model again
    assert not any("lora" in n for n in named)


def test_lora_mask_holds_during_training_not_only_after():
    """What the model computes mid-training (adapters + mask hook) equals the merged, re-zeroed model."""
    lm = tiny()
    tensors = _tensors(lm)
    seen = {}
    spec = FinetuneSpec(rank=4, lr=5e-3, epochs=2, batch_size=4)
    finetune(
        lm.model, tensors, spec, frozen=_mask(), on_step=lambda step, loss: seen.__setitem__(step, _logits(lm, tensors))
    )
    assert torch.allclose(seen[spec.steps(8)], _logits(lm, tensors), atol=1e-5)


def test_lora_without_the_mask_hook_would_differ():
    """The hook matters: a LoRA run without it leaves the pruned positions non-zero after the merge."""
    lm = tiny()
    finetune(lm.model, _tensors(lm), FinetuneSpec(rank=4, lr=5e-3, epochs=2, batch_size=4))
    named = dict(lm.model.named_parameters())
    assert torch.count_nonzero(named[DOWN].view(-1)[_mask()[DOWN]]) > 0


def test_training_is_seeded():
    a, b = tiny(), tiny()
    spec = FinetuneSpec(rank=4, lr=5e-3, epochs=2, batch_size=3, seed=3)
    assert finetune(a.model, _tensors(a), spec) == finetune(b.model, _tensors(b), spec)
    assert torch.equal(dict(a.model.named_parameters())[DOWN], dict(b.model.named_parameters())[DOWN])


def test_bad_specs_fail_clearly():
    with pytest.raises(HarmsweepError, match=r"finetune\.method=adam"):
        FinetuneSpec(method="adam").validate()
    with pytest.raises(Exception, match="rnak"):  # the schema: a typo'd option fails while composing
        OmegaConf.merge(OmegaConf.structured(FinetuneSpec), {"rnak": 4})
    lm = tiny()
    with pytest.raises(HarmsweepError, match="dropout=0"):
        finetune(lm.model, _tensors(lm), FinetuneSpec(dropout=0.1), frozen=_mask())
    with pytest.raises(HarmsweepError, match="matches no linear layer"):
        finetune(lm.model, _tensors(lm), FinetuneSpec(targets=["nonexistent_proj"]))


def test_steps_count_epochs_accumulation_and_cap():
    assert FinetuneSpec(batch_size=4, epochs=3).steps(10) == 9
    assert FinetuneSpec(batch_size=4, epochs=3, grad_accum=2).steps(10) == 6
    assert FinetuneSpec(batch_size=4, epochs=3, max_steps=5).steps(10) == 5


def _derive_cfg(tmp_path, shared_data) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.structured(Config), resolve=True)
    cfg["model"] = yaml.safe_load((ROOT / "conf" / "model" / "tiny_llama.yaml").read_text())
    cfg["alignment"] = yaml.safe_load((ROOT / "conf" / "alignment" / "safety_tuned.yaml").read_text())
    recipe = cfg["alignment"]["derive"]
    recipe.update(n_harmful=6, n_benign=6, eval_n=3)
    recipe["finetune"].update(epochs=1, batch_size=4, rank=4, max_length=1024)
    cfg["data"]["root"] = str(shared_data)
    cfg["paths"]["cache_dir"] = str(tmp_path / "cache")
    return cfg


def test_safety_tune_is_trained_once_then_reused(tmp_path, shared_data, monkeypatch):
    cfg = _derive_cfg(tmp_path, shared_data)
    first = load_derived(cfg)
    record = derive.derivation(first.source, cfg["paths"]["cache_dir"])
    assert record["n_train"] == {"refusal_pairs": 6, "benign_pairs": 6}
    assert set(record["check"]) == {"parent", "derived"} and record["check"]["parent"]["n_harmful"] == 6
    assert record["train_refusal_rate"] == 1.0  # Wei et al.'s targets are refusals
    # never trained on a prompt of an excluded dataset, and runs will drop the trained prompts
    strongreject = {derive.norm_prompt(r.prompt) for r in derive.load_records("strongreject", shared_data)}
    assert not strongreject & set(record["train_prompts"])
    assert derive.trained_prompts(first.source, cfg["paths"]["cache_dir"]) == set(record["train_prompts"])

    def no_training(*args, **kwargs):
        raise AssertionError("the cached derived checkpoint must be reused, not retrained")

    monkeypatch.setattr(derive, "finetune", no_training)
    second = load_derived(cfg)
    assert second.source == first.source and second.fingerprint == first.fingerprint
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    # a different recipe is a different checkpoint
    cfg["alignment"]["derive"]["finetune"]["lr"] = 1e-3
    monkeypatch.undo()
    assert load_derived(cfg).source != first.source


def test_a_cached_derived_model_loads_without_reading_its_parents_weights(tmp_path, shared_data, monkeypatch):
    """A 7B parent would cost a minute and its size in RAM just to be fingerprinted."""
    parent = tiny()
    parent.model.save_pretrained(tmp_path / "parent")
    parent.tokenizer.save_pretrained(tmp_path / "parent")
    cfg = _derive_cfg(tmp_path, shared_data)
    cfg["model"]["path"] = str(tmp_path / "parent")
    first = load_derived(cfg)
    entry = tmp_path / "cache" / "derived" / first.source.removeprefix("derived:")
    read: list[str] = []
    real = models.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda path, **kw: read.append(str(path))
                        or real(path, **kw))  # fmt: skip
    second = load_derived(cfg)
    assert read == [str(entry)]
    assert second.source == first.source and second.fingerprint == first.fingerprint


def test_derived_model_differs_from_its_parent(tmp_path, shared_data):
    cfg = _derive_cfg(tmp_path, shared_data)
    derived = load_derived(cfg)
    parent = tiny()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(parent.model(ids).logits, derived.model(ids).logits)
    entry = tmp_path / "cache" / "derived" / derived.source.removeprefix("derived:")
    assert json.loads((entry / "derivation.json").read_text())["recipe"]["parent"] == parent.fingerprint


def test_safety_tune_can_take_its_targets_from_a_refusal_model(tmp_path, shared_data):
    """refusal_model=DIR: the targets are that model's own answers to the harmful prompts."""
    teacher = tiny()
    teacher.model.save_pretrained(tmp_path / "teacher")
    teacher.tokenizer.save_pretrained(tmp_path / "teacher")
    cfg = _derive_cfg(tmp_path, shared_data)
    cfg["alignment"]["derive"]["refusal_model"] = str(tmp_path / "teacher")
    record = derive.derivation(load_derived(cfg).source, cfg["paths"]["cache_dir"])
    assert record["recipe"]["refusal_model"] == str(tmp_path / "teacher")
    assert record["n_train"]["refusal_pairs"] == 6
    assert record["train_refusal_rate"] < 1.0  # a random-init teacher does not refuse: what it said is what trained
