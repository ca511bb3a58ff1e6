"""The authors' mask options (btap_reference.md section 4): eligible, their matrix count, layers, alpha and
freeze_first_top_q, each held against an independent numpy computation on random scores, plus one run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from audit import assert_one_device, audit, meta_capable
from conftest import tiny, write_pairs
from test_cli import file_run_args, harmsweep
from test_device_audit import HEAD_DIM, compact_sets, twin, values
from test_device_audit import PARAMS as AUDIT_PARAMS
from test_pruning import PARAMS, SHAPES, synthetic

from harmsweep.errors import HarmsweepError
from harmsweep.models.parts import ScoredParam, scored_parameters
from harmsweep.pruning import masks, sequential
from harmsweep.pruning.select import select
from harmsweep.pruning.spec import PruneSpec
from harmsweep.scoring import store
from harmsweep.scoring.spec import StoreSpec

ONE = {"m": ScoredParam("m", 0, "q_proj", 0)}
AUTHORS = dict(rule="signed_snip", granularity="matrix", benign_importance="unsigned", counts="floor")


def one_matrix(shape: tuple[int, int], positives: int, seed: int = 0) -> tuple[dict, dict]:
    """Weights and scores of one matrix whose H = -S is positive at exactly ``positives`` entries; no ties."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0] * shape[1]
    s = (torch.randperm(n, generator=g).double() + 1) / n  # distinct, all S > 0 (H < 0)
    s[torch.randperm(n, generator=g)[:positives]] *= -1
    u = (torch.randperm(n, generator=g).double() + 1) / n
    weights = {"m": torch.randn(shape, generator=g)}
    return weights, {"harm": {"m": s.view(shape).float()}, "benign_unsigned": {"m": u.view(shape).float()}}


def np_top(values: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-values, kind="stable")[:k].tolist())


def as_set(t: torch.Tensor) -> set[int]:
    assert torch.equal(t, torch.sort(t).values)  # masks are sorted flat indices
    return set(t.tolist())


# ---------------------------------------------------------------- eligible


@pytest.mark.parametrize("ties", ["topk", "index"])
def test_eligible_all_takes_the_top_kq_whatever_the_sign(ties):
    weights, scores = one_matrix((10, 18), positives=30)
    h, u = -scores["harm"]["m"].numpy().ravel(), scores["benign_unsigned"]["m"].numpy().ravel()
    k_q, k_p = int(0.5 * 18 * 10), int(0.1 * 18 * 10)
    assert (k_q, k_p, int((h > 0).sum())) == (90, 18, 30)  # k_q exceeds the positive entries
    top_q, top_p = np_top(h, k_q), np_top(u, k_p)
    got = {e: select(PruneSpec(harm_fraction=0.5, protect=0.1, ties=ties, eligible=e, **AUTHORS), ONE, weights,
                     scores)["m"] for e in ("positive", "all")}  # fmt: skip
    assert as_set(got["all"]) == top_q - top_p
    assert got["all"].numel() == k_q - len(top_q & top_p) and got["all"].numel() > 30
    assert as_set(got["positive"]) == set(np.flatnonzero(h > 0).tolist()) - top_p  # only the 30 positives
    assert got["positive"].numel() == 30 - len(top_p & set(np.flatnonzero(h > 0).tolist()))


def test_eligible_all_with_a_target_count_skips_only_protected_weights():
    weights, scores = one_matrix((10, 18), positives=10)
    h, u = -scores["harm"]["m"].numpy().ravel(), scores["benign_unsigned"]["m"].numpy().ravel()
    spec = PruneSpec(rule="signed_snip", sparsity=0.3, protect=0.1, benign_importance="unsigned", eligible="all")
    got = select(spec, ONE, weights, scores)["m"]
    k, protected = round(0.3 * 180), np_top(u, round(0.1 * 180))
    h[list(protected)] = -np.inf
    assert as_set(got) == np_top(h, k) and got.numel() == 54


def test_eligible_all_stops_where_a_compact_harm_set_holds_too_few_positives(tmp_path):
    weights, scores = one_matrix((10, 18), positives=30)
    spec = PruneSpec(harm_fraction=0.5, protect=0.1, ties="index", eligible="all", **AUTHORS)
    tails = compact_sets(tmp_path, scores, spec, StoreSpec(keep=0.9, keep_benign=0.2))
    with pytest.raises(HarmsweepError, match=r"eligible=all .* use scores\.store=dense"):
        select(spec, ONE, weights, tails)
    small = PruneSpec(harm_fraction=0.1, protect=0.1, ties="index", eligible="all", **AUTHORS)  # 18 < 30 positives
    assert torch.equal(select(small, ONE, weights, tails)["m"], select(small, ONE, weights, scores)["m"])


# ---------------------------------------------------------------- counts


@pytest.mark.parametrize(("shape", "k_floor"), [((10, 18), 26), ((18, 10), 27)])
@pytest.mark.parametrize("path", ["topk", "index", "compact", "fraction"])
def test_matrix_floor_counts_int_f_cols_rows(tmp_path, shape, k_floor, path):
    """int(0.15 * cols * rows): 26 for 10 x 18 (0.15 * 18 = 2.6999999999999997), where int(0.15 * 180) is 27."""
    assert int(0.15 * shape[1] * shape[0]) == k_floor and int(0.15 * 180) == 27 and round(0.15 * 180) == 27
    g = torch.Generator().manual_seed(1)
    weights = {"m": torch.randn(shape, generator=g)}
    scores = {"harm_unsigned": {"m": torch.rand(shape, generator=g)}}
    fields = dict(rule="unsigned_snip", granularity="matrix", protect=0.0, counts="floor")
    if path == "fraction":
        fields["harm_fraction"] = 0.15
    spec = PruneSpec(sparsity=0.15, ties="topk" if path == "topk" else "index", **fields)
    if path == "compact":
        scores = compact_sets(tmp_path, scores, spec, StoreSpec(keep=0.5))
    assert select(spec, ONE, weights, scores)["m"].numel() == k_floor
    rounded = PruneSpec(**{**fields, "counts": "round"}, sparsity=0.15)
    assert select(rounded, ONE, weights, scores)["m"].numel() == 27


def test_global_floor_counts_int_f_n():
    g = torch.Generator().manual_seed(2)
    params = {n: ScoredParam(n, 0, "q_proj", 0) for n in ("a", "b")}
    weights = {n: torch.randn(10, 18, generator=g) for n in params}
    scores = {"harm_unsigned": {n: torch.rand(10, 18, generator=g) for n in params}}
    spec = PruneSpec(rule="unsigned_snip", sparsity=0.15, protect=0.0, counts="floor")
    assert sum(t.numel() for t in select(spec, params, weights, scores).values()) == int(0.15 * 360) == 54


# ---------------------------------------------------------------- layers


@pytest.mark.parametrize(
    "fields",
    [
        dict(rule="signed_snip", granularity="matrix", sparsity=0.1, protect=0.05),
        dict(rule="signed_snip", granularity="matrix", harm_fraction=0.2, protect=0.05, ties="topk", counts="floor"),
        dict(rule="signed_snip", granularity="row", sparsity=0.2, protect=0.05),
        dict(rule="unsigned_snip", granularity="nm", protect=0.05),
    ],
)
def test_layers_leave_other_layers_untouched_and_listed_ones_as_they_were(fields):
    weights, scores = synthetic()
    full = select(PruneSpec(**fields), PARAMS, weights, scores)
    got = select(PruneSpec(**fields, layers=[1]), PARAMS, weights, scores)
    assert list(got) == list(PARAMS)
    for name, p in PARAMS.items():
        assert torch.equal(got[name], full[name] if p.layer == 1 else torch.zeros(0, dtype=torch.long)), name
    assert all(full[n].numel() > 0 for n in PARAMS)


def test_global_ranking_with_layers_ranks_the_listed_layers_alone():
    weights, scores = synthetic()
    spec = PruneSpec(rule="unsigned_snip", sparsity=0.1, protect=0.0, layers=[1])
    got = select(spec, PARAMS, weights, scores)
    listed = [n for n, p in PARAMS.items() if p.layer == 1]
    size = sum(SHAPES[n][0] * SHAPES[n][1] for n in listed)
    h = np.concatenate([scores["harm_unsigned"][n].numpy().ravel() for n in listed])
    expected, offset = np_top(h, round(0.1 * size)), 0
    mine = set()
    for n in listed:
        mine |= {offset + i for i in as_set(got[n])}
        offset += SHAPES[n][0] * SHAPES[n][1]
    assert mine == expected and len(mine) == round(0.1 * size) == 32
    assert all(got[n].numel() == 0 for n, p in PARAMS.items() if p.layer == 0)


def test_head_ranking_with_layers_counts_the_listed_layers_heads():
    weights, sets = values(7)
    spec = PruneSpec(rule="unsigned_snip", granularity="head", sparsity=0.5, protect=0.0, layers=[0])
    got = select(spec, AUDIT_PARAMS, weights, {"harm_unsigned": sets["harm_unsigned"]}, head_dim=HEAD_DIM)
    assert sum(t.numel() for t in got.values()) == 1 * 2 * HEAD_DIM * 16  # half of layer 0's two heads
    assert all(got[n].numel() == 0 for n, p in AUDIT_PARAMS.items() if p.layer == 1)


@pytest.mark.parametrize(
    ("layers", "message"),
    [([5], r"pruning.layers=\[5\]: the model has layers 0-1$"), ([1, -1], r"pruning.layers=\[1, -1\]: the model")],
)
def test_a_layer_the_model_lacks_stops_in_one_line(layers, message):
    weights, scores = synthetic()
    with pytest.raises(HarmsweepError, match=message):
        select(PruneSpec(rule="signed_snip", layers=layers), PARAMS, weights, scores)


def test_sequential_pruning_scores_and_prunes_only_the_listed_layers():
    lm = tiny("llama")
    params = scored_parameters(lm.model)
    named = dict(lm.model.named_parameters())
    spec = PruneSpec(rule="no_set_difference", granularity="matrix", sparsity=0.05, sequential=True, layers=[1])
    scored, given = [], {}

    def layer_scores(kind, names, layer):
        scored.append((kind, layer))
        g = torch.Generator().manual_seed(layer)
        given.update({n: torch.randn(named[n].shape, generator=g) for n in names})
        return {n: given[n] for n in names}

    mask = sequential.select_sequential(spec, params, lm.model, layer_scores, lambda m: masks.apply_mask(lm.model, m))
    assert scored == [("harm", 1)] and list(mask) == list(params)
    for n, p in params.items():
        expected = set()
        if p.layer == 1:  # H = -S > 0 only, the top round(0.05 N), ties by flat index
            h = -given[n].view(-1).numpy()
            expected = np_top(np.where(h > 0, h, -np.inf), round(0.05 * h.size))
        assert as_set(mask[n]) == expected and (p.layer == 0 or len(expected) == round(0.05 * h.size)), n
    with pytest.raises(HarmsweepError, match="the model has layers 0-1"):
        sequential.select_sequential(PruneSpec(**{**spec.__dict__, "layers": [2]}), params, lm.model, layer_scores,
                                     lambda m: None)  # fmt: skip


# ---------------------------------------------------------------- alpha


def test_alpha_values_scale_or_average_the_selected_weights():
    g = torch.Generator().manual_seed(3)
    weights = {"a": torch.randn(6, 5, generator=g), "b": torch.randn(4, 4, generator=g)}
    mask = {"a": torch.tensor([0, 7, 29]), "b": torch.zeros(0, dtype=torch.long)}
    assert masks.alpha_values(weights, mask, 0) is None and masks.alpha_values(weights, mask, 0.0) is None
    scaled = masks.alpha_values(weights, mask, 0.25)
    assert set(scaled) == {"a"} and torch.equal(scaled["a"], weights["a"].view(-1)[[0, 7, 29]] * 0.25)
    mean = masks.alpha_values(weights, mask, "mean")
    picked = weights["a"].view(-1)[[0, 7, 29]].tolist()
    assert mean["a"].tolist() == pytest.approx([sum(picked) / 3] * 3, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.5, "mean"])
def test_alpha_applied_to_a_model_changes_only_the_selected_weights(alpha):
    model = torch.nn.Linear(5, 6, bias=False)
    before = model.weight.detach().clone()
    mask = {"weight": torch.tensor([1, 2, 28])}
    values = masks.alpha_values(dict(model.named_parameters()), mask, alpha)
    assert masks.apply_mask(model, mask, values, count_changed=True) == 3
    picked = before.view(-1)[[1, 2, 28]]
    expected = before.clone().view(-1)
    expected[[1, 2, 28]] = picked * 0.5 if alpha == 0.5 else picked.mean()
    assert torch.equal(model.weight.detach().view(-1), expected)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"alpha": "half"}, "pruning.alpha=half must be a number"),
        ({"alpha": True}, "pruning.alpha=True must be a number"),
        ({"alpha": 0.5, "replace": "base"}, "use one of the two"),
        ({"layers": []}, "non-empty list"),
        ({"layers": [0, "x"]}, "non-empty list"),
        ({"freeze_first_top_q": True, "granularity": "matrix"}, "needs pruning.harm_fraction"),
        ({"freeze_first_top_q": True, "harm_fraction": 0.1}, "granularity=matrix"),
        ({"freeze_first_top_q": True, "harm_fraction": 0.6, "granularity": "matrix"}, "at most 0.5"),
        ({"eligible": "negative"}, "pruning.eligible=negative is not one of"),
    ],
)
def test_authors_options_refuse_contradictions_in_one_line(fields, message):
    with pytest.raises(HarmsweepError, match=message) as err:
        PruneSpec(**fields).validate()
    assert "\n" not in str(err.value)
    PruneSpec(alpha=0.0, replace="base").validate()  # zero is today's behaviour: it goes with anything


# ---------------------------------------------------------------- freeze_first_top_q


@pytest.mark.parametrize("ties", ["topk", "index"])
@pytest.mark.parametrize("eligible", ["all", "positive"])
def test_freeze_first_top_q_prunes_the_next_band(ties, eligible):
    weights, scores = one_matrix((10, 18), positives=70)
    h, u = -scores["harm"]["m"].numpy().ravel(), scores["benign_unsigned"]["m"].numpy().ravel()
    q, p = 0.15, 0.1
    k_2q, k_q, k_p = int(2 * q * 18 * 10), int(q * 18 * 10), int(p * 18 * 10)
    assert (k_2q, k_q, k_p) == (53, 26, 18)  # int(0.3 * 180) would be 54
    if eligible == "positive":
        h[h <= 0] = -np.inf
    expected = np_top(h, k_2q) - np_top(h, k_q) - np_top(u, k_p)
    spec = PruneSpec(harm_fraction=q, protect=p, ties=ties, eligible=eligible, freeze_first_top_q=True, **AUTHORS)
    got = select(spec, ONE, weights, scores)["m"]
    assert as_set(got) == expected and 0 < got.numel() <= 53 - 26


def test_freeze_first_top_q_from_a_compact_set_sized_by_the_run(tmp_path):
    weights, sets = values(8)
    spec = PruneSpec(harm_fraction=0.1, protect=0.05, ties="index", freeze_first_top_q=True, layers=[0], **AUTHORS)
    assert StoreSpec.needs(spec) == (0.2, 0.05)
    kept = StoreSpec().resolved(0.02, 0.05)  # keep=0.0202 of H: too short for the band's 2q
    short = compact_sets(tmp_path / "short", sets, spec, kept)
    with pytest.raises(HarmsweepError, match=r"scores\.keep"):
        select(spec, AUDIT_PARAMS, weights, short)
    tails = compact_sets(tmp_path, sets, spec, StoreSpec().resolved(*StoreSpec.needs(spec)))
    dense = select(spec, AUDIT_PARAMS, weights, {k: sets[k] for k in spec.needed_scores()})
    compact = select(spec, AUDIT_PARAMS, weights, tails)
    assert all(torch.equal(compact[n], dense[n]) for n in AUDIT_PARAMS)
    assert sum(t.numel() for t in dense.values()) > 0


# ---------------------------------------------------------------- device audit

AUDITED = [
    PruneSpec(rule="signed_snip", sparsity=0.1, protect=0.05, granularity=g, eligible="all", layers=[1])
    for g in ("global", "matrix", "row", "nm", "head")
] + [
    PruneSpec(harm_fraction=0.1, protect=0.05, ties=t, freeze_first_top_q=True, **AUTHORS) for t in ("topk", "index")
]  # fmt: skip


@pytest.mark.parametrize("spec", AUDITED, ids=lambda s: f"{s.granularity}-{s.ties}-freeze{s.freeze_first_top_q}")
def test_authors_options_mix_no_devices(monkeypatch, spec):
    weights, sets = values(0)
    with meta_capable(monkeypatch):
        result, watch = twin(monkeypatch, spec, weights, sets)
    assert_one_device(watch)
    assert set(result) == set(AUDIT_PARAMS) and all(t.device.type == "cpu" for t in result.values())


@pytest.mark.parametrize("alpha", [0.5, "mean"])
def test_alpha_values_stay_on_the_weights_device(monkeypatch, alpha):
    lm = tiny("llama")
    params = scored_parameters(lm.model)
    mask = {n: torch.arange(0, lm.model.get_parameter(n).numel(), 7) for n in params}
    lm.model.to("meta")
    named = dict(lm.model.named_parameters())
    with meta_capable(monkeypatch):
        watch = audit(lambda: masks.apply_mask(lm.model, mask, masks.alpha_values(named, mask, alpha)))
    assert_one_device(watch)


# ---------------------------------------------------------------- a run


def test_authors_options_in_a_run_on_tiny_llama(tmp_path):
    """pruning=orgad2026 with layers, alpha and the band: the mask is the numpy band of the run's dense scores."""
    files = write_pairs(tmp_path, 12)
    run_dir = tmp_path / "run"
    q, p = 0.05, 0.05
    proc = harmsweep(*file_run_args(run_dir, *files, "pruning=orgad2026", f"pruning.harm_fraction={q}",
                                    f"pruning.protect={p}", "pruning.layers=[1]", "pruning.alpha=0.5",
                                    "pruning.freeze_first_top_q=true", "scores.store=dense"), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((run_dir / "result.json").read_text())
    harm, benign = (store.open_scores(result["artifacts"][f"scores_{k}"]) for k in ("harm", "benign_unsigned"))
    mask = masks.load_mask(result["artifacts"]["mask"])
    total = 0
    for name, idx in mask.items():
        if ".layers.0." in name:
            assert idx.numel() == 0, name
            continue
        s, u = harm[name], benign[name]
        rows, cols = s.shape
        h, uu = -s.numpy().ravel(), u.numpy().ravel()
        expected = (
            np_top(h, int(2 * q * cols * rows)) - np_top(h, int(q * cols * rows)) - np_top(uu, int(p * cols * rows))
        )
        assert as_set(idx) == expected, name
        total += len(expected)
    assert result["n_pruned"] == total > 0
    assert result["pruning"]["per_layer"] == {"0": 0, "1": total}
    assert result["metrics"]["zero_fraction_after"] == result["zero_fraction_before"]  # scaled, not zeroed
    assert result["actual_sparsity"] == total / result["n_scored"]  # every scaled weight changed
