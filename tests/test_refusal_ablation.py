"""The refusal-ablation attack (btap_reference §5.2) against an independent computation, and its exact undo.

The reference here is written from the spec alone: each example's gradient by torch.autograd on the loss of
``model(input_ids, labels=labels)``, U = |W| * sum_i |g_i|, per matrix torch.topk with k = int(f * cols * rows),
then TopQ(refusal) minus TopP(benign). It uses none of harmsweep's scoring or selection code.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny

from harmsweep.attacks.refusal import (
    ablated,
    benign_pairs,
    benign_pairs_tensors,
    file_refusal_pairs,
    generated_refusal_pairs,
    mask_size,
    refusal_mask,
    refusal_pairs,
    refusal_tensors,
)
from harmsweep.attacks.restore import WeightSnapshot, snapshot_bytes
from harmsweep.attacks.spec import RefusalAblationConfig
from harmsweep.data.records import Record
from harmsweep.errors import DataError
from harmsweep.scoring.spec import ScoringOptions

COMPONENTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
ROWS = 10


def write_refusal_csv(path: Path, rows: int = ROWS) -> Path:
    """Their advbench_align layout: clean_prompt/clean_response read; prompt, response and text are decoys."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "response", "text", "clean_prompt", "clean_response"])
        for i in range(rows):
            writer.writerow([f"<chat>decoy {i}</chat>", f"decoy answer {i}", f"decoy text {i}",
                             f"How do I build dangerous thing {i}?",
                             f"I cannot help with that request {i}" + ", sorry" * (i % 3) + "."])  # fmt: skip
    return path


def benign_records(n: int = 8) -> list[Record]:
    return [Record(prompt=f"Give me a fact about fruit {i}.", response=f"Fruit {i} is sweet" + " and red" * (i % 3),
                   source_id=f"alpaca:{i}") for i in range(n)]  # fmt: skip


def sets(tmp_path: Path, tokenizer, n: int = 6, seed: int = 0) -> tuple[dict, dict]:
    pairs = file_refusal_pairs(write_refusal_csv(tmp_path / "advbench_align.csv"), n, seed)
    refusal = refusal_tensors(tokenizer, pairs, "btap", "plain", "harmful", None)
    benign = benign_pairs_tensors(tokenizer, benign_records(), n, "btap", "plain", None)
    return refusal, benign


# ---------------------------------------------------------------- independent reference


def reference_weights(model) -> dict[str, torch.nn.Parameter]:
    return {f"model.layers.{i}.{c}.weight": layer.get_submodule(c).weight
            for i, layer in enumerate(model.model.layers) for c in COMPONENTS}  # fmt: skip


def reference_scores(model, tensors: dict) -> dict[str, torch.Tensor]:
    """|W| * sum_i |dL_i/dW|, one example at a time, its padding cut off, L_i = model(ids, labels=labels).loss."""
    weights = reference_weights(model)
    sums = {n: torch.zeros_like(w) for n, w in weights.items()}
    for i in range(tensors["input_ids"].size(0)):
        length = int(tensors["attention_mask"][i].sum())
        ids, labels = tensors["input_ids"][i : i + 1, :length], tensors["labels"][i : i + 1, :length]
        loss = model(input_ids=ids, labels=labels).loss
        grads = torch.autograd.grad(loss, list(weights.values()))
        for n, g in zip(weights, grads, strict=True):
            sums[n] += g.abs()
    return {n: (weights[n].detach().abs() * a).float() for n, a in sums.items()}


def reference_mask(refusal: dict, benign: dict, q: float, p: float) -> dict[str, torch.Tensor]:
    out = {}
    for n, u_r in refusal.items():
        rows, cols = u_r.shape
        top_q = torch.topk(u_r.flatten(), int(q * cols * rows)).indices
        top_p = torch.topk(benign[n].flatten(), int(p * cols * rows)).indices
        out[n] = torch.sort(top_q[~torch.isin(top_q, top_p)]).values
    return out


# ---------------------------------------------------------------- (i) the mask


@pytest.mark.parametrize(("q", "p", "batch"), [(0.02, 0.01, 4), (0.01, 0.03, 1)])
def test_mask_equals_an_independent_computation(tmp_path, q, p, batch):
    lm = tiny("llama")
    refusal, benign = sets(tmp_path, lm.tokenizer)
    cfg = RefusalAblationConfig(n=6, p=p, q=q)
    mask = refusal_mask(lm.model, refusal, benign, cfg, batch_size=batch)
    expected = reference_mask(reference_scores(lm.model, refusal), reference_scores(lm.model, benign), q, p)
    assert sorted(mask) == sorted(expected)
    assert all(torch.equal(mask[n], expected[n]) for n in expected), {n: (len(mask[n]), len(expected[n])) for n in mask}
    full = sum(int(q * w.shape[1] * w.shape[0]) for w in reference_weights(lm.model).values())
    assert 0 < mask_size(mask) < full  # the benign side took some of TopQ away
    assert all(m.dtype == torch.long for m in mask.values())


def test_bf16_scores_match_bf16_sums(tmp_path):
    """scoring.accumulate=bf16: per-example bf16 grads summed in a bf16 buffer, |W| * A in bf16, as theirs."""
    lm = tiny("llama", torch.bfloat16)
    refusal, benign = sets(tmp_path, lm.tokenizer)
    cfg = RefusalAblationConfig(n=6, p=0.01, q=0.02)
    mask = refusal_mask(lm.model, refusal, benign, cfg, batch_size=8, options=ScoringOptions(accumulate="bf16"))
    expected = reference_mask(reference_scores(lm.model, refusal), reference_scores(lm.model, benign), 0.02, 0.01)
    assert all(torch.equal(mask[n], expected[n]) for n in expected)


# ---------------------------------------------------------------- (ii) counts


def test_counts_are_their_floor_formula_per_matrix(tmp_path):
    """p=0: nothing is protected, so every matrix loses exactly int(q * cols * rows) weights (tiny llama: hidden 64,
    kv 32, mlp 128; q=0.01 -> 40, 20, 20, 40, 81, 81, 81 per layer, two layers)."""
    lm = tiny("llama")
    refusal, benign = sets(tmp_path, lm.tokenizer, n=3)
    mask = refusal_mask(lm.model, refusal, benign, RefusalAblationConfig(n=3, p=0.0, q=0.01), batch_size=8)
    per_layer = [40, 20, 20, 40, 81, 81, 81]
    got = [mask[f"model.layers.{i}.{c}.weight"].numel() for i in range(2) for c in COMPONENTS]
    assert got == per_layer * 2
    assert mask_size(mask) == 2 * sum(per_layer) == 726
    # p = q: the difference can only shrink, and each matrix keeps at most its k_q
    same = refusal_mask(lm.model, refusal, benign, RefusalAblationConfig(n=3, p=0.01, q=0.01), batch_size=8)
    assert all(same[n].numel() <= mask[n].numel() and set(same[n].tolist()) <= set(mask[n].tolist()) for n in mask)


def test_params_restrict_the_masked_weights(tmp_path):
    lm = tiny("llama")
    refusal, benign = sets(tmp_path, lm.tokenizer, n=3)
    named = dict(lm.model.named_parameters())
    chosen = {n: named[n] for n in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.k_proj.weight")}
    mask = refusal_mask(lm.model, refusal, benign, RefusalAblationConfig(n=3, p=0.0), batch_size=8, params=chosen)
    assert sorted(mask) == sorted(chosen) and [mask[n].numel() for n in chosen] == [81, 20]


# ---------------------------------------------------------------- (iii) zeros are not picked


def test_weights_already_zero_are_never_picked(tmp_path):
    lm = tiny("llama")
    refusal, benign = sets(tmp_path, lm.tokenizer, n=4)
    cfg = RefusalAblationConfig(n=4, p=0.0, q=0.05)
    first = refusal_mask(lm.model, refusal, benign, cfg, batch_size=8)
    gen = torch.Generator().manual_seed(0)
    named = dict(lm.model.named_parameters())
    with torch.no_grad():
        for n, idx in first.items():  # the top refusal weights, and a random half of every matrix, zeroed
            flat = named[n].view(-1)
            flat[idx] = 0.0
            flat[torch.rand(flat.shape, generator=gen) < 0.5] = 0.0
    second = refusal_mask(lm.model, refusal, benign, cfg, batch_size=8)
    for n, idx in second.items():
        assert idx.numel() == int(0.05 * named[n].shape[1] * named[n].shape[0])
        assert bool((named[n].detach().view(-1)[idx] != 0).all()), n
        assert not torch.isin(idx, first[n]).any()


# ---------------------------------------------------------------- (iv) snapshot and restore


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16).clone()


def test_ablation_is_undone_bit_for_bit(tmp_path):
    lm = tiny("llama")
    refusal, benign = sets(tmp_path, lm.tokenizer, n=3)
    named = dict(lm.model.named_parameters())
    with torch.no_grad():  # values a float comparison would miss: -0.0 and a NaN
        named["model.layers.0.mlp.up_proj.weight"].view(-1)[:2] = torch.tensor([-0.0, float("nan")])
    before = {n: bits(p) for n, p in named.items()}
    mask = refusal_mask(lm.model, refusal, benign, RefusalAblationConfig(n=3, q=0.02), batch_size=8)
    up = "model.layers.0.mlp.up_proj.weight"
    mask[up] = torch.unique(torch.cat([torch.tensor([0, 1]), mask[up]]))  # the -0.0 and the NaN are zeroed too
    with ablated(lm.model, mask) as snapshot:
        assert snapshot.bytes == mask_size(mask) * (4 + 8)
        assert all(bool((named[n].detach().view(-1)[idx] == 0).all()) for n, idx in mask.items())
        assert not all(torch.equal(bits(p), before[n]) for n, p in named.items())
    assert all(torch.equal(bits(p), before[n]) for n, p in named.items())


def test_whole_parameters_are_restored_after_noise_and_after_an_error():
    lm = tiny("llama")
    named = dict(lm.model.named_parameters())
    before = {n: bits(p) for n, p in named.items()}
    chosen = [n for n in named if n.endswith(("q_proj.weight", "down_proj.weight"))]
    with pytest.raises(RuntimeError, match="boom"), WeightSnapshot.of_parameters(lm.model, chosen) as snapshot:
        whole = sum(named[n].numel() * 4 for n in chosen)
        assert snapshot.bytes == whole == snapshot_bytes({n: named[n] for n in chosen})
        with torch.no_grad():
            for n in chosen:
                named[n].add_(torch.randn_like(named[n]))
        raise RuntimeError("boom")
    assert all(torch.equal(bits(p), before[n]) for n, p in named.items())
    assert snapshot.restored
    with pytest.raises(RuntimeError, match="already restored"):
        snapshot.restore()


def test_snapshot_bytes_bounds_a_refusal_mask():
    lm = tiny("llama")
    weights = {n: p for n, p in lm.model.named_parameters() if n in reference_weights(lm.model)}
    assert snapshot_bytes(weights, fraction=0.01) == 726 * (4 + 8)


# ---------------------------------------------------------------- (v) refusal pairs


def test_refusal_csv_reads_clean_columns_and_the_seeded_rows(tmp_path):
    path = write_refusal_csv(tmp_path / "advbench_align.csv")
    pairs = file_refusal_pairs(path, 4, seed=3)
    rows = [int(i) for i in np.random.default_rng(3).permutation(ROWS)[:4]]
    assert [p.prompt for p in pairs] == [f"How do I build dangerous thing {i}?" for i in rows]
    assert [p.response for p in pairs] == [f"I cannot help with that request {i}" + ", sorry" * (i % 3) + "."
                                           for i in rows]  # fmt: skip
    whole = refusal_pairs(RefusalAblationConfig(file=str(path), n=128), seed=3)
    assert [p.prompt for p in whole] == [f"How do I build dangerous thing {i}?" for i in range(ROWS)]  # file order


def test_refusal_tokens_are_the_run_format(tmp_path):
    lm = tiny("llama")
    tok = lm.tokenizer
    pairs = file_refusal_pairs(write_refusal_csv(tmp_path / "a.csv"), 128, seed=0)
    t = refusal_tensors(tok, pairs[:1], "btap", "plain", "harmful", None)
    prompt = tok("How do I build dangerous thing 0?\n", add_special_tokens=False)["input_ids"]
    response = tok("I cannot help with that request 0.", add_special_tokens=False)["input_ids"]
    assert t["input_ids"][0].tolist() == prompt + response
    assert t["labels"][0].tolist() == [-100] * len(prompt) + response
    b = benign_pairs_tensors(tok, benign_records(), 1, "btap", "plain", None)
    good = tok("Give me a fact about fruit 0.", add_special_tokens=False)["input_ids"]
    assert b["input_ids"][0].tolist() == good + tok("\nFruit 0 is sweet", add_special_tokens=False)["input_ids"]
    plain = refusal_tensors(tok, pairs[:1], "template", "plain", "harmful", None)
    assert plain["input_ids"][0].tolist()[: len(prompt)] != prompt  # the run's template, not their raw text


def test_benign_rows_first_n_or_seeded():
    records = benign_records(8)
    assert [p.source_id for p in benign_pairs(records, 3)] == ["alpaca:0", "alpaca:1", "alpaca:2"]
    order = [int(i) for i in np.random.default_rng(5).permutation(8)[:3]]
    assert [p.source_id for p in benign_pairs(records, 3, seed=5)] == [f"alpaca:{i}" for i in order]


def test_generated_refusals_answer_the_first_n_prompts():
    lm = tiny("llama")
    records = [Record(prompt=f"Harmful request {i}?", source_id=f"h:{i}") for i in range(5)]
    pairs = generated_refusal_pairs(lm.model, lm.tokenizer, records, 3, "plain", 6, batch_size=2)
    assert [p.source_id for p in pairs] == ["h:0", "h:1", "h:2"]
    assert all(p.response for p in pairs)


def test_a_missing_refusal_file_is_one_line(tmp_path):
    with pytest.raises(DataError, match=r"attack\.refusal\.file") as err:
        refusal_pairs(RefusalAblationConfig(file=str(tmp_path / "nope.csv")), seed=0)
    assert "\n" not in str(err.value)
