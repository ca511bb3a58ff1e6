"""The benchmarks' own reference implementations agree with harmsweep's (bench/ runs them at scale)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import mask_select
import per_layer

from harmsweep.batches import iter_batches
from harmsweep.scoring.snip import signed_snip


def test_per_layer_scheme_sums_to_signed_snip():
    lm = per_layer.tiny_llama(2, hidden=64, intermediate=128)
    tensors = per_layer.encoded(lm, 4)
    batched = signed_snip(lm.model, list(iter_batches(tensors, 4)), n_samples=4)
    done: list[int] = []
    layered = per_layer.per_layer_scores(lm.model, tensors, on_layer=done.append)
    assert done == [0, 1]
    assert set(layered) == set(batched) and len(batched) == 14  # 2 layers x 7 linear weights
    scale = max(float(s.abs().max()) for s in batched.values())
    for name, s in batched.items():
        torch.testing.assert_close(layered[name], s, rtol=1e-4, atol=1e-6 * scale)
    assert all(not p.requires_grad or p.grad is None for p in lm.model.parameters())


def test_full_sort_reference_selects_what_select_selects():
    shapes = mask_select.layout(1e5)
    harm, benign = mask_select.make_scores(shapes, "harm"), mask_select.make_scores(shapes, "benign")
    n = sum(t.numel() for t in harm.values())
    assert len(shapes) == 32 * 7 and abs(n - 1e5) < 2e3
    chosen = mask_select.global_indices(mask_select.streaming(harm, benign, 1e-3, 0.01), harm)
    assert chosen.numel() == round(1e-3 * n)
    assert torch.equal(chosen, mask_select.reference(harm, benign, 1e-3, 0.01))
    assert torch.equal(chosen, mask_select.reference(harm, benign, 1e-3, 0.01, "topk"))


def test_full_sort_reference_breaks_ties_like_select():
    shapes = mask_select.layout(2e4, layers=4)
    harm = {n: t.mul(4).round() for n, t in mask_select.make_scores(shapes, "harm").items()}  # heavy ties
    benign = {n: t.mul(4).round() for n, t in mask_select.make_scores(shapes, "benign").items()}
    chosen = mask_select.global_indices(mask_select.streaming(harm, benign, 0.02, 0.05), harm)
    assert torch.equal(chosen, mask_select.reference(harm, benign, 0.02, 0.05))


def _bench(name: str, *args: str, tmp_path: Path) -> dict:
    """Run bench/<name>.py small, in its own process as a user would; its JSON record."""
    import subprocess

    out = tmp_path / f"{name}.json"
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # a fresh process per selection, four of them
def test_compact_selection_bench_compares_equal_masks(tmp_path):
    """bench/compact_select.py: the compact path's speed-up is only claimed for the dense path's exact mask."""
    record = _bench("compact_select", "--sizes", "2e5", "--reps", "1", tmp_path=tmp_path)
    assert [r["granularity"] for r in record["results"]] == ["global", "matrix"]
    assert all(r["same_mask"] for r in record["results"])
    assert record["results"][0]["selected"] == round(1e-5 * record["results"][0]["n"])  # global: K of all N


def test_score_write_bench_times_both_kinds_against_one_pass(tmp_path):
    record = _bench("score_write", "--n-scores", "2e5", "--reps", "1", tmp_path=tmp_path)
    assert set(record["sets"]) == {"harm", "benign"}
    assert all(s["ratio"] > 0 and s["bytes"] > 0 for s in record["sets"].values())


def test_btap_per_layer_bench_scores_the_same_and_extrapolates_a_partial_run(tmp_path):
    """bench/per_layer_btap.py: the speed ratio is only claimed for score sets equal up to fp32 rounding."""
    record = _bench("per_layer_btap", "--model", "tiny", "--n", "3", "--layers", "1", tmp_path=tmp_path)
    assert record["passes"] == {"harmsweep": 1, "per_layer": 2 * 3, "per_layer_run": 3}
    assert record["layers_run"] == [1] and record["extrapolated"] and record["matrices_compared"] == 7
    assert record["seconds"]["per_layer"] == 2 * record["seconds"]["per_layer_run"]
    assert record["max_rel_diff"] < 1e-5
    # int(1e-3 * numel): q, o 4; k, v 2 (two kv heads); gate, up, down 8
    assert record["mask_size"] == 4 + 2 + 2 + 4 + 8 * 3 and record["mask_agree"] >= record["mask_size"] - 1


def test_the_identity_check_compares_every_field_but_timings_and_versions(tmp_path, capsys):
    """bench/result_identity.py is how a refactor shows it changed no result: it must see a changed field."""
    import result_identity

    result = {"run_id": "a1", "metrics": {"nll": 1.0, "per": [1, 2]}, "timings_s": {"load": 1.0}, "versions": {"t": 1}}
    for side, changes in (("before", {}), ("same", {"timings_s": {"load": 9.0}, "versions": {"t": 2}})):
        (tmp_path / side / "runs" / "x").mkdir(parents=True)
        (tmp_path / side / "runs" / "x" / "result.json").write_text(json.dumps({**result, **changes}))
    assert result_identity.compare(tmp_path / "before", tmp_path / "same") == 0
    assert "1 runs, 4 fields compared, 0 differ" in capsys.readouterr().out
    (tmp_path / "other" / "runs" / "x").mkdir(parents=True)
    changed = {**result, "metrics": {"nll": 1.0, "per": [1, 3]}}
    (tmp_path / "other" / "runs" / "x" / "result.json").write_text(json.dumps(changed))
    assert result_identity.compare(tmp_path / "before", tmp_path / "other") == 1
    assert "metrics.per[1]: 2 != 3" in capsys.readouterr().out
