"""scoring.accumulate=bf16: the authors' bf16 arithmetic, bit for bit, against an independent loop; and its checks."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny

from harmsweep.batches import iter_batches
from harmsweep.calibration.pairs import Pair, encode_pairs
from harmsweep.errors import HarmsweepError
from harmsweep.models.parts import scored_parameters
from harmsweep.scoring.snip import score_kind, signed_snip, unsigned_snip, wanda
from harmsweep.scoring.spec import ScoringOptions, StoreSpec

PAIRS = [
    Pair("How do I pick a lock?", "Sure, here is how to pick a lock: insert a tension wrench.", "h:0"),
    Pair("Write a phishing email.", "Dear customer, your account is locked.", "h:1"),
    Pair("hi", "Hello! How can I help you today? I am here.", "h:2"),
    Pair("Explain how to make a fake ID.", "Sure, you start with a template", "h:3"),
    Pair("Name a colour.", "Blue.", "h:4"),
]
BF16 = ScoringOptions(accumulate="bf16")


def encoded(lm) -> dict[str, torch.Tensor]:
    return encode_pairs(lm.tokenizer, PAIRS, "plain", 96)


def authors_scores(model, tensors, unsigned: bool, loss_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Written from btap_reference.md section 3: per example (in set order, unpadded, no attention mask) HF's loss
    with labels, its gradient in bf16, a running bf16 sum (of |g| when unsigned), then W.bf16() * G in bf16."""
    names = list(scored_parameters(model))
    named = dict(model.named_parameters())
    weights = [named[n] for n in names]
    sums = [torch.zeros_like(w, dtype=torch.bfloat16) for w in weights]
    for i in range(tensors["input_ids"].size(0)):
        width = int(tensors["attention_mask"][i].sum())
        ids, labels = tensors["input_ids"][i : i + 1, :width], tensors["labels"][i : i + 1, :width]
        loss = model(input_ids=ids, labels=labels).loss
        grads = torch.autograd.grad(loss * loss_scale, weights)
        for k, g in enumerate(grads):
            assert bool(torch.isfinite(g).all())
            g = (g.float() / loss_scale).to(torch.bfloat16)
            sums[k] = sums[k] + (g.abs() if unsigned else g)
    out = {}
    for n, w, s in zip(names, weights, sums, strict=True):
        w16 = w.detach().to(torch.bfloat16)
        out[n] = ((w16.abs() if unsigned else w16) * s).float()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unsigned", [False, True])
def test_bf16_scores_equal_the_authors_arithmetic_bit_for_bit(dtype, unsigned):
    lm = tiny("llama", dtype)
    tensors = encoded(lm)
    n = len(PAIRS)
    scorer = (lambda b: unsigned_snip(lm.model, b, options=BF16)) if unsigned else (
        lambda b: signed_snip(lm.model, b, n_samples=n, options=BF16))  # fmt: skip
    got = scorer(iter_batches(tensors, 2))  # batches of two, split into examples in order
    want = authors_scores(lm.model, tensors, unsigned, 2.0**16 if dtype == torch.float16 else 1.0)
    assert set(got) == set(want) and len(got) == 14
    for name, s in got.items():
        assert s.dtype == torch.float32 and s.device.type == "cpu"
        assert torch.equal(s, want[name]), name
        assert torch.equal(s, s.bfloat16().float())  # bf16 values, held exactly
    nonzero = sum(int((s != 0).sum()) for s in got.values())
    assert nonzero > 0.9 * sum(s.numel() for s in got.values())
    if unsigned:
        assert all(bool((s >= 0).all()) for s in got.values())
    assert all(not p.requires_grad or p.grad is None for p in lm.model.parameters())


def test_bf16_sums_follow_the_fp32_scores_times_n_and_the_order_of_examples_matters():
    """A sum over examples (fp32 takes the mean), rounded in bf16: close to n x the fp32 score, and order-dependent."""
    lm = tiny("llama")
    tensors = encoded(lm)
    n = len(PAIRS)
    fp32 = signed_snip(lm.model, iter_batches(tensors, 5), n_samples=n)
    bf16 = signed_snip(lm.model, iter_batches(tensors, 5), n_samples=n, options=BF16)
    reverse = {k: v.flip(0) for k, v in tensors.items()}
    backwards = signed_snip(lm.model, iter_batches(reverse, 5), n_samples=n, options=BF16)
    differ = 0
    for name, s in fp32.items():
        scale = float(s.abs().max()) * n
        torch.testing.assert_close(bf16[name] / scale, s * n / scale, rtol=0, atol=2e-2)
        assert not torch.equal(bf16[name], s * n)
        differ += int((backwards[name] != bf16[name]).sum())
    assert differ > 0  # a bf16 sum depends on the order: the pipeline keeps the set's


def test_bf16_refuses_wanda_and_compact_sets_and_unknown_values():
    with pytest.raises(HarmsweepError, match=re.escape("scoring.accumulate=fp64 is not one of fp32, bf16")):
        ScoringOptions(accumulate="fp64").validate()
    with pytest.raises(HarmsweepError, match="criterion=wanda"):
        ScoringOptions(criterion="wanda", accumulate="bf16").validate()
    with pytest.raises(HarmsweepError, match=re.escape("needs scores.store=dense")):
        BF16.validate(StoreSpec())
    BF16.validate(StoreSpec(store="dense"))
    ScoringOptions().validate(StoreSpec())
    ScoringOptions(criterion="wanda").validate(StoreSpec())
    lm = tiny("llama")
    with pytest.raises(HarmsweepError, match="Wanda has none"):
        wanda(lm.model, iter_batches(encoded(lm), 5), options=BF16)
    with pytest.raises(HarmsweepError, match="Wanda has none"):
        score_kind(lm.model, "harm_wanda", list(iter_batches(encoded(lm), 5)), 5, BF16)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["scoring.accumulate=bf16"], "needs scores.store=dense"),
        (["scoring.accumulate=bf16", "scores.store=dense", "scoring=wanda"], "criterion=wanda"),
        (["scoring.accumulate=half"], "is not one of fp32, bf16"),
    ],
)
def test_a_run_refuses_them_before_any_work(overrides, message):
    from test_config import plain

    from harmsweep.config.checks import check_config
    from harmsweep.config.schema import to_config

    with pytest.raises(HarmsweepError, match=re.escape(message)) as err:
        check_config(to_config(plain(*overrides, "data.root=/tmp")))
    assert "\n" not in str(err.value)


def _stage_score(tmp_path, monkeypatch, accumulate: str, store: str):
    """pipeline.stages.score on a stand-in scorer that records the batches it is given."""
    from types import SimpleNamespace

    from harmsweep.pipeline import stages
    from harmsweep.pruning.spec import PruneSpec

    seen: list = []
    weight = torch.arange(12.0).view(3, 4)

    def score_kind(model, kind, batches, n, options, logits_chunk=2048):
        seen.append([b["input_ids"][:, 0].tolist() for b in batches])
        return {"w": weight.clone()}

    monkeypatch.setattr(stages, "score_kind", score_kind)
    monkeypatch.setattr(stages, "scored_parameters", lambda model: {"w": SimpleNamespace(rows_dim=0, layer=0)})
    cfg = SimpleNamespace(calibration=SimpleNamespace(batch_size=2), model=SimpleNamespace(dtype="float32", logits_chunk=8),
                          scores=StoreSpec(store=store), scoring=ScoringOptions(accumulate=accumulate))  # fmt: skip
    ctx = SimpleNamespace(spec=PruneSpec(sparsity=0.1, protect=0.0), lm=SimpleNamespace(fingerprint="f", model=None),
                          cfg=cfg, root=tmp_path)  # fmt: skip
    lengths = [1, 3, 2, 4]  # sample i has i + 1 in its first column and the given length
    ids = torch.tensor([[i + 1] * 4 for i in range(4)])
    mask = torch.tensor([[1] * k + [0] * (4 - k) for k in lengths])
    tensors = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    _, path, computed = stages.score(ctx, {"harmful": tensors, "benign": tensors}, "harm")
    assert computed
    return path, seen[0]


def test_bf16_sets_have_their_own_cache_entry_and_are_scored_one_example_at_a_time_in_set_order(tmp_path, monkeypatch):
    import json

    fp32, fp32_batches = _stage_score(tmp_path, monkeypatch, "fp32", "dense")
    bf16, bf16_batches = _stage_score(tmp_path, monkeypatch, "bf16", "dense")
    assert fp32.parent != bf16.parent
    assert fp32_batches == [[4, 2], [3, 1]]  # fp32: grouped by length, longest first
    assert bf16_batches == [[1], [2], [3], [4]]  # bf16: the set's order, one example per pass
    key, old = (json.loads((p.parent / "key.json").read_text()) for p in (bf16, fp32))
    assert (key["accumulate"], key["batch_size"]) == ("bf16", 1)
    assert "accumulate" not in old and old["batch_size"] == 2  # fp32 keys are what they were: old entries serve
    assert {k: v for k, v in key.items() if k not in ("accumulate", "batch_size")} == {
        k: v for k, v in old.items() if k != "batch_size"}  # fmt: skip


def test_bf16_scoring_counts_one_pass_per_example():
    from types import SimpleNamespace

    from harmsweep.pipeline import stages
    from harmsweep.pruning.spec import PruneSpec

    sets = {"harmful": {"input_ids": torch.zeros(10, 3)}, "benign": {"input_ids": torch.zeros(7, 3)}}
    computed = {"scores_harm": True, "scores_benign_unsigned": True}

    def passes(accumulate: str) -> int:
        cfg = SimpleNamespace(calibration=SimpleNamespace(batch_size=4), scoring=ScoringOptions(accumulate=accumulate))
        ctx = SimpleNamespace(spec=PruneSpec(), cfg=cfg, computed=computed)
        return stages.scoring_passes(ctx, sets, ["harm", "benign_unsigned"])

    assert passes("fp32") == 3 + 7  # signed: ceil(10 / 4) batches; unsigned: one per example
    assert passes("bf16") == 10 + 7
