"""The predecessor's options: its exact set difference (wei2024), floor counts, bottom pruning, N:M, heads."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny
from test_pruning import PARAMS, SHAPES, synthetic

from harmsweep.errors import HarmsweepError
from harmsweep.models.parts import ScoredParam, head_dim, scored_parameters
from harmsweep.pruning.select import select
from harmsweep.pruning.spec import PruneSpec

WEI2024 = dict(rule="unsigned_snip", granularity="matrix", benign_importance="unsigned", counts="floor", ties="topk")


def wei2024_reference(utility: torch.Tensor, safety: torch.Tensor, p: float, q: float) -> torch.Tensor:
    """alignment-attribution-code's prune_wandg_set_difference for one matrix, as its lines read."""
    top_p = int(p * utility.shape[1] * utility.shape[0])
    top_q = int(q * safety.shape[1] * safety.shape[0])
    top_p_indices = torch.topk(utility.flatten(), top_p, largest=True)[1]
    top_q_indices = torch.topk(safety.flatten(), top_q, largest=True)[1]
    unique_p = torch.unique(top_p_indices)
    mask = ~torch.isin(top_q_indices, unique_p)
    return torch.sort(top_q_indices[mask]).values


@pytest.mark.parametrize(("p", "q"), [(0.05, 0.05), (0.1, 0.07), (0.013, 0.3), (0.0, 0.02)])
def test_wei2024_equals_the_predecessors_rule_with_ties(p, q):
    weights, scores = synthetic()
    for kind in ("harm_unsigned", "benign_unsigned"):  # coarse values: many ties at every threshold
        scores[kind] = {n: (s * 4).round() / 4 for n, s in scores[kind].items()}
    got = select(PruneSpec(protect=p, harm_fraction=q, **WEI2024), PARAMS, weights, scores)
    for n in SHAPES:
        expected = wei2024_reference(scores["benign_unsigned"][n], scores["harm_unsigned"][n], p, q)
        assert torch.equal(got[n], expected), n


def test_floor_and_round_counts_differ_as_they_should():
    weights, scores = synthetic()
    n = 8 * 16  # l0.q
    for counts, k in (("floor", int(0.07 * n)), ("round", round(0.07 * n))):
        spec = PruneSpec(rule="no_set_difference", granularity="matrix", sparsity=0.07, counts=counts)
        assert select(spec, PARAMS, weights, scores)["l0.q"].numel() == k
    assert int(0.07 * n) != round(0.07 * n)  # 8.96: the case where the two disagree


@pytest.mark.parametrize("rule", ["unsigned_snip", "signed_snip", "magnitude"])
def test_bottom_prunes_the_lowest_ranked(rule):
    weights, scores = synthetic()
    spec = PruneSpec(rule=rule, granularity="matrix", sparsity=0.1, protect=0.0, order="bottom")
    got = select(spec, PARAMS, weights, scores)
    for n in SHAPES:
        if rule == "unsigned_snip":
            values = scores["harm_unsigned"][n]
        elif rule == "signed_snip":
            values = -scores["harm"][n]
        else:
            values = -weights[n].abs()
        k = round(0.1 * values.numel())
        expected = torch.sort(torch.sort(values.view(-1), stable=True).indices[:k]).values
        assert torch.equal(got[n], expected)


def _nm_groups(mask_idx: torch.Tensor, name: str, p: ScoredParam, m: int) -> torch.Tensor:
    """The pruned mask of a matrix as (rows, groups, m): groups of m consecutive inputs of an output row."""
    mask = torch.zeros(SHAPES[name], dtype=torch.bool)
    mask.view(-1)[mask_idx] = True
    rows = mask.T if p.rows_dim == 1 else mask
    return rows.reshape(rows.size(0), -1, m)


def _in_groups(t: torch.Tensor, p: ScoredParam, m: int) -> torch.Tensor:
    rows = t.T if p.rows_dim == 1 else t
    return rows.reshape(rows.size(0), -1, m)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("rule", ["unsigned_snip", "signed_snip"])
def test_nm_prunes_exactly_n_of_every_m_along_each_row(n, m, rule):
    """Exact for any rule: under signed SNIP about half the weights are not eligible (H <= 0), and a group with
    fewer than n eligible still prunes n (the eligible first, by rank)."""
    weights, scores = synthetic()
    params = {k: v for k, v in PARAMS.items() if SHAPES[k][1 - v.rows_dim] % m == 0}
    spec = PruneSpec(rule=rule, granularity="nm", nm_n=n, nm_m=m, protect=0.0)
    got = select(spec, params, weights, scores)
    short = 0
    for name, p in params.items():
        groups = _nm_groups(got[name], name, p, m)
        assert torch.all(groups.sum(2) == n)  # exact: every group of m prunes n
        h = scores["harm_unsigned"][name] if rule == "unsigned_snip" else -scores["harm"][name]
        s = _in_groups(h, p, m)
        eligible = s > 0 if rule == "signed_snip" else torch.ones_like(s, dtype=torch.bool)
        ranked = s.masked_fill(~eligible, float("-inf"))
        kept_max = ranked.masked_fill(groups, float("-inf")).amax(2)
        pruned_min = ranked.masked_fill(~groups, float("inf")).amin(2)
        assert torch.all(pruned_min >= kept_max)  # the n highest-ranked eligible of each group first
        assert torch.all((groups & eligible).sum(2) == eligible.sum(2).clamp(max=n))  # no eligible one left out
        short += int((eligible.sum(2) < n).sum())
    assert short > 0 or rule == "unsigned_snip"  # the signed case really has groups short of eligible weights


def test_nm_prunes_protected_weights_only_where_a_group_has_too_few_others():
    """protect=0.6 of an 8x16 matrix: 77 protected weights, so some 2:4 groups hold three or four of them. Those
    groups still prune 2, the unprotected first, then the protected of least benign importance."""
    weights, scores = synthetic()
    spec = PruneSpec(rule="unsigned_snip", granularity="nm", protect=0.6, benign_importance="unsigned")
    name, p = "l0.q", PARAMS["l0.q"]
    got = select(spec, {name: p}, weights, scores)[name]
    u = scores["benign_unsigned"][name]
    k = round(0.6 * u.numel())
    protected = torch.zeros(u.numel(), dtype=torch.bool)
    protected[torch.sort(u.view(-1), descending=True, stable=True).indices[:k]] = True
    groups = _nm_groups(got, name, p, 4)
    prot = _in_groups(protected.view(SHAPES[name]), p, 4)
    assert got.numel() == u.numel() // 2 and torch.all(groups.sum(2) == 2)
    others = (~prot).sum(2)
    assert torch.all((groups & prot).sum(2) == (2 - others).clamp(min=0))  # protected only to make up the count
    assert torch.all((groups & ~prot).sum(2) == others.clamp(max=2))
    forced = groups & prot
    if forced.any():  # of a group's protected weights, the least important are the ones pruned
        ub = _in_groups(u, p, 4)
        pruned_max = ub.masked_fill(~forced, float("-inf")).amax(2)
        spared_min = ub.masked_fill(~(prot & ~groups), float("inf")).amin(2)
        assert torch.all(pruned_max <= spared_min)
    assert int(forced.sum()) > 0  # the case is exercised


def test_heads_prune_whole_heads_by_summed_score():
    lm = tiny("llama")
    params = scored_parameters(lm.model)
    named = dict(lm.model.named_parameters())
    weights = {n: named[n] for n in params}
    g = torch.Generator().manual_seed(0)
    scores = {"harm_unsigned": {n: torch.rand(w.shape, generator=g) for n, w in weights.items()}}
    hd = head_dim(lm.model)
    heads = lm.model.config.num_attention_heads
    layers = lm.model.config.num_hidden_layers
    spec = PruneSpec(rule="unsigned_snip", granularity="head", sparsity=0.25, protect=0.0)
    got = select(spec, params, weights, scores, head_dim=hd)
    k = round(0.25 * heads * layers)
    d_model = lm.model.config.hidden_size
    assert sum(i.numel() for i in got.values()) == k * 2 * hd * d_model  # q rows + o columns of k heads
    sums = []
    for layer in range(layers):
        q = scores["harm_unsigned"][f"model.layers.{layer}.self_attn.q_proj.weight"]
        o = scores["harm_unsigned"][f"model.layers.{layer}.self_attn.o_proj.weight"]
        for h in range(heads):
            sums.append(float(q[h * hd : (h + 1) * hd].sum() + o[:, h * hd : (h + 1) * hd].sum()))
    best = sorted(range(len(sums)), key=lambda i: -sums[i])[:k]
    for i in best:
        layer, h = divmod(i, heads)
        q_idx = got[f"model.layers.{layer}.self_attn.q_proj.weight"]
        assert set(range(h * hd * d_model, (h + 1) * hd * d_model)) <= set(q_idx.tolist())
    assert all(got[n].numel() == 0 for n in params if not n.endswith(("q_proj.weight", "o_proj.weight")))


def test_heads_need_q_and_o_projections():
    weights, scores = synthetic()
    spec = PruneSpec(rule="unsigned_snip", granularity="head", sparsity=0.5, protect=0.0)
    with pytest.raises(HarmsweepError, match="q_proj and o_proj"):
        select(spec, {"l1.c_fc": ScoredParam("l1.c_fc", 1, "c_fc", 1)}, weights, scores, head_dim=4)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ties": "topk"}, "needs pruning.granularity=matrix"),
        ({"granularity": "nm", "nm_n": 5}, "nm_n=5"),
        ({"granularity": "nm", "harm_fraction": 0.1}, "fixes the count"),
        ({"sequential": True}, "per matrix"),
        ({"order": "sideways"}, "pruning.order=sideways"),
        ({"criterion": "grad"}, "scoring.criterion=grad"),
    ],
)
def test_contradicting_settings_fail_in_one_line(fields, message):
    with pytest.raises(HarmsweepError, match=message):
        PruneSpec(**fields).validate()


def test_settings_added_later_leave_run_ids_of_finished_runs_unchanged():
    from test_config import plain as composed

    from harmsweep.config.identity import run_id

    cfg = composed()
    old = {k: v for k, v in cfg.items() if k not in ("method", "lowrank")}
    old["pruning"] = {k: v for k, v in cfg["pruning"].items() if k not in PruneSpec.__dataclass_fields__ or k in (
        "rule", "sparsity", "protect", "harm_fraction", "granularity", "benign_importance")}  # fmt: skip
    old["scoring"] = {k: v for k, v in cfg["scoring"].items() if k != "criterion"}
    assert run_id(old) == run_id(cfg)
    for override in ("pruning.counts=floor", "scoring=wanda", "pruning.replace=base", "method=lowrank"):
        assert run_id(composed(override)) != run_id(cfg), override
    assert run_id(composed("method=lowrank", "pruning.sparsity=0.5")) == run_id(composed("method=lowrank"))
