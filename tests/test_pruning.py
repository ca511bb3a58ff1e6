"""Masks: exact counts, set difference, sign convention, seeds, and the streaming top-k against a sort."""

from __future__ import annotations

import pytest
import torch

from harmsweep.errors import HarmsweepError
from harmsweep.models.parts import ScoredParam
from harmsweep.pruning.masks import apply_mask, mask_counts
from harmsweep.pruning.select import select
from harmsweep.pruning.spec import PruneSpec
from harmsweep.scoring.topk import EXCLUDED, float_keys, top_k_threshold

SHAPES = {"l0.q": (8, 16), "l0.down": (16, 12), "l1.q": (8, 16), "l1.c_fc": (16, 12)}
PARAMS = {
    "l0.q": ScoredParam("l0.q", 0, "q_proj", 0),
    "l0.down": ScoredParam("l0.down", 0, "down_proj", 0),
    "l1.q": ScoredParam("l1.q", 1, "q_proj", 0),
    "l1.c_fc": ScoredParam("l1.c_fc", 1, "c_fc", 1),  # GPT-2 Conv1D: output units are columns
}
N = sum(a * b for a, b in SHAPES.values())


def synthetic(seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    weights = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    scores = {
        kind: {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
        for kind in ("harm", "harm_unsigned", "benign", "benign_unsigned")
    }
    for n in SHAPES:
        scores["harm_unsigned"][n].abs_()
        scores["benign_unsigned"][n].abs_()
    return weights, scores


def flat(d: dict) -> torch.Tensor:
    return torch.cat([d[n].reshape(-1) for n in SHAPES])


def as_global(mask: dict) -> set[int]:
    out, offset = set(), 0
    for n, s in SHAPES.items():
        out |= {offset + int(i) for i in mask[n]}
        offset += s[0] * s[1]
    return out


def top(values: torch.Tensor, k: int) -> set[int]:
    return set(torch.sort(values, descending=True, stable=True).indices[:k].tolist())


# ---------------------------------------------------------------- streaming top-k


@pytest.mark.parametrize("k", [0, 1, 5, 64, 300, 10_000])
def test_streaming_top_k_equals_sort_with_ties_and_exclusions(k):
    g = torch.Generator().manual_seed(1)
    mats = {f"m{i}": torch.randn(40, 30, generator=g).round(decimals=1) for i in range(4)}  # many ties
    excluded = {n: torch.rand(m.shape, generator=g) < 0.3 for n, m in mats.items()}

    def keys_of(n):
        return float_keys(mats[n]).masked_fill(excluded[n], EXCLUDED)

    th = top_k_threshold(list(mats), keys_of, k)
    got = torch.cat([(th.mask(n, keys_of(n)) & ~excluded[n]).view(-1) for n in mats])
    values = torch.cat([mats[n].masked_fill(excluded[n], float("-inf")).view(-1) for n in mats])
    n_allowed = int(sum((~e).sum() for e in excluded.values()))
    expected = torch.zeros_like(got)
    expected[list(top(values, min(k, n_allowed)))] = True
    assert torch.equal(got, expected)


def test_float_keys_preserve_order():
    x = torch.tensor([float("-inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf")])
    keys = float_keys(x)
    assert keys.dtype == torch.int32 and torch.all(keys[1:] > keys[:-1]) and int(keys.min()) > EXCLUDED


# ---------------------------------------------------------------- rules and counts


def test_signed_snip_global_equals_reference():
    weights, scores = synthetic()
    spec = PruneSpec(rule="signed_snip", sparsity=0.05, protect=0.1)
    got = as_global(select(spec, PARAMS, weights, scores))
    h, u = -flat(scores["harm"]), flat(scores["benign"]).abs()
    protected = top(u, round(0.1 * N))
    ranked = h.clone()
    ranked[list(protected)] = float("-inf")
    ranked[h <= 0] = float("-inf")
    expected = top(ranked, round(0.05 * N))
    assert got == expected and len(got) == round(0.05 * N)
    assert not got & protected


@pytest.mark.parametrize("rule", ["signed_snip", "no_set_difference", "unsigned_snip", "magnitude", "random"])
@pytest.mark.parametrize("granularity", ["global", "matrix", "row"])
@pytest.mark.parametrize("sparsity", [0.0, 0.03, 0.2])
def test_mask_counts_are_exact(rule, granularity, sparsity):
    weights, scores = synthetic()
    scores["harm"] = {n: -s.abs() for n, s in scores["harm"].items()}  # every weight eligible: counts are quotas
    mask = select(
        PruneSpec(rule=rule, sparsity=sparsity, protect=0.1, granularity=granularity), PARAMS, weights, scores
    )
    if granularity == "global":
        expected = round(sparsity * N)
    elif granularity == "matrix":
        expected = sum(round(sparsity * a * b) for a, b in SHAPES.values())
    else:  # one quota per output unit; Conv1D's output units are columns
        expected = sum(
            (b if PARAMS[n].rows_dim else a) * round(sparsity * (a if PARAMS[n].rows_dim else b))
            for n, (a, b) in SHAPES.items()
        )
    assert sum(m.numel() for m in mask.values()) == expected
    for n, idx in mask.items():
        assert idx.numel() == idx.unique().numel() and (idx.numel() == 0 or int(idx.max()) < weights[n].numel())


def test_row_granularity_prunes_the_same_count_in_every_output_unit():
    weights, scores = synthetic()
    mask = select(PruneSpec(rule="magnitude", sparsity=0.25, granularity="row"), PARAMS, weights, scores)
    for n, (a, b) in SHAPES.items():
        m = torch.zeros(a * b, dtype=torch.bool)
        m[mask[n]] = True
        per_unit = m.view(a, b).sum(dim=0 if PARAMS[n].rows_dim else 1)
        width = a if PARAMS[n].rows_dim else b
        assert torch.all(per_unit == round(0.25 * width)), n


@pytest.mark.parametrize("granularity", ["global", "matrix", "row"])
def test_set_difference_never_prunes_a_protected_weight(granularity):
    weights, scores = synthetic(3)
    spec = PruneSpec(sparsity=0.2, protect=0.3, granularity=granularity)
    mask = select(spec, PARAMS, weights, scores)
    protected = select(PruneSpec(rule="unsigned_snip", sparsity=0.3, protect=0.0, granularity=granularity), PARAMS, weights,
                       {"harm_unsigned": {n: s.abs() for n, s in scores["benign"].items()}})  # fmt: skip
    for n in SHAPES:
        assert not set(mask[n].tolist()) & set(protected[n].tolist())


def test_sign_convention_only_harm_supporting_weights_are_eligible():
    """S < 0: removing w raises the harmful loss, so w supports harm and may be pruned; S > 0 never."""
    weights, scores = synthetic()
    harm = {n: torch.full(s, 0.5) for n, s in SHAPES.items()}  # removal lowers the harmful loss: not eligible
    harm["l1.q"][2, 3] = -1.0  # removal raises it: eligible
    harm["l0.down"][0, 0] = -0.1
    mask = select(PruneSpec(sparsity=0.5, protect=0.0), PARAMS, weights, {**scores, "harm": harm})
    assert mask["l1.q"].tolist() == [2 * 16 + 3] and mask["l0.down"].tolist() == [0]
    assert sum(m.numel() for m in mask.values()) == 2


def test_random_baseline_is_reproducible_by_seed():
    weights, scores = synthetic()
    pick = lambda seed: as_global(select(PruneSpec(rule="random", sparsity=0.1, seed=seed), PARAMS, weights, scores))  # noqa: E731
    assert pick(7) == pick(7)
    assert pick(7) != pick(8)
    assert len(pick(7)) == round(0.1 * N)


def test_magnitude_prunes_smallest_weights():
    weights, scores = synthetic()
    got = as_global(select(PruneSpec(rule="magnitude", sparsity=0.1), PARAMS, weights, scores))
    assert got == top(-flat(weights).abs(), round(0.1 * N))


def test_no_set_difference_ignores_benign_scores():
    weights, scores = synthetic()
    spec = PruneSpec(rule="no_set_difference", sparsity=0.05, protect=0.5)
    assert spec.needed_scores() == {"harm"}
    got = as_global(select(spec, PARAMS, weights, {"harm": scores["harm"]}))
    assert got == top(-flat(scores["harm"]), round(0.05 * N))


def test_fraction_mode_is_top_q_minus_top_p():
    weights, scores = synthetic(5)
    spec = PruneSpec(harm_fraction=0.2, protect=0.1, benign_importance="signed")
    got = as_global(select(spec, PARAMS, weights, scores))
    h = -flat(scores["harm"])
    top_h = {i for i in top(h.masked_fill(h <= 0, float("-inf")), round(0.2 * N)) if h[i] > 0}
    expected = top_h - top(-flat(scores["benign"]), round(0.1 * N))
    assert got == expected and 0 < len(got) < round(0.2 * N)


def test_unsigned_benign_importance_reads_unsigned_scores():
    weights, scores = synthetic()
    spec = PruneSpec(sparsity=0.05, protect=0.2, benign_importance="unsigned")
    assert spec.needed_scores() == {"harm", "benign_unsigned"}
    got = as_global(select(spec, PARAMS, weights, scores))
    assert not got & top(flat(scores["benign_unsigned"]), round(0.2 * N))


@pytest.mark.parametrize(
    "field,value",
    [("sparsity", -0.1), ("sparsity", 1.5), ("protect", 2.0), ("rule", "bogus"), ("granularity", "layer")],
)
def test_bad_specs_fail_with_one_line(field, value):
    with pytest.raises(HarmsweepError) as err:
        PruneSpec(**{field: value}).validate()
    assert "\n" not in str(err.value) and field in str(err.value)


def test_apply_mask_and_counts():
    model = torch.nn.Module()
    for n, s in SHAPES.items():
        model.register_parameter(n.replace(".", "_"), torch.nn.Parameter(torch.ones(s)))
    params = {
        n.replace(".", "_"): ScoredParam(n.replace(".", "_"), p.layer, p.module_type, p.rows_dim)
        for n, p in PARAMS.items()
    }
    mask = {
        "l0_q": torch.tensor([0, 5]),
        "l0_down": torch.tensor([], dtype=torch.long),
        "l1_q": torch.tensor([1]),
        "l1_c_fc": torch.tensor([3, 4, 7]),
    }
    apply_mask(model, mask)
    named = dict(model.named_parameters())
    assert [int((named[n] == 0).sum()) for n in mask] == [2, 0, 1, 3]
    assert named["l0_q"].view(-1)[5] == 0 and named["l0_q"].view(-1)[1] == 1
    counts = mask_counts(params, mask)
    assert counts == {"per_layer": {"0": 2, "1": 4}, "per_module_type": {"c_fc": 3, "down_proj": 0, "q_proj": 3}}
