"""Transfer and overlap matrices: exact values on hand-built cases, chance levels, and a random-mask check."""

from __future__ import annotations

import json

import pytest
import torch

from harmsweep.experiments.matrices import (
    Matrix,
    chance_jaccard,
    chance_overlap,
    mask_size,
    overlap_matrix,
    transfer_matrix,
)


def _m(**params: list[int]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(idx, dtype=torch.int64) for name, idx in params.items()}


def test_transfer_relative_reduction_exact():
    before = {"t1": 0.5, "t2": 0.25, "t3": 0.0}
    after = {"s1": {"t1": 0.1, "t2": 0.25, "t3": 0.2}, "s2": {"t1": 0.75, "t2": 0.0, "t3": 0.0}}
    m = transfer_matrix(before, after, "relative_reduction")
    assert m.rows == ["s1", "s2"]
    assert m.cols == ["t1", "t2", "t3"]
    assert m.kind == "relative_reduction"
    assert m.note
    assert m.values[0][0] == pytest.approx(0.8)
    assert m.values[0][1] == 0.0
    assert m.values[0][2] is None  # before == 0
    assert m.values[1][0] == pytest.approx(-0.5)  # harm went up
    assert m.values[1][1] == 1.0
    assert m.values[1][2] is None
    assert m.cell("s2", "t1") == pytest.approx(-0.5)


def test_transfer_none_inputs_and_order():
    before = {"b": 2.0, "a": None}
    after = {"z": {"a": 1.0, "b": None}, "y": {"a": 1.0, "b": 1.0}}
    m = transfer_matrix(before, after, "relative_reduction")
    assert m.rows == ["z", "y"]
    assert m.cols == ["b", "a"]
    assert m.values == [[None, None], [0.5, None]]


def test_transfer_delta():
    before = {"t1": 2.0, "t2": None}
    after = {"s1": {"t1": 3.5, "t2": 1.0}, "s2": {"t1": 1.0, "t2": 4.0}}
    m = transfer_matrix(before, after, "delta")
    assert m.kind == "delta"
    assert m.values == [[1.5, None], [-1.0, None]]


def test_transfer_unknown_kind_raises():
    with pytest.raises(ValueError, match="kind"):
        transfer_matrix({"t": 1.0}, {"s": {"t": 0.5}}, "ratio")


def test_overlap_two_params_exact():
    a = _m(w1=[0, 1, 2, 3], w2=[5])
    b = _m(w1=[2, 3, 4], w2=[5, 6])
    assert mask_size(a) == 5 and mask_size(b) == 5
    inter, jac = overlap_matrix({"A": a, "B": b}, n_total=100)
    assert inter.rows == inter.cols == ["A", "B"]
    assert inter.cell("A", "B") == pytest.approx(3 / 5)
    assert inter.cell("B", "A") == pytest.approx(3 / 5)
    assert jac.cell("A", "B") == pytest.approx(3 / 7)
    assert jac.cell("B", "A") == pytest.approx(3 / 7)
    assert inter.cell("A", "A") == 1.0 and inter.cell("B", "B") == 1.0
    assert jac.cell("A", "A") == 1.0 and jac.cell("B", "B") == 1.0
    assert inter.kind == "intersection" and jac.kind == "jaccard"
    assert inter.chance == pytest.approx(5 / 100)
    assert jac.chance == pytest.approx(5 / 195)
    assert "K/N" in inter.note and "K/(2N - K)" in jac.note


def test_overlap_same_index_other_param_is_not_shared():
    # index 5 in w1 and index 5 in w2 are different weights
    inter, jac = overlap_matrix({"A": _m(w1=[5]), "B": _m(w2=[5])}, n_total=10)
    assert inter.cell("A", "B") == 0.0
    assert jac.cell("A", "B") == 0.0


def test_overlap_asymmetric_and_empty():
    small = _m(w1=[1, 2])
    big = _m(w1=[0, 1, 2, 3], w2=[7, 8, 9, 10])
    empty = {"w1": torch.tensor([], dtype=torch.int64)}
    inter, jac = overlap_matrix({"S": small, "L": big, "E": empty}, n_total=1000)
    assert inter.cell("S", "L") == 1.0
    assert inter.cell("L", "S") == pytest.approx(2 / 8)
    assert jac.cell("S", "L") == pytest.approx(2 / 8)
    assert jac.cell("L", "S") == pytest.approx(2 / 8)
    assert inter.cell("E", "S") is None
    assert inter.cell("E", "E") is None
    assert inter.cell("S", "E") == 0.0
    assert jac.cell("E", "E") is None
    assert jac.cell("E", "S") == 0.0
    k = (2 + 8 + 0) / 3
    assert inter.chance == pytest.approx(k / 1000)
    assert jac.chance == pytest.approx(k / (2000 - k))


def test_overlap_duplicates_and_dtypes():
    a = {"w": torch.tensor([3, 3, 1], dtype=torch.int32)}
    b = {"w": torch.tensor([[1, 2]], dtype=torch.int64)}
    assert mask_size(a) == 2
    inter, jac = overlap_matrix({"a": a, "b": b}, n_total=10)
    assert inter.cell("a", "b") == 0.5
    assert jac.cell("a", "b") == pytest.approx(1 / 3)


def test_chance_values_exact():
    assert chance_overlap(2_000, 10_000) == 0.2
    assert chance_jaccard(2_000, 10_000) == pytest.approx(2_000 / 18_000)
    assert chance_overlap(0, 10) == 0.0
    with pytest.raises(ValueError):
        chance_overlap(1, 0)


def test_random_masks_match_chance():
    n, k = 10_000, 2_000
    shapes = {"w1": 4_000, "w2": 6_000}
    gen = torch.Generator().manual_seed(1234)

    def random_mask() -> dict[str, torch.Tensor]:
        flat = torch.randperm(n, generator=gen)[:k]
        return {"w1": flat[flat < shapes["w1"]], "w2": flat[flat >= shapes["w1"]] - shapes["w1"]}

    masks = {"a": random_mask(), "b": random_mask()}
    assert mask_size(masks["a"]) == k
    inter, jac = overlap_matrix(masks, n_total=n)
    assert inter.chance == pytest.approx(0.2)
    assert inter.cell("a", "b") == pytest.approx(k / n, abs=0.05)
    assert jac.cell("a", "b") == pytest.approx(jac.chance, abs=0.05)


def test_json_round_trip():
    inter, _ = overlap_matrix({"A": _m(w=[0, 1]), "B": _m(w=[1]), "E": {}}, n_total=50)
    d = json.loads(json.dumps(inter.to_json()))
    assert set(d) == {"rows", "cols", "values", "kind", "note", "chance"}
    back = Matrix.from_json(d)
    assert back == inter
    t = transfer_matrix({"t": 0.0}, {"s": {"t": 0.1}}, "relative_reduction")
    assert Matrix.from_json(json.loads(json.dumps(t.to_json()))) == t
    assert Matrix.from_json({"rows": ["r"], "cols": ["c"], "values": [[1]], "kind": "x"}).chance is None
