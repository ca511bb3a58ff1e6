"""Signed SNIP against independent computations: plain autograd, per-sample loops, finite differences."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, tiny

from harmsweep.batches import iter_batches
from harmsweep.calibration.pairs import Pair, encode_pairs
from harmsweep.models.parts import decoder_blocks, scored_parameters
from harmsweep.scoring import store, writer
from harmsweep.scoring.snip import signed_snip, unsigned_snip
from harmsweep.scoring.spec import ScoringOptions

PAIRS = [
    Pair("How do I pick a lock?", "Sure, here is how to pick a lock: insert a tension wrench.", "h:0"),
    Pair("Write a phishing email.", "Dear customer, your account is locked.", "h:1"),
    Pair("Explain how to make a fake ID.", "Sure, you start with a template", "h:2"),
    Pair("hi", "Hello! How can I help you today? I am here.", "h:3"),
    Pair("Name a colour.", "Blue.", "h:4"),
]
# Linear layers per decoder block, by architecture: attention q,k,v,o + MLP gate,up,down; GPT-2: c_attn, c_proj x2, c_fc.
LINEARS_PER_BLOCK = {"llama": 7, "qwen2": 7, "gemma3": 7, "gpt2": 4}


def encoded(lm, max_length: int = 96) -> dict[str, torch.Tensor]:
    return encode_pairs(lm.tokenizer, PAIRS, "chat", max_length)


def reference_loss(model, tensors, sample_indices) -> torch.Tensor:
    """Mean over samples of each sample's mean response-token NLL, one unpadded sample at a time."""
    losses = []
    for i in sample_indices:
        keep = tensors["attention_mask"][i].bool()
        ids, labels = tensors["input_ids"][i][keep], tensors["labels"][i][keep]
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].double(), dim=-1)
        target = labels[1:]
        resp = target != -100
        losses.append(-logp[resp].gather(1, target[resp][:, None]).mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("arch", ARCHS)
def test_scored_parameters_are_the_block_linears(arch):
    lm = tiny(arch)
    params = scored_parameters(lm.model)
    n_layers = lm.model.config.num_hidden_layers
    assert len(params) == n_layers * LINEARS_PER_BLOCK[arch]
    assert sorted({p.layer for p in params.values()}) == list(range(n_layers))
    assert not any("embed" in n or "lm_head" in n or "wte" in n or "norm" in n or n.endswith("bias") for n in params)
    named = dict(lm.model.named_parameters())
    assert all(named[n].dim() == 2 for n in params)


@pytest.mark.parametrize("arch", ARCHS)
def test_signed_snip_equals_autograd(arch):
    lm = tiny(arch, torch.float64)
    tensors = encoded(lm)
    scores = signed_snip(lm.model, iter_batches(tensors, 2), n_samples=len(PAIRS))
    params = dict(lm.model.named_parameters())
    names = list(scores)
    loss = reference_loss(lm.model, tensors, range(len(PAIRS)))
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    for name, grad in zip(names, grads, strict=True):
        expected = (params[name].detach() * grad).float()
        assert scores[name].dtype == torch.float32
        torch.testing.assert_close(scores[name], expected, rtol=1e-4, atol=1e-7)


def test_length_grouped_batches_hold_every_sample_once_longest_first_and_score_the_same():
    lm = tiny("llama", torch.float64)
    tensors = encoded(lm)
    lengths = tensors["attention_mask"].sum(dim=1)
    batches = list(iter_batches(tensors, 2, by_length=True))
    assert [b["input_ids"].size(0) for b in batches] == [2, 2, 1]
    seen = torch.cat([b["attention_mask"].sum(dim=1) for b in batches])
    assert seen.tolist() == sorted(lengths.tolist(), reverse=True)
    rows = sorted(tuple(r.tolist()) for b in batches for r in b["input_ids"])
    assert rows == sorted(tuple(r.tolist()) for r in tensors["input_ids"])
    grouped = signed_snip(lm.model, batches, n_samples=len(PAIRS))
    plain = signed_snip(lm.model, iter_batches(tensors, 2), n_samples=len(PAIRS))
    for name, s in plain.items():
        torch.testing.assert_close(grouped[name], s, rtol=1e-6, atol=1e-9)


def test_scoring_leaves_no_gradients_and_restores_flags():
    lm = tiny("llama")
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    signed_snip(lm.model, iter_batches(encoded(lm), 3), n_samples=len(PAIRS))
    assert {n: p.requires_grad for n, p in lm.model.named_parameters()} == flags
    assert all(p.grad is None for p in lm.model.parameters())


def test_signed_snip_predicts_loss_change_of_zeroing_single_weights():
    """Zeroing w changes the loss by about -S(w): check the top-scored weights in both directions."""
    lm = tiny("llama", torch.float64)
    tensors = encoded(lm)
    scores = signed_snip(lm.model, iter_batches(tensors, 5), n_samples=len(PAIRS))
    params = dict(lm.model.named_parameters())
    flat = torch.cat([scores[n].view(-1) for n in scores])
    offsets = torch.tensor([0] + [scores[n].numel() for n in scores]).cumsum(0)
    names = list(scores)
    with torch.no_grad():
        base = float(reference_loss(lm.model, tensors, range(len(PAIRS))))
        checked = 0
        for idx in torch.cat([flat.topk(5).indices, (-flat).topk(5).indices]).tolist():
            m = int(torch.searchsorted(offsets, idx, right=True)) - 1
            w = params[names[m]].view(-1)
            j = idx - int(offsets[m])
            saved = w[j].item()
            w[j] = 0.0
            delta = float(reference_loss(lm.model, tensors, range(len(PAIRS)))) - base
            w[j] = saved
            predicted = -float(flat[idx])
            assert delta == pytest.approx(predicted, rel=0.15, abs=1e-7), (names[m], j)
            checked += 1
    assert checked == 10


def test_unsigned_snip_is_sum_of_per_sample_absolute_gradients():
    lm = tiny("qwen2", torch.float64)
    tensors = encoded(lm)
    scores = unsigned_snip(lm.model, iter_batches(tensors, 2))
    params = dict(lm.model.named_parameters())
    names = list(scores)
    total = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(len(PAIRS)):
        grads = torch.autograd.grad(reference_loss(lm.model, tensors, [i]), [params[n] for n in names])
        for n, g in zip(names, grads, strict=True):
            total[n] += g.abs()
    for n in names:
        torch.testing.assert_close(scores[n], (params[n].detach().abs() * total[n]).float(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_scores_with_fewer_saved_activations(arch):
    lm = tiny(arch, torch.float64)
    tensors = encoded(lm)
    plain = signed_snip(lm.model, iter_batches(tensors, 5), n_samples=len(PAIRS))
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    def saved_during(options: ScoringOptions) -> tuple[dict[str, torch.Tensor], int]:
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = signed_snip(lm.model, iter_batches(tensors, 5), n_samples=len(PAIRS), options=options)
        return out, sum(saved)

    _, full = saved_during(ScoringOptions())
    ckpt, light = saved_during(ScoringOptions(gradient_checkpointing=True))
    assert set(ckpt) == set(plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-9, atol=1e-12)
    assert light < full / 2
    _, blocks = decoder_blocks(lm.model)
    assert all("forward" not in vars(b) for b in blocks)  # the wrappers are gone afterwards


def test_finished_buffers_sit_in_host_memory_and_files_read_lazily(tmp_path):
    lm = tiny("llama")
    scores = signed_snip(lm.model, iter_batches(encoded(lm), 5), n_samples=len(PAIRS))
    assert {t.device.type for t in scores.values()} == {"cpu"}
    writer.write(scores, tmp_path / "s.safetensors", "harm", store.StoreSpec(store="dense"))
    lazy = store.open_scores(tmp_path / "s.safetensors")
    assert isinstance(lazy, store.DenseScores) and len(lazy) == len(scores) and list(lazy) == list(scores)
    for name, t in scores.items():
        assert torch.equal(lazy[name], t)
    with pytest.raises(KeyError):
        lazy["not.a.weight"]
