"""ActSVD removal and the recorded layer inputs against independent computations.

The references use an explicit SVD of W X^T (float64) on inputs X captured by plain hooks, one unpadded
sample at a time: no Gram, no eigh, no batching, no partial forward.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny
from test_scoring import encoded

from harmsweep.batches import iter_batches
from harmsweep.calibration.pairs import Pair, encode_pairs
from harmsweep.errors import HarmsweepError
from harmsweep.models.activations import fold_inputs
from harmsweep.models.parts import decoder_blocks, scored_parameters
from harmsweep.pruning.lowrank import projector, removal, remove_low_rank
from harmsweep.pruning.spec import LowRankSpec

BENIGN = [
    Pair("Name a fruit.", "An apple is a crisp and sweet fruit that grows on trees.", "b:0"),
    Pair("What is 2+2?", "Two plus two is four, the first sum most children learn.", "b:1"),
    Pair("Say hello.", "Hello there! It is nice to meet you on this fine day.", "b:2"),
    Pair("Describe rain.", "Rain is water falling from clouds in drops.", "b:3"),
]


# ---------------------------------------------------------------- references


def svd_projector(w: torch.Tensor, x: torch.Tensor, rank: int) -> torch.Tensor:
    """U_r U_r^T with U the left singular vectors of W X^T (float64, explicit SVD) that carry signal."""
    u, s, _ = torch.linalg.svd(w.double() @ x.double().T, full_matrices=False)
    u = u[:, : min(rank, int((s > s[0] * max(u.shape) * 1e-15).sum()))]
    return u @ u.T


def reference_delta(w: torch.Tensor, x_h: torch.Tensor, x_u: torch.Tensor | None, r_h: int, r_u: int) -> torch.Tensor:
    w = w.double()
    p_h = svd_projector(w, x_h, r_h)
    p_u = svd_projector(w, x_u, r_u) if r_u else torch.zeros_like(p_h)
    return (torch.eye(w.size(0), dtype=torch.float64) - p_u) @ p_h @ w


def captured_inputs(model, tensors, names, tokens: str = "response") -> dict[str, torch.Tensor]:
    """Each named linear's input rows (float64) at ``tokens``, from a full forward per unpadded sample."""
    modules = {n.removesuffix(".weight"): n for n in names}
    last: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda m, args, n=modules[k]: last.__setitem__(n, args[0][0]))
               for k, m in model.named_modules() if k in modules]  # fmt: skip
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    try:
        with torch.no_grad():
            for i in range(tensors["input_ids"].size(0)):
                keep = tensors["attention_mask"][i].bool()
                model(input_ids=tensors["input_ids"][i][keep][None])
                at = tensors["labels"][i][keep] != -100 if tokens == "response" else torch.ones_like(keep[keep])
                for n in names:
                    rows[n].append(last[n][at].double())
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def remove_by_hand(model, harmful, benign, r_h: int, r_u: int, all_at_once: bool = False) -> None:
    """ActSVD block by block (or, with ``all_at_once``, every block from the unchanged model's inputs)."""
    rows = scored_parameters(model)
    named = dict(model.named_parameters())
    layers = sorted({r.layer for r in rows.values()})
    every = list(rows)
    first = (captured_inputs(model, harmful, every), captured_inputs(model, benign, every)) if all_at_once else None
    for layer in layers:
        names = [n for n, r in rows.items() if r.layer == layer]
        x_h, x_u = first or (captured_inputs(model, harmful, names), captured_inputs(model, benign, names))
        for n in names:
            conv = rows[n].rows_dim == 1
            p = named[n]
            w = p.detach().T if conv else p.detach()
            delta = reference_delta(w, x_h[n], x_u[n], r_h, r_u).float()
            with torch.no_grad():
                p.sub_(delta.T if conv else delta)


def rank_of(change: torch.Tensor) -> int:
    """The rank of a float32 weight's change: singular values above its rounding."""
    return int(torch.linalg.matrix_rank(change.detach().double(), rtol=1e-4))


def harmful_and_benign(lm) -> tuple[dict, dict]:
    return encoded(lm), encode_pairs(lm.tokenizer, BENIGN, "chat", 96)


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# ---------------------------------------------------------------- the math


@pytest.mark.parametrize("shape", [(12, 16), (20, 8)])
@pytest.mark.parametrize("rank", [0, 1, 5, 8, 100])
def test_projector_equals_svd_of_w_xt(shape, rank):
    torch.manual_seed(0)
    w, x = torch.randn(shape), torch.randn(50, shape[1])
    p = projector(w, x.T @ x, rank)
    assert p.dtype == torch.float32 and p.shape == (shape[0], shape[0])
    torch.testing.assert_close(p.double(), svd_projector(w, x, rank), rtol=1e-4, atol=1e-5)
    assert float(p.trace()) == pytest.approx(min(rank, *shape), abs=1e-4)  # an orthogonal projection of that rank


@pytest.mark.parametrize("shape", [(12, 16), (20, 8)])
@pytest.mark.parametrize(("r_h", "r_u"), [(1, 0), (4, 0), (4, 3), (6, 10)])
def test_removal_equals_explicit_formula(shape, r_h, r_u):
    torch.manual_seed(1)
    w, x_h, x_u = torch.randn(shape), torch.randn(40, shape[1]), torch.randn(60, shape[1]) + 0.5
    delta = removal(w, x_h.T @ x_h, x_u.T @ x_u, r_h, r_u)
    assert delta.dtype == w.dtype and delta.shape == w.shape
    torch.testing.assert_close(delta.double(), reference_delta(w, x_h, x_u, r_h, r_u), rtol=1e-4, atol=1e-5)


def test_removal_bounds_rank_and_spares_the_utility_subspace():
    torch.manual_seed(2)
    w, x_h, x_u = torch.randn(16, 24), torch.randn(40, 24), torch.randn(40, 24)
    g_h, g_u = x_h.T @ x_h, x_u.T @ x_u
    assert torch.equal(removal(w, g_h, g_u, 0, 5), torch.zeros_like(w))  # r_h = 0: nothing
    assert removal(w, g_h, g_u, 4, 16).abs().max() < 1e-5  # the utility subspace is everything
    for r_u in (0, 3, 7):
        delta = removal(w, g_h, g_u, 4, r_u)
        assert int(torch.linalg.matrix_rank(delta.double(), rtol=1e-6)) == 4
        assert (projector(w, g_u, r_u) @ delta).abs().max() < 1e-5  # none of it lies in the utility subspace
    torch.testing.assert_close(removal(w, g_h, None, 1000, 0), w, rtol=1e-4, atol=1e-5)  # clipped: all of W


def test_removal_keeps_dtype():
    torch.manual_seed(3)
    w, x = torch.randn(12, 16), torch.randn(40, 16)
    exact = removal(w, x.T @ x, None, 3, 0)
    half = removal(w.bfloat16(), x.T @ x, None, 3, 0)
    assert half.dtype == torch.bfloat16 and half.shape == w.shape
    torch.testing.assert_close(half.float(), exact, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(("spec", "message"), [(LowRankSpec(-1, 0), "ranks"), (LowRankSpec(1, -2), "ranks"),
                                               (LowRankSpec(tokens="prompt"), "tokens")])  # fmt: skip
def test_spec_validation(spec, message):
    with pytest.raises(HarmsweepError, match=message):
        spec.validate()
    LowRankSpec().validate()


# ---------------------------------------------------------------- recorded inputs


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_fold_inputs_equals_captured_rows_and_selects_the_tokens(tokens):
    lm = tiny("llama")
    tensors = encoded(lm)
    names = ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    folded: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    fold_inputs(lm.model, iter_batches(tensors, 2), names, lambda n, x: folded[n].append(x), tokens=tokens)
    expected = captured_inputs(lm.model, tensors, names, tokens)
    for n in names:
        assert all(x.dtype == torch.float32 for x in folded[n])
        torch.testing.assert_close(torch.cat(folded[n]).double(), expected[n], rtol=1e-4, atol=1e-5)
        counted = [b["labels"] != -100 if tokens == "response" else b["attention_mask"] == 1
                   for b in iter_batches(tensors, 2)]  # fmt: skip
        assert [x.size(0) for x in folded[n]] == [int(c.sum()) for c in counted]
    assert hook_count(lm.model) == 0


def test_fold_inputs_upto_layer_stops_after_that_block_and_always_removes_hooks():
    lm = tiny("llama")
    tensors = encoded(lm)
    _, blocks = decoder_blocks(lm.model)
    later: list[int] = []
    probe = blocks[-1].register_forward_pre_hook(lambda m, args: later.append(1))
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    seen: dict[str, int] = dict.fromkeys(names, 0)
    try:
        fold_inputs(lm.model, iter_batches(tensors, 2), names,
                    lambda n, x: seen.__setitem__(n, seen[n] + 1), upto_layer=0)  # fmt: skip
    finally:
        probe.remove()
    assert later == [] and seen == {names[0]: 3, names[1]: 0}
    assert hook_count(lm.model) == 0

    def failing(name, x):
        raise RuntimeError("fold failed")

    with pytest.raises(RuntimeError, match="fold failed"):
        fold_inputs(lm.model, iter_batches(tensors, 2), names, failing, upto_layer=1)
    assert hook_count(lm.model) == 0
    with pytest.raises(ValueError, match="upto_layer"):
        fold_inputs(lm.model, iter_batches(tensors, 2), names, failing, upto_layer=2)
    with pytest.raises(ValueError, match="tokens"):
        fold_inputs(lm.model, iter_batches(tensors, 2), names, failing, tokens="prompt")
    assert hook_count(lm.model) == 0


# ---------------------------------------------------------------- removal in a model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_remove_low_rank_equals_block_by_block_by_hand(arch):
    harmful, benign = harmful_and_benign(tiny(arch))
    lm, ref = tiny(arch), tiny(arch)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    spec = LowRankSpec(rank_harmful=6, rank_utility=3)
    stats = remove_low_rank(lm.model, iter_batches(harmful, 2, by_length=True), iter_batches(benign, 3), spec)
    remove_by_hand(ref.model, harmful, benign, 6, 3)
    rows = scored_parameters(lm.model)
    assert set(stats) == set(rows)
    got, expected = dict(lm.model.named_parameters()), dict(ref.model.named_parameters())
    for n, p in got.items():
        if n not in rows:
            assert torch.equal(p, before[n]), n  # only scored matrices change
            continue
        torch.testing.assert_close(p.detach(), expected[n].detach(), rtol=1e-3, atol=1e-5, msg=n)
        assert stats[n]["rank_removed"] == 6
        norm = float((before[n] - expected[n].detach()).norm() / before[n].norm())
        assert stats[n]["relative_norm"] == pytest.approx(norm, rel=1e-3)
        assert stats[n]["relative_norm"] > 0


def test_each_block_sees_the_blocks_below_already_changed():
    harmful, benign = harmful_and_benign(tiny())
    lm, at_once = tiny(), tiny()
    remove_low_rank(lm.model, iter_batches(harmful, 2), iter_batches(benign, 2), LowRankSpec(8, 0))
    remove_by_hand(at_once.model, harmful, benign, 8, 0, all_at_once=True)
    got, other = dict(lm.model.named_parameters()), dict(at_once.model.named_parameters())
    for n, r in scored_parameters(lm.model).items():
        gap = float((got[n] - other[n]).detach().abs().max())
        if r.layer == 0:
            assert gap < 1e-5, n  # block 0 sees the same inputs either way
        else:
            assert gap > 1e-3, n  # block 1's inputs come from the changed block 0


def test_names_limit_the_change_and_rank_zero_reads_nothing():
    harmful = encoded(tiny())
    lm = tiny()
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}

    class Unreadable:
        def __iter__(self):
            raise AssertionError("this set should not be read")

    names = ["model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    x = captured_inputs(lm.model, harmful, names[:1])[names[0]]  # block 0's inputs span 29 of 64 dimensions
    stats = remove_low_rank(lm.model, iter_batches(harmful, 2), Unreadable(), LowRankSpec(100, 0), names)
    assert set(stats) == set(names)
    assert stats[names[1]]["rank_removed"] == 64  # clipped to min(d_out, d_in) of the 128 x 64 matrix
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]) != (n in names), n
    # v_proj (32 x 64) with r_h >= its 29 directions: all it writes on the data is gone, nothing else of it
    assert stats[names[0]]["rank_removed"] == 29 == rank_of(before[names[0]] - lm.model.get_parameter(names[0]))
    assert float((lm.model.get_parameter(names[0]).detach().double() @ x.T).abs().max()) < 1e-5
    stats = remove_low_rank(lm.model, Unreadable(), Unreadable(), LowRankSpec(0, 4))
    assert all(s == {"rank_removed": 0, "relative_norm": 0.0} for s in stats.values())


def test_a_bf16_weight_is_rounded_once():
    """Removing all of v_proj leaves zeros in bf16 too: W - Delta is formed in float64, then rounded."""
    lm = tiny("llama", torch.bfloat16)
    name = "model.layers.1.self_attn.v_proj.weight"  # its inputs span all 32 output directions
    remove_low_rank(lm.model, iter_batches(encoded(lm), 2), [], LowRankSpec(100, 0), [name])
    weight = dict(lm.model.named_parameters())[name]
    assert weight.dtype == torch.bfloat16 and float(weight.detach().abs().max()) < 1e-6


def test_a_set_without_tokens_is_an_error():
    harmful, benign = harmful_and_benign(tiny())
    lm = tiny()
    empty = {**harmful, "labels": torch.full_like(harmful["labels"], -100)}
    with pytest.raises(HarmsweepError, match="no harmful calibration tokens"):
        remove_low_rank(lm.model, iter_batches(empty, 2), iter_batches(benign, 2), LowRankSpec(2, 0))
    with pytest.raises(HarmsweepError, match="no benign calibration tokens"):
        remove_low_rank(lm.model, iter_batches(harmful, 2), [], LowRankSpec(2, 1))


def test_a_wide_output_is_solved_on_the_input_side_and_ignores_unreached_directions():
    from harmsweep.pruning.lowrank import projector as project

    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 6, generator=g, dtype=torch.float64)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    x[:, 5] = 0  # one input direction the data never reaches: W X^T has rank 5
    p = project(w, x.T @ x, 6).double()
    u = torch.linalg.svd(w @ x.T, full_matrices=False).U[:, :5]
    torch.testing.assert_close(p, u @ u.T, atol=1e-6, rtol=0)  # rank 5, no garbage column for the sixth
