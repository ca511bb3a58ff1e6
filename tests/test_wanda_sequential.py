"""Wanda scores against a direct computation, and sequential masks against a layer-by-layer re-implementation."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny
from test_scoring import encoded

from harmsweep.batches import iter_batches
from harmsweep.models.parts import scored_parameters
from harmsweep.pruning.masks import apply_mask
from harmsweep.pruning.select import select
from harmsweep.pruning.sequential import select_sequential
from harmsweep.pruning.spec import PruneSpec
from harmsweep.scoring.snip import signed_snip, wanda


def direct_wanda(model, tensors) -> dict[str, torch.Tensor]:
    """|W| * sqrt(mean x^2) over response tokens, from inputs captured by plain forward hooks on each sample."""
    params = scored_parameters(model)
    modules = {n.rsplit(".", 1)[0]: n for n in params}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    handles = []
    for mod_name, module in model.named_modules():
        if mod_name in modules:
            name = modules[mod_name]
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: rows[name].append(args[0][0])))
    named = dict(model.named_parameters())
    out = {}
    try:
        with torch.no_grad():
            for i in range(tensors["input_ids"].size(0)):
                keep = tensors["attention_mask"][i].bool()
                for r in rows.values():
                    r.clear()
                model(input_ids=tensors["input_ids"][i][keep][None])
                resp = tensors["labels"][i][keep] != -100
                for n in params:
                    out.setdefault(n, []).append(rows[n][0][resp].double())
    finally:
        for h in handles:
            h.remove()
    scores = {}
    for n, p in params.items():
        x = torch.cat(out[n])
        norm = x.pow(2).mean(0).sqrt()
        w = named[n].detach().double().abs()
        scores[n] = w * (norm[None, :] if p.rows_dim == 0 else norm[:, None])
    return scores


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_wanda_equals_direct_computation(arch):
    lm = tiny(arch)
    tensors = encoded(lm)
    got = wanda(lm.model, list(iter_batches(tensors, 2, by_length=True)))
    expected = direct_wanda(lm.model, tensors)
    assert set(got) == set(expected)
    for n in got:
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n].double(), expected[n], rtol=1e-4, atol=1e-7)


def test_wanda_works_with_every_rule():
    lm = tiny("llama")
    tensors = encoded(lm)
    batches = list(iter_batches(tensors, 2, by_length=True))
    params = scored_parameters(lm.model)
    named = dict(lm.model.named_parameters())
    weights = {n: named[n] for n in params}
    scores = {"harm_wanda": wanda(lm.model, batches), "benign_wanda": wanda(lm.model, batches[::-1])}
    n_total = sum(w.numel() for w in weights.values())
    for rule in ("signed_snip", "no_set_difference", "unsigned_snip", "magnitude", "random"):
        spec = PruneSpec(rule=rule, sparsity=0.01, protect=0.01, criterion="wanda")
        assert spec.needed_scores() <= {"harm_wanda", "benign_wanda"}
        mask = select(spec, params, weights, {k: scores[k] for k in spec.needed_scores()})
        assert sum(i.numel() for i in mask.values()) == round(0.01 * n_total), rule


def test_sequential_mask_equals_layer_by_layer_reimplementation():
    lm = tiny("llama")
    model = lm.model
    tensors = encoded(lm)
    batches = list(iter_batches(tensors, 2, by_length=True))
    n = tensors["input_ids"].size(0)
    params = scored_parameters(model)
    named = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    spec = PruneSpec(rule="no_set_difference", granularity="matrix", sparsity=0.05, sequential=True)

    calls = []

    def layer_scores(kind, names, layer):
        calls.append((kind, layer))
        return signed_snip(model, batches, n, names=names)

    got = select_sequential(spec, params, model, layer_scores, lambda m: apply_mask(model, m))
    assert calls == [("harm", 0), ("harm", 1)]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is left as found

    # independently: full-model scores, keep layer l's, prune it, rescore the whole model for layer l + 1
    single = PruneSpec(rule="no_set_difference", granularity="matrix", sparsity=0.05)
    expected = {}
    for layer in (0, 1):
        names = [k for k, p in params.items() if p.layer == layer]
        scores = signed_snip(model, batches, n)
        chosen = select(single, {k: params[k] for k in names}, {k: named[k] for k in names},
                        {"harm": {k: scores[k] for k in names}})  # fmt: skip
        apply_mask(model, chosen)
        expected.update(chosen)
    model.load_state_dict(before)
    assert set(got) == set(expected)
    for k in got:
        assert torch.equal(got[k], expected[k]), k
    one_pass = select(single, params, {k: named[k] for k in params}, {"harm": signed_snip(model, batches, n)})
    layer1 = [k for k, p in params.items() if p.layer == 1]
    assert any(not torch.equal(one_pass[k], got[k]) for k in layer1)  # lower pruning moves the upper masks
    assert all(torch.equal(one_pass[k], got[k]) for k, p in params.items() if p.layer == 0)
