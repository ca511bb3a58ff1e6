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


# ---------------------------------------------------------------- precision, memory and devices of a training step


def test_full_finetune_in_bf16_keeps_fp32_master_weights_and_optimizer_states(monkeypatch):
    """Each AdamW update (~lr = 5e-4) is under half bf16's spacing below 1.0 (2**-9): bf16 weights updated in place
    round every one of them away, and the norms (all 1.0) never move; fp32 masters add them up until they show."""
    lm = tiny(dtype=torch.bfloat16)
    optimizers = []
    real = torch.optim.AdamW

    class Recorded(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recorded)
    norms = [p for n, p in lm.model.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(bool((p == 1).all()) for p in norms)
    finetune(lm.model, _tensors(lm), FinetuneSpec(method="full", lr=5e-4, epochs=4, batch_size=4))
    assert sum(int((p != 1).sum()) for p in norms) > 0
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}  # the model keeps its dtype
    states = [s for opt in optimizers for s in opt.state.values()]
    assert states and {s[k].dtype for s in states for k in ("exp_avg", "exp_avg_sq")} == {torch.float32}


def test_full_finetune_state_is_sized_and_refused_where_it_cannot_fit():
    from harmsweep.alignment.finetune import check_full_fits, full_state_bytes

    assert full_state_bytes(8_000_000_000, 2) == 144_000_000_000  # bf16 weights + fp32 master, grads, AdamW m and v
    assert full_state_bytes(1000, 4) == 16_000  # fp32: the weights are the masters
    check_full_fits(1_000_000_000, 2, capacity=80 * 2**30)
    with pytest.raises(HarmsweepError, match=r"finetune\.method=full.*144 GB.*80 GB.*method=lora") as err:
        check_full_fits(8_000_000_000, 2, capacity=80 * 10**9)
    assert "\n" not in str(err.value)


class _Proj(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 48, bias=False)

    def forward(self, x):
        return self.proj(x)


def _lora_layer(device: str = "cpu"):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(
        _Proj(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False)
    )
    return peft_model.to(device), peft_model.base_model.model.proj


def test_the_lora_mask_hook_equals_the_masked_dense_delta_and_saves_no_per_entry_gathers():
    from harmsweep.alignment.finetune import ADAPTER, _mask_hook

    peft_model, layer = _lora_layer()
    flat = torch.randperm(32 * 48, generator=torch.Generator().manual_seed(1))[:200].sort().values  # K = 200 > in
    _mask_hook(layer, flat)
    x = torch.randn(4, 16, 32, requires_grad=True)  # B * T * K = 12,800 entries: more than anything it may keep
    saved: list[torch.Tensor] = []
    params = {p.data_ptr() for p in peft_model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = peft_model(x)
    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()
    big = [tuple(t.shape) for t in saved if t.data_ptr() not in params and t.numel() >= 4 * 16 * 200]
    assert big == [], big  # x (2,048) and the adapter's (B, T, r) are kept; no (B, T, K) gather

    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    w, s = layer.get_base_layer().weight, layer.scaling[ADAPTER]
    keep = torch.ones(w.numel())
    keep[flat] = 0
    ref_a, ref_b, ref_x = (
        a.detach().clone().requires_grad_(),
        b.detach().clone().requires_grad_(),
        x.detach().clone().requires_grad_(),
    )
    ref = (
        ref_x @ (w.detach() + s * (ref_b @ ref_a) * keep.view_as(w)).T
    )  # the adapter adds nothing at the masked entries
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for got, want in ((x.grad, ref_x.grad), (a.grad, ref_a.grad), (b.grad, ref_b.grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_lora_mask_hook_reads_no_host_tensor_per_forward(monkeypatch):
    from audit import audit

    from harmsweep.alignment.finetune import _mask_hook

    peft_model, layer = _lora_layer("meta")
    _mask_hook(layer, torch.tensor([0, 5, 77, 200, 1500]))  # the indices go to the layer's device once, here
    x = torch.randn(2, 3, 32, device="meta", requires_grad=True)
    watch = audit(lambda: peft_model(x).sum().backward())
    assert watch.ops > 0 and watch.devices == {"meta"}, watch.devices  # no index copied from the host per forward
    assert watch.mixed == []


@pytest.mark.parametrize("method", ["lora", "full"])
def test_one_training_step_with_a_fixed_mask_on_a_device_mixes_no_devices(monkeypatch, method):
    from audit import assert_one_device, audit

    lm = tiny(dtype=torch.bfloat16)
    tensors = _tensors(lm, n=4)  # on the host, as the caller holds them
    model = lm.model.to("meta")
    model.set_attn_implementation("eager")  # sdpa's mask builder reads the padding mask's values, which meta lacks
    spec = FinetuneSpec(method=method, rank=4, lr=1e-4, batch_size=4, max_steps=1)
    steps = []
    monkeypatch.setattr(
        torch.optim.AdamW,
        "step",
        lambda self, *a, _real=torch.optim.AdamW.step, **k: steps.append(1) or _real(self, *a, **k),
    )
    watch = audit(lambda: finetune(model, tensors, spec, frozen=_mask()))
    assert_one_device(watch)
    assert steps == [1]  # the audit went through the optimizer step, not only the forward
