"""The device audit of selection: every path runs with its tensors off the CPU and mixes no devices.

Tensors that would sit on a GPU go on ``meta`` (tests/audit.py). Meta tensors hold no values, so an audited
call stops at its first data-dependent step; where that would hide later steps (the second pass of a streamed
top-k, the layer loop of sequential pruning) the twin on meta replays what the CPU run of the same call
computed, and every op between the replayed steps is still audited. The CPU runs are held against
independent computations (exact counts, a full sort of the concatenation).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from audit import assert_one_device, audit, meta_capable
from conftest import tiny

from harmsweep.models.parts import ScoredParam, scored_parameters
from harmsweep.pruning import masks, select, sequential
from harmsweep.pruning.spec import RULES, PruneSpec, count
from harmsweep.scoring import store, writer

HEAD_DIM = 4
SHAPES = {
    f"model.layers.{layer}.{module}.weight": shape
    for layer in (0, 1)
    for module, shape in (("self_attn.q_proj", (8, 16)), ("self_attn.o_proj", (16, 8)), ("mlp.down_proj", (16, 12)))
}
PARAMS = {n: ScoredParam(n, int(n.split(".")[2]), n.split(".")[-2], 0) for n in SHAPES}
N = sum(a * b for a, b in SHAPES.values())
KINDS = ("harm", "harm_unsigned", "benign", "benign_unsigned")


def values(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Weights and the four score sets on the CPU; scores rounded to 1/4 so that tie order matters."""
    g = torch.Generator().manual_seed(seed)
    weights = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    sets = {}
    for kind in KINDS:
        sets[kind] = {n: (torch.randn(s, generator=g) * 4).round() / 4 for n, s in SHAPES.items()}
        if kind.endswith("unsigned"):
            sets[kind] = {n: t.abs() for n, t in sets[kind].items()}
    return weights, sets


def on(device: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.to(device) for n, t in tensors.items()}


def twin(monkeypatch, spec: PruneSpec, weights, sets) -> tuple[dict[str, torch.Tensor], object]:
    """The CPU result of select(), and the audit of the same call on meta with the CPU thresholds replayed."""
    needed = {k: sets[k] for k in spec.needed_scores()}
    recorded = []
    real = select.top_k_threshold

    def record(names, keys_of, k):
        recorded.append(real(names, keys_of, k))
        return recorded[-1]

    monkeypatch.setattr(select, "top_k_threshold", record)
    result = select.select(spec, PARAMS, weights, needed, head_dim=HEAD_DIM)
    replay = iter(recorded)

    def replayed(names, keys_of, k):
        for name in names:  # every key computation of the pass runs on meta, as on a GPU
            keys_of(name)
        return next(replay)

    monkeypatch.setattr(select, "top_k_threshold", replayed)
    meta = {kind: on("meta", group) for kind, group in needed.items()}
    watch = audit(lambda: select.select(spec, PARAMS, on("meta", weights), meta, head_dim=HEAD_DIM))
    return result, watch


def spec_ids(spec: PruneSpec) -> str:
    return f"{spec.rule}-{spec.granularity}-p{spec.protect}-{spec.ties}-{spec.order}-q{spec.harm_fraction}"


CASES = [
    PruneSpec(rule=rule, sparsity=0.1, protect=protect, granularity=granularity)
    for rule, protect, granularity in itertools.product(RULES, (0.05, 0.0), ("global", "matrix", "row", "nm", "head"))
] + [
    PruneSpec(rule=rule, sparsity=0.1, protect=0.05, granularity="matrix", ties="topk", counts="floor")
    for rule in RULES
] + [
    PruneSpec(rule=rule, sparsity=0.1, protect=0.05, granularity=granularity, order="bottom")
    for rule, granularity in itertools.product(("signed_snip", "magnitude"), ("global", "matrix", "row"))
] + [
    PruneSpec(rule=rule, sparsity=0.1, protect=0.05, harm_fraction=0.1, granularity=granularity)
    for rule, granularity in itertools.product(("signed_snip", "unsigned_snip"), ("global", "matrix", "row", "head"))
]  # fmt: skip


@pytest.mark.parametrize("spec", CASES, ids=spec_ids)
def test_every_selection_path_mixes_no_devices(monkeypatch, spec):
    weights, sets = values(0)
    with meta_capable(monkeypatch):
        result, watch = twin(monkeypatch, spec, weights, sets)
    assert_one_device(watch)
    assert set(result) == set(PARAMS) and all(t.device.type == "cpu" for t in result.values())
    chosen = sum(t.numel() for t in result.values())
    if spec.granularity == "head":
        assert chosen % (2 * HEAD_DIM * 16) == 0  # whole heads: query rows and output columns
    elif spec.granularity == "nm":  # 2 of every 4 exactly, whatever the rule, eligibility and protection
        assert chosen == N // 2


def _expected_count(spec: PruneSpec, n: int) -> int:
    return count(spec, spec.sparsity, n)


@pytest.mark.parametrize("rule", ["magnitude", "random", "unsigned_snip"])
@pytest.mark.parametrize("granularity", ["global", "matrix"])
def test_selection_takes_exactly_k_weights(rule, granularity):
    """Every weight is eligible for these rules: the count is exact, and magnitude is the K smallest |W|."""
    weights, sets = values(1)
    spec = PruneSpec(rule=rule, sparsity=0.1, protect=0.0, granularity=granularity)
    got = select.select(spec, PARAMS, weights, {k: sets[k] for k in spec.needed_scores()})
    if granularity == "matrix":
        assert all(got[n].numel() == _expected_count(spec, w.numel()) for n, w in weights.items())
    assert sum(t.numel() for t in got.values()) == sum(
        _expected_count(spec, n) for n in ([N] if granularity == "global" else [w.numel() for w in weights.values()])
    )
    if rule == "magnitude" and granularity == "global":
        flat = torch.cat([w.reshape(-1) for w in weights.values()])
        order = torch.sort(flat.abs(), stable=True).indices[: _expected_count(spec, N)]
        offsets = list(itertools.accumulate([0] + [w.numel() for w in weights.values()]))[:-1]
        mine = torch.cat([got[n] + off for n, off in zip(weights, offsets, strict=True)])
        assert torch.equal(torch.sort(mine).values, torch.sort(order).values)


def test_signed_global_selection_equals_a_full_sort_of_the_concatenation():
    weights, sets = values(2)
    spec = PruneSpec(rule="signed_snip", sparsity=0.05, protect=0.05)
    got = select.select(spec, PARAMS, weights, {k: sets[k] for k in spec.needed_scores()})
    u = torch.cat([t.reshape(-1) for t in sets["benign"].values()]).abs()
    h = -torch.cat([t.reshape(-1) for t in sets["harm"].values()])
    protected = torch.sort(u, descending=True, stable=True).indices[: round(0.05 * N)]
    h[protected] = float("-inf")
    h[~(h > 0)] = float("-inf")
    top = torch.sort(h, descending=True, stable=True).indices[: round(0.05 * N)]
    expected = torch.sort(top[h[top] > float("-inf")]).values
    offsets = list(itertools.accumulate([0] + [t.numel() for t in weights.values()]))[:-1]
    assert torch.equal(torch.cat([got[n] + off for n, off in zip(weights, offsets, strict=True)]), expected)


def test_head_selection_prunes_whole_heads_by_summed_score():
    weights, sets = values(3)
    spec = PruneSpec(rule="signed_snip", sparsity=0.5, protect=0.0, granularity="head")
    got = select.select(spec, PARAMS, weights, {"harm": sets["harm"]}, head_dim=HEAD_DIM)
    sums = []  # independent: per layer and head, -sum S over its query rows and output columns
    for layer in (0, 1):
        q, o = (sets["harm"][f"model.layers.{layer}.self_attn.{m}.weight"] for m in ("q_proj", "o_proj"))
        sums += [-(q[h * 4 : h * 4 + 4].sum() + o[:, h * 4 : h * 4 + 4].sum()).item() for h in range(2)]
    ranked = sorted((s, i) for i, s in enumerate(sums) if s > 0)[::-1][:2]
    for layer in (0, 1):
        q = f"model.layers.{layer}.self_attn.q_proj.weight"
        heads = {i - 2 * layer for _, i in ranked if i // 2 == layer}
        rows = sorted({int(i) // 16 // HEAD_DIM for i in got[q]})
        assert rows == sorted(heads)
        assert got[q].numel() == len(heads) * HEAD_DIM * 16


COMPACT = [
    PruneSpec(rule=rule, sparsity=0.1, protect=protect, granularity=granularity, harm_fraction=fraction,
              benign_importance=importance)
    for rule, protect, granularity, fraction, importance in (
        ("signed_snip", 0.05, "global", None, "abs_signed"),
        ("signed_snip", 0.0, "global", None, "abs_signed"),
        ("signed_snip", 0.05, "matrix", None, "signed"),
        ("unsigned_snip", 0.05, "global", None, "unsigned"),
        ("unsigned_snip", 0.05, "matrix", 0.1, "abs_signed"),
        ("no_set_difference", 0.05, "matrix", None, "abs_signed"),
        ("no_set_difference", 0.05, "global", None, "abs_signed"),
        ("signed_snip", 0.05, "row", None, "abs_signed"),
        ("signed_snip", 0.0, "row", None, "abs_signed"),
    )
]  # fmt: skip


def compact_sets(tmp_path, sets, spec: PruneSpec, kept: store.StoreSpec) -> dict[str, store.TailScores]:
    out = {}
    for kind in spec.needed_scores():
        path = tmp_path / f"{kind}.safetensors"
        writer.write(sets[kind], path, kind, kept, spec.granularity, store.order_of(kind, spec.benign_importance))
        out[kind] = store.open_scores(path)
    return out


@pytest.mark.parametrize("spec", COMPACT, ids=spec_ids)
def test_selection_from_a_compact_set_on_a_device_mixes_no_devices(tmp_path, monkeypatch, spec):
    """Tails are read on the host and ranked where ``device`` says, as the pipeline passes the GPU."""
    weights, sets = values(4)
    tails = compact_sets(tmp_path, sets, spec, store.StoreSpec(keep=0.3, keep_benign=0.2))
    with meta_capable(monkeypatch):
        watch = audit(lambda: select.select(spec, PARAMS, on("meta", weights), tails, device="meta"))
    assert_one_device(watch)


@pytest.mark.parametrize("spec", [s for s in COMPACT if s.granularity != "row"], ids=spec_ids)
def test_global_and_matrix_selection_read_only_the_stored_tails(tmp_path, monkeypatch, spec):
    """The same mask as from the dense set, without one dense matrix built from a tail."""
    weights, sets = values(5)
    tails = compact_sets(tmp_path, sets, spec, store.StoreSpec(keep=0.3, keep_benign=0.2))
    dense = select.select(spec, PARAMS, weights, {k: sets[k] for k in spec.needed_scores()})

    def no_dense(*_args, **_kwargs):
        raise AssertionError("a dense matrix was built from a stored tail")

    monkeypatch.setattr(store.TailScores, "ranked", no_dense)
    compact = select.select(spec, PARAMS, weights, tails)
    for name in PARAMS:
        assert torch.equal(compact[name], dense[name]), name


def test_sequential_selection_keeps_the_model_on_its_device(monkeypatch):
    lm = tiny("llama")
    params = scored_parameters(lm.model)
    spec = PruneSpec(rule="no_set_difference", granularity="matrix", sparsity=0.05, sequential=True)
    named = dict(lm.model.named_parameters())

    def scores_of(device):
        def layer_scores(kind, names, layer):
            g = torch.Generator().manual_seed(layer)
            return {n: torch.randn(named[n].shape, generator=g).to(device) for n in names}

        return layer_scores

    chosen_per_layer = []
    real = sequential.select

    def record(*args, **kwargs):
        chosen_per_layer.append(real(*args, **kwargs))
        return chosen_per_layer[-1]

    monkeypatch.setattr(sequential, "select", record)
    mask = sequential.select_sequential(
        spec, params, lm.model, scores_of("cpu"), lambda m: masks.apply_mask(lm.model, m)
    )
    assert all(mask[n].numel() == round(0.05 * named[n].numel()) for n in params)  # half the scores are eligible
    replay = iter(chosen_per_layer)
    monkeypatch.setattr(sequential, "select", lambda *a, **k: next(replay))
    model = copy.deepcopy(lm.model).to("meta")
    with meta_capable(monkeypatch):
        watch = audit(
            lambda: sequential.select_sequential(
                spec, params, model, scores_of("meta"), lambda m: masks.apply_mask(model, m), "meta"
            )
        )
    assert_one_device(watch)
    assert next(replay, None) is None  # every layer ran on meta


def test_a_mask_with_base_values_applies_to_weights_off_the_cpu(monkeypatch):
    """pruning.replace=base: host indices and host base values written into device weights."""
    lm = tiny("llama")
    params = scored_parameters(lm.model)
    mask = {n: torch.arange(0, lm.model.get_parameter(n).numel(), 7) for n in params}
    base = {n: torch.randn(t.numel()) for n, t in mask.items()}
    expected = masks.apply_mask(copy.deepcopy(lm.model), mask, base, count_changed=True)
    assert expected == sum(t.numel() for t in mask.values())  # random base values differ everywhere
    model = copy.deepcopy(lm.model).to("meta")
    with meta_capable(monkeypatch):
        watch = audit(lambda: masks.apply_mask(model, mask, base, count_changed=True))
        assert_one_device(watch)
        watch = audit(lambda: masks.apply_mask(model, mask))
        assert_one_device(watch)

        def restore() -> None:
            with masks.pruned(model, mask):
                pass

        assert_one_device(audit(restore))


def test_experiments_rank_scores_on_the_models_device(monkeypatch):
    """cross_harm, em and dissociation select where the model is (a GPU), not where cached scores were read."""
    from types import SimpleNamespace

    from harmsweep.experiments import common

    lm = tiny("llama")
    params = scored_parameters(lm.model)
    named = dict(lm.model.named_parameters())
    host = {kind: {n: torch.randn(named[n].shape) for n in params} for kind in ("harm", "benign")}
    lm.model.to("meta")
    ctx = SimpleNamespace(lm=lm, spec=PruneSpec(rule="signed_snip", sparsity=0.01), params=params,
                          timed=lambda _name, fn: fn())  # fmt: skip
    monkeypatch.setattr(common, "score_sets", lambda *args, **kwargs: host)
    with meta_capable(monkeypatch):
        watch = audit(lambda: common.select_mask(ctx, {}, {}))
    assert_one_device(watch)
