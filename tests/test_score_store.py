"""Compact score sets: masks and report metrics identical to the dense set's, exact tails, one-line stops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_pruning import PARAMS, SHAPES

from harmsweep.errors import HarmsweepError
from harmsweep.pruning.select import select
from harmsweep.pruning.spec import PruneSpec
from harmsweep.report.compression import concentration, gini, separation
from harmsweep.scoring import store, writer

N = sum(a * b for a, b in SHAPES.values())
ROWS = {n: p.rows_dim for n, p in PARAMS.items()}


def scores_with_ties(seed: int) -> tuple[dict, dict]:
    """Signed and unsigned sets whose values repeat (rounded to 1/8), so tie order matters, plus a few zeros."""
    g = torch.Generator().manual_seed(seed)
    weights = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    sets = {}
    for kind in ("harm", "harm_unsigned", "benign", "benign_unsigned"):
        sets[kind] = {n: (torch.randn(s, generator=g) * 8).round() / 8 for n, s in SHAPES.items()}
        if kind.endswith("unsigned"):
            sets[kind] = {n: t.abs() for n, t in sets[kind].items()}
    return weights, sets


def stored(tmp_path, dense_sets: dict, spec: PruneSpec, kept: store.StoreSpec) -> dict:
    """Each needed set written as run.py writes it and opened back, in the layout ``spec`` reads."""
    out = {}
    for kind in spec.needed_scores():
        path = tmp_path / f"{kind}-{kept.store}-{spec.granularity}-{spec.benign_importance}.safetensors"
        order = store.order_of(kind, spec.benign_importance)
        writer.write(dense_sets[kind], path, kind, kept, spec.granularity, order, ROWS)
        out[kind] = store.open_scores(path)
    return out


CASES = [
    PruneSpec(
        rule=rule,
        sparsity=sparsity,
        protect=protect,
        granularity=granularity,
        benign_importance=importance,
        harm_fraction=fraction,
    )
    for rule, granularity, importance, (sparsity, protect, fraction) in itertools.product(
        ("signed_snip", "no_set_difference", "unsigned_snip"),
        ("global", "matrix", "row"),
        ("abs_signed", "signed", "unsigned"),
        ((0.01, 0.05, None), (0.05, 0.1, None), (0.0, 0.1, None), (0.02, 0.1, 0.08), (0.1, 0.0, None)),
    )
]


@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"{s.rule}-{s.granularity}-{s.benign_importance}-{s.sparsity}-"
                         f"{s.protect}-{s.harm_fraction}")  # fmt: skip
def test_masks_from_compact_sets_equal_masks_from_dense_sets(tmp_path, spec):
    weights, sets = scores_with_ties(1)
    kept = store.StoreSpec(keep=0.25, keep_benign=0.1)  # keep >= sparsity + protect: always enough
    dense = select(spec, PARAMS, weights, stored(tmp_path, sets, spec, store.StoreSpec(store="dense")))
    compact = select(spec, PARAMS, weights, stored(tmp_path, sets, spec, kept))
    reference = select(spec, PARAMS, weights, sets)  # the in-memory tensors the files came from
    quota = spec.harm_fraction or spec.sparsity
    assert sum(t.numel() for t in compact.values()) > 0 or round(quota * (12 if spec.granularity == "row" else N)) == 0
    for name in PARAMS:
        assert torch.equal(compact[name], dense[name]), name
        assert torch.equal(dense[name], reference[name]), name


def test_tail_is_the_exact_prefix_of_the_ranking_with_ties_in_pruning_order(tmp_path):
    _, sets = scores_with_ties(2)
    k = round(0.1 * N)
    writer.write(sets["harm"], tmp_path / "h.safetensors", "harm", store.StoreSpec(keep=0.1), "global", "neg")
    tail = store.open_scores(tmp_path / "h.safetensors")
    h = torch.cat([-sets["harm"][n].reshape(-1) for n in SHAPES])
    expected = torch.sort(h.masked_fill(h <= 0, float("-inf")), descending=True, stable=True).indices[:k]
    offsets = dict(zip(SHAPES, np.cumsum([0] + [a * b for a, b in SHAPES.values()])[:-1], strict=True))
    got = torch.cat([tail.stored(n)[0] + int(offsets[n]) for n in SHAPES])
    assert sorted(got.tolist()) == sorted(expected.tolist())  # ties broken by matrix order, then flat index
    for n in SHAPES:  # the raw S values sit beside their indices
        idx, value = tail.stored(n)
        assert torch.equal(value, sets["harm"][n].reshape(-1)[idx])
    assert tail.truncated == {"*": True} and tail.k == {"*": k}


def test_report_metrics_from_compact_equal_those_from_dense(tmp_path):
    _, sets = scores_with_ties(3)
    files = {}
    for fmt in ("dense", "compact"):
        kept = store.StoreSpec(store=fmt, keep=0.05, keep_benign=0.05)
        for kind, order in (("harm", "neg"), ("benign", "abs")):
            path = tmp_path / f"{kind}-{fmt}.safetensors"
            writer.write(sets[kind], path, kind, kept, "global", order)
            files[fmt, kind] = store.open_scores(path)
    for k in (1, 10, round(0.05 * N)):
        b = {fmt: concentration(files[fmt, "harm"], k) for fmt in ("dense", "compact")}
        c = {fmt: separation(files[fmt, "harm"], files[fmt, "benign"], k) for fmt in ("dense", "compact")}
        assert b["dense"] == b["compact"] and c["dense"] == c["compact"]
        assert b["dense"] == pytest.approx(concentration(sets["harm"], k), rel=1e-12)  # the in-memory computation
        assert c["dense"] == separation(sets["harm"], sets["benign"], k)
    assert gini(files["dense", "harm"]) == gini(files["compact", "harm"]) == pytest.approx(gini(sets["harm"]), 1e-12)


def numpy_gini(values: np.ndarray) -> float:
    """Independent: mean absolute difference over twice the mean, over all pairs."""
    x = np.maximum(values.astype(np.float64), 0)
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * x.size**2 * x.mean()))


@pytest.mark.parametrize("budget", [None, 7, 50])  # small budgets: many value ranges, each sorted on its own
def test_streamed_gini_equals_an_independent_computation(budget):
    g = torch.Generator().manual_seed(4)
    scores = {n: torch.randn(s, generator=g) * torch.rand(s, generator=g) ** 3 for n, s in SHAPES.items()}
    h = -torch.cat([t.reshape(-1) for t in scores.values()]).numpy()
    assert gini(scores, budget=budget) == pytest.approx(numpy_gini(h), rel=1e-10)


def test_summaries_are_exact_and_survive_the_file(tmp_path):
    _, sets = scores_with_ties(5)
    sets["harm"]["l0.q"][0, 0] = float("nan")  # a NaN score counts nowhere
    writer.write(sets["harm"], tmp_path / "h.safetensors", "harm", store.StoreSpec(), "global", "neg")
    stats = store.open_scores(tmp_path / "h.safetensors").stats
    h = -torch.cat([t.reshape(-1) for t in sets["harm"].values()]).double()
    assert stats.n == N - 1
    assert stats.harm_positive_sum == pytest.approx(float(h[h > 0].sum()), rel=1e-12)
    assert stats.gini == pytest.approx(numpy_gini(np.nan_to_num(h.numpy(), nan=0.0)[~np.isnan(h.numpy())]), 1e-10)


def test_a_request_past_the_stored_tail_stops_in_one_line(tmp_path):
    """Protected weights at the top of H push the K-th eligible one past a tail that holds K entries."""
    weights, sets = scores_with_ties(6)
    spec = PruneSpec(sparsity=0.05, protect=0.1)
    sets["benign"] = {n: -s for n, s in sets["harm"].items()}  # U = |S_benign| = H: the top of H is protected
    files = stored(tmp_path, sets, spec, store.StoreSpec(keep=0.06, keep_benign=0.1))
    with pytest.raises(HarmsweepError, match=r"use scores\.keep=auto .*, raise it, or use scores\.store=dense") as info:
        select(spec, PARAMS, weights, files)
    k, held = round(0.05 * N), round(0.06 * N)
    # more held than needed, and still too few: the message says why (the protected ones are skipped)
    assert f"needs {k:,} eligible entries of unit *" in str(info.value) and k < held
    assert f"(the top {held:,} of the ranking, scores.keep=0.06) has fewer left" in str(info.value)
    assert "protected weights" in str(info.value) and "\n" not in str(info.value)
    roomy = stored(tmp_path / "roomy", sets, spec, store.StoreSpec(keep=0.2, keep_benign=0.1))
    assert sum(t.numel() for t in select(spec, PARAMS, weights, roomy).values()) == round(0.05 * N)


def test_a_complete_tail_serves_every_request(tmp_path):
    """When a unit has fewer eligible weights than the tail holds, asking for more is answered as dense would."""
    weights, sets = scores_with_ties(7)
    sets["harm"] = {n: s.abs() for n, s in sets["harm"].items()}  # H = -S <= 0 everywhere but one weight
    sets["harm"]["l1.q"][3, 4] = -1.0
    spec = PruneSpec(sparsity=0.2, protect=0.0)
    files = stored(tmp_path, sets, spec, store.StoreSpec(keep=0.01))
    mask = select(spec, PARAMS, weights, files)
    assert {n: t.tolist() for n, t in mask.items() if t.numel()} == {"l1.q": [3 * 16 + 4]}
    assert files["harm"].truncated == {"*": False}


def test_a_compact_set_refuses_another_ranking_or_unit(tmp_path):
    weights, sets = scores_with_ties(8)
    spec = PruneSpec(sparsity=0.01, protect=0.05)
    files = stored(tmp_path, sets, spec, store.StoreSpec(keep=0.1, keep_benign=0.1))  # benign kept by |S|
    with pytest.raises(HarmsweepError, match="keeps the top of \\|S\\|, but this reader ranks by -S"):
        select(PruneSpec(sparsity=0.01, protect=0.05, benign_importance="signed"), PARAMS, weights, files)
    with pytest.raises(HarmsweepError, match="keeps score tails per global unit, not per matrix"):
        select(PruneSpec(sparsity=0.01, protect=0.05, granularity="matrix"), PARAMS, weights, files)


def test_compact_bytes_at_the_default_settings():
    """The figure the README quotes: Llama-3.1-8B's 6,979,321,856 scored weights, harm + benign set."""
    n, kept = 6_979_321_856, store.StoreSpec()  # auto: the floors, which serve the paper's whole range
    per_variant = store.stored_bytes(kept, "harm", n) + store.stored_bytes(kept, "benign", n)
    assert per_variant < 2e9 and per_variant == pytest.approx(1.69e9, rel=0.01)
    assert 2 * 4 * n / per_variant > 20  # a cached run reads under 1/20 of the dense bytes


def test_the_report_never_reads_a_damaged_score_file(tmp_path):
    from harmsweep.cache import write_manifest
    from harmsweep.report.build import _metrics_bc

    _, sets = scores_with_ties(9)
    entry = tmp_path / "scores" / "abc"
    entry.mkdir(parents=True)
    writer.write(sets["harm"], entry / "scores.safetensors", "harm", store.StoreSpec(keep=0.1), "global", "neg")
    write_manifest(entry, "scores.safetensors")
    rows = [{"run_id": "r1", "scores_harm": str(entry / "scores.safetensors"), "scores_benign": None, "n_scored": N}]
    intact = _metrics_bc(rows, rows, 0.01)
    assert intact["note"] == "" and intact["B_concentration"] == concentration(sets["harm"], round(0.01 * N))
    data = bytearray((entry / "scores.safetensors").read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the stored values
    (entry / "scores.safetensors").write_bytes(bytes(data))
    damaged = _metrics_bc(rows, rows, 0.01)
    assert damaged["B_concentration"] is None and damaged["gini"] is None
    assert damaged["note"].startswith("score file damaged, not read: abc: scores.safetensors has sha256")


def test_report_metrics_refuse_tails_kept_per_matrix(tmp_path):
    _, sets = scores_with_ties(10)
    writer.write(sets["harm"], tmp_path / "h.safetensors", "harm", store.StoreSpec(keep=0.2), "matrix", "neg")
    per_matrix = store.open_scores(tmp_path / "h.safetensors")
    with pytest.raises(HarmsweepError, match="keeps score tails per matrix unit, not per global"):
        concentration(per_matrix, 5)
    assert gini(per_matrix) == pytest.approx(gini(sets["harm"]), rel=1e-12)  # exact summaries serve any unit


# ---------------------------------------------------------------- written where the buffer lives (issue 23, defect 8)


def continuous(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {n: torch.randn(s, generator=g) * torch.rand(s, generator=g) ** 3 for n, s in SHAPES.items()}
    out["l0.q"][1, 2] = float("nan")
    return out


def digest(path) -> str:
    """The header (as a mapping: safetensors writes its keys in no fixed order) and every tensor's bytes."""
    import hashlib
    import json

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        h = hashlib.sha256(json.dumps(f.metadata(), sort_keys=True).encode())
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


# What the host-side writer of dc1a1ed..a38c407 wrote from these scores (digest above), kept to hold the
# device-side writer to the same files bit for bit.
WRITTEN_BEFORE = [
    ("ties", "harm", "global", "neg", 0.1, 0.1, "compact", "cf3a636574dbe5ab"),
    ("ties", "harm", "global", "neg", 0.011, 0.01, "compact", "dc9fdf0fcaa872ac"),
    ("ties", "harm", "matrix", "neg", 0.2, 0.1, "compact", "5706681cad558963"),
    ("ties", "harm", "row", "neg", 0.25, 0.1, "compact", "89612c3ea2acd3c7"),
    ("ties", "benign", "global", "abs", 0.1, 0.1, "compact", "aa13684d81774e70"),
    ("ties", "benign", "matrix", "neg", 0.1, 0.05, "compact", "ff5f650ee978c1b3"),
    ("ties", "harm_unsigned", "global", "pos", 0.05, 0.1, "compact", "2b12b2fa4b2cadd5"),
    ("ties", "benign_unsigned", "row", "pos", 0.1, 0.2, "compact", "ee510b5fba70b7a4"),
    ("cont", "harm", "global", "neg", 0.05, 0.1, "compact", "05dd9d7bace1a413"),
    ("cont", "harm", "matrix", "neg", 0.05, 0.1, "compact", "1ea5b7551fcd58ba"),
    ("cont", "harm", "global", "neg", 0.05, 0.1, "dense", "9723ec240492a85b"),
]


@pytest.mark.parametrize("streamed", [False, True], ids=["one-pass-tails", "streamed-tails"])
def test_written_sets_are_bit_identical_to_the_host_writers(tmp_path, monkeypatch, streamed):
    if streamed:  # every unit takes the three-pass fallback (values piled up in one bin)
        monkeypatch.setattr(writer, "_CANDIDATES_PER_K", 0)
        monkeypatch.setattr(writer, "_CANDIDATE_SLACK", -1)
    for src, kind, unit, order, keep, keep_benign, fmt, expected in WRITTEN_BEFORE:
        sets = scores_with_ties(11)[1][kind] if src == "ties" else continuous(12)
        path = tmp_path / f"{src}-{kind}-{unit}-{keep}-{fmt}.safetensors"
        writer.write(
            sets, path, kind, store.StoreSpec(store=fmt, keep=keep, keep_benign=keep_benign), unit, order, ROWS
        )
        assert digest(path) == expected, (src, kind, unit, keep, fmt)


@pytest.mark.parametrize(("budget", "expected"), [(None, "0x1.b97157a0dedb2p-1"), (7, "0x1.b97157a0dedb4p-1"),
                                                  (50, "0x1.b97157a0dedb4p-1")])  # fmt: skip
def test_gini_is_bit_identical_to_the_host_sort(budget, expected):
    """The Gini before issue 23 (numpy sort of each range on the host), to the last bit, ranges included."""
    from harmsweep.scoring import summary

    assert summary.gini(continuous(13), budget).hex() == expected


def _meta_write(tmp_path, monkeypatch, copies: int, kind: str, unit: str, fmt: str) -> tuple[object, list]:
    """write() on meta score tensors under the device audit; moves to the host stand in (ones) and are recorded."""
    from audit import audit, meta_capable

    from harmsweep.scoring import summary

    calls: list[list[tuple[int, ...]]] = []

    def to_host(tensors):
        calls.append([tuple(t.shape) for t in tensors])
        return [torch.ones(t.shape, dtype=t.dtype) for t in tensors]

    monkeypatch.setattr(summary, "to_host", to_host, raising=False)
    scores = {f"{n}#{c}": torch.empty(s, device="meta") for c in range(copies) for n, s in SHAPES.items()}
    rows = {f"{n}#{c}": d for c in range(copies) for n, d in ROWS.items()}
    path = tmp_path / f"{kind}-{unit}-{fmt}-{copies}.safetensors"
    with meta_capable(monkeypatch):
        watch = audit(lambda: writer.write(scores, path, kind, store.StoreSpec(store=fmt, keep=0.1, keep_benign=0.1),
                                          unit, store.order_of(kind), rows))  # fmt: skip
    assert path.is_file(), "the write stopped before its file: it read values on the host"
    return watch, calls


@pytest.mark.parametrize(
    ("kind", "unit", "fmt"),
    [
        ("harm", "global", "compact"),
        ("harm", "matrix", "compact"),
        ("harm", "row", "compact"),
        ("benign", "global", "compact"),
        ("harm", "global", "dense"),
    ],
)
def test_a_set_is_summarised_on_its_device_and_only_results_move(tmp_path, monkeypatch, kind, unit, fmt):
    """Defect 8: tails, N, sums and the Gini are computed where the buffers live (meta stands in for a GPU),
    mixing no devices; what moves to the host is summaries and tails (a dense set: its matrices), in a
    number of moves that does not grow with the number of matrices (a dense set's matrices aside)."""
    from audit import assert_one_device

    watch, calls = _meta_write(tmp_path, monkeypatch, 1, kind, unit, fmt)
    assert_one_device(watch)
    moved = [shape for call in calls for shape in call]
    if fmt == "compact":
        assert not set(moved) & set(SHAPES.values()), "a whole score matrix went to the host"
    _, twice = _meta_write(tmp_path, monkeypatch, 2, kind, unit, fmt)
    if fmt == "dense":  # every matrix comes to the host, one at a time (host memory, not a GPU wait, bounds it)
        matrices = set(SHAPES.values())
        assert all(len(call) == 1 for call in twice if set(call) & matrices)
        calls, twice = ([c for c in cs if not set(c) & matrices] for cs in (calls, twice))
    assert len(twice) == len(calls)


# ---------------------------------------------------------------- tails sized from what reads them (issue 23, item 5)


def auto_sets(tmp_path, sets: dict, spec: PruneSpec) -> dict:
    """Each set written as pipeline.stages.score writes it for ``spec`` with the default ``scores`` block."""
    kept = store.StoreSpec().resolved(*store.StoreSpec.needs(spec))
    return stored(tmp_path, sets, spec, kept)


@pytest.mark.parametrize(("sparsity", "protect"), [(0.01, 0.01), (0.02, 0.01), (0.01, 0.0), (0.005, 0.01)])
def test_the_default_store_serves_the_papers_range_and_beyond(tmp_path, sparsity, protect):
    """The worst case: every protected weight at the top of H, so the K-th eligible one sits at sparsity +
    protect down the ranking. Before issue 23 the default keep (0.011) stopped at sparsity 0.01."""
    from harmsweep.config.checks import _check_store

    weights, sets = scores_with_ties(6)
    sets["benign"] = {n: -s for n, s in sets["harm"].items()}  # U = |S_benign| = H: the top of H is protected
    spec = PruneSpec(sparsity=sparsity, protect=protect)
    _check_store(spec, store.StoreSpec())  # no stop before scoring either
    mask = select(spec, PARAMS, weights, auto_sets(tmp_path, sets, spec))
    dense = select(spec, PARAMS, weights, sets)
    assert all(torch.equal(mask[n], dense[n]) for n in PARAMS)
    assert sum(t.numel() for t in mask.values()) == round(sparsity * N) > 0


def test_auto_keeps_what_the_run_reads_and_numbers_still_work():
    auto = store.StoreSpec()
    assert auto.resolved(*store.StoreSpec.needs(PruneSpec(sparsity=1e-5, protect=0.01))).keep == 0.0202  # the floor
    assert auto.resolved(*store.StoreSpec.needs(PruneSpec(sparsity=0.05, protect=0.02))).keep == pytest.approx(0.0707)
    assert auto.resolved(*store.StoreSpec.needs(PruneSpec(sparsity=0.02, protect=0.03))).keep_benign == 0.03
    fraction = PruneSpec(sparsity=0.02, protect=0.1, harm_fraction=0.08)  # top 8% of H minus the protected: 8%
    assert auto.resolved(*store.StoreSpec.needs(fraction)).keep == pytest.approx(0.0808)
    assert store.StoreSpec(keep=0.3, keep_benign=0.2).resolved(0.5, 0.5) == store.StoreSpec(keep=0.3, keep_benign=0.2)
    store.StoreSpec(keep="auto", keep_benign=0.5).validate()
    with pytest.raises(HarmsweepError, match=r"scores\.keep=lots must be auto or a fraction in"):
        store.StoreSpec(keep="lots").validate()


def test_a_prepare_job_keeps_the_longest_tail_its_group_reads():
    from test_launcher import job

    from harmsweep.sweep import jobs as sweep_jobs

    runs = [job({"pruning.sparsity": 0.01, "pruning.protect": 0.01}, 0), job({"pruning.sparsity": 0.05}, 1),
            job({"pruning.sparsity": 0.001, "pruning.protect": 0.03}, 2)]  # fmt: skip
    (group,), _ = sweep_jobs.group_jobs(runs)
    over = sweep_jobs.prepare_overrides(group)
    assert "scores.keep=0.0606" in over and "scores.keep_benign=0.03" in over  # 0.05 + 0.01 (with 1% to spare)
    assert over[-3][: len("stage=")] == "stage="
    prepared = store.StoreSpec(keep=0.0606, keep_benign=0.03)
    for run in runs:
        cfg = run.typed()
        need = cfg.scores.resolved(*store.StoreSpec.needs(cfg.prune_spec()))
        assert need.keep <= prepared.keep and need.keep_benign <= prepared.keep_benign
    (bigger,), _ = sweep_jobs.group_jobs([*runs, job({"pruning.sparsity": 0.2}, 3)])
    assert bigger.key != group.key  # a relaunch that reads longer tails is prepared again


def _fake_run(tmp_path, monkeypatch, sets: dict, keep, sparsity: float, calls: list):
    """pipeline.stages.score on a stand-in model whose scoring returns ``sets["harm"]``."""
    from types import SimpleNamespace

    from harmsweep.pipeline import stages
    from harmsweep.scoring.spec import ScoringOptions

    def score_kind(model, kind, batches, n, options, logits_chunk=2048):
        calls.append(options)
        return {n: s.clone() for n, s in sets["harm"].items()}

    monkeypatch.setattr(stages, "score_kind", score_kind)
    monkeypatch.setattr(stages, "scored_parameters", lambda model: PARAMS)
    cfg = SimpleNamespace(calibration=SimpleNamespace(batch_size=2), model=SimpleNamespace(dtype="float32", logits_chunk=2048),
                          scores=store.StoreSpec(keep=keep), scoring=ScoringOptions(offload=True))  # fmt: skip
    ctx = SimpleNamespace(spec=PruneSpec(sparsity=sparsity, protect=0.0), lm=SimpleNamespace(fingerprint="f", model=None),
                          cfg=cfg, root=tmp_path)  # fmt: skip
    ids = torch.ones(4, 3, dtype=torch.long)
    tensors = {"input_ids": ids, "attention_mask": ids, "labels": ids}
    return stages.score(ctx, {"harmful": tensors, "benign": tensors}, "harm")


def test_a_stored_set_too_short_for_a_run_is_scored_again_and_replaced(tmp_path, monkeypatch):
    from harmsweep.cache import entry_problem

    weights, sets = scores_with_ties(12)
    calls: list = []
    first, path, computed = _fake_run(tmp_path, monkeypatch, sets, 0.05, 0.01, calls)
    assert computed and first.keep == 0.05
    assert calls[0].offload is False  # summarised on the device, before the buffers would leave it
    again, path2, computed = _fake_run(tmp_path, monkeypatch, sets, "auto", 0.01, calls)  # needs 0.0202: served
    assert (path2, computed, again.keep, len(calls)) == (path, False, 0.05, 1)
    longer, path3, computed = _fake_run(tmp_path, monkeypatch, sets, "auto", 0.08, calls)  # needs 0.0808
    assert (path3, computed, longer.keep, len(calls)) == (path, True, pytest.approx(0.0808), 2)
    assert entry_problem(path.parent, path.name) is None  # the replaced entry verifies
    assert sorted(p.name for p in path.parent.parent.iterdir() if not p.name.endswith(".lock")) == [path.parent.name]
    shorter, _, computed = _fake_run(tmp_path, monkeypatch, sets, 0.03, 0.02, calls)  # less: the longer set serves
    assert not computed and shorter.keep == pytest.approx(0.0808) and len(calls) == 2
    spec = PruneSpec(sparsity=0.08, protect=0.0)
    assert torch.equal(torch.cat([t.view(-1) for t in select(spec, PARAMS, weights, {"harm": longer}).values()]).sort()[0],
                       torch.cat([t.view(-1) for t in select(spec, PARAMS, weights, sets).values()]).sort()[0])  # fmt: skip
