"""method=lowrank at 70B sizes: rank-deficient Grams, failing eigensolves, one Gram per input, ranks, devices, bytes.

References as in test_lowrank: numpy's / torch's float64 SVD of W X^T, inputs captured by plain hooks.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny
from test_lowrank import harmful_and_benign, rank_of, reference_delta
from test_scoring import encoded

from harmsweep.batches import iter_batches
from harmsweep.models.parts import scored_parameters
from harmsweep.pruning import lowrank
from harmsweep.pruning.lowrank import projector, removal, remove_low_rank
from harmsweep.pruning.spec import LowRankSpec

# ---------------------------------------------------------------- at 70B: rank-deficient Grams, shared inputs, sizes


def deficient(d_out: int, d_in: int, rank: int, n: int = 400, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """W (d_out x d_in) and X (n x d_in) of rank ``rank``, singular values spread over 1 .. 1e-3 (float64)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d_in, rank, generator=g, dtype=torch.float64)).Q
    spread = torch.logspace(0, -3, rank, dtype=torch.float64)
    x = torch.randn(n, rank, generator=g, dtype=torch.float64) @ (spread[:, None] * basis.T)
    return torch.randn(d_out, d_in, generator=g, dtype=torch.float64), x


def numpy_projector(w: torch.Tensor, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, int]:
    """numpy's float64 SVD of W X^T: the projector on its top ``rank`` directions above its numerical rank."""
    import numpy as np

    u, s, _ = np.linalg.svd(w.numpy() @ x.numpy().T, full_matrices=False)
    keep = min(rank, int((s > s[0] * max(u.shape) * np.finfo(np.float64).eps).sum()))
    u = torch.from_numpy(u[:, :keep])
    return u @ u.T, keep


@pytest.mark.parametrize("shape", [(200, 256), (300, 160)])  # solved on the output side, and on the input side
@pytest.mark.parametrize("rank", [5, 12, 40])  # within and beyond the rank (12) of the data
def test_a_rank_deficient_gram_gives_numpys_float64_projector(shape, rank, monkeypatch):
    monkeypatch.setattr(lowrank, "EXACT_MAX_D_OUT", 0, raising=False)  # dc1a1ed: float32 above it (70B's d = 8192)
    w, x = deficient(*shape, 12)
    p = projector(w, x.T @ x, rank).double()
    expected, keep = numpy_projector(w, x, rank)
    assert keep == min(rank, 12)
    assert float(p.trace()) == pytest.approx(keep, abs=1e-5)  # no direction the data never reaches
    torch.testing.assert_close(p, expected, atol=1e-5, rtol=0)
    captured = float((p @ w @ x.T).square().sum())  # as good: the same share of W X^T
    assert captured == pytest.approx(float((expected @ w @ x.T).square().sum()), rel=1e-7)


def garbage_eigh(kind: str):
    """torch.linalg.eigh as cuSOLVER's float32 fails on a rank-deficient 8192^2 Gram: an error, NaNs, or wrong vectors."""
    real = torch.linalg.eigh

    def eigh(m, *args, **kwargs):
        if kind == "error":
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        values, vectors = real(m, *args, **kwargs)
        if kind == "nan":
            return values, torch.full_like(vectors, float("nan"))
        shuffle = torch.randperm(vectors.size(1), generator=torch.Generator().manual_seed(0))
        return values, vectors[:, shuffle]  # orthonormal, finite, not the eigenvectors of those values

    return eigh


@pytest.mark.parametrize("kind", ["error", "nan", "wrong"])
@pytest.mark.parametrize("shape", [(60, 80), (90, 50)])
def test_a_failed_eigensolve_falls_back_to_a_right_one(kind, shape, monkeypatch):
    w, x = deficient(*shape, 10, n=100)
    x_u = torch.randn(120, shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = reference_delta(w, x, x_u, 6, 3)
    monkeypatch.setattr(torch.linalg, "eigh", garbage_eigh(kind))
    delta = removal(w, x.T @ x, x_u.T @ x_u, 6, 3)
    torch.testing.assert_close(delta, expected, atol=1e-8, rtol=1e-6)


def test_one_gram_per_distinct_input_and_the_rank_actually_removed():
    """q/k/v read one input, gate/up another: 4 Grams per Llama block and batch, not 7."""
    from torch.utils._python_dispatch import TorchDispatchMode

    harmful, benign = harmful_and_benign(tiny())
    lm = tiny()
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    batches = list(iter_batches(harmful, 2))

    class Grams(TorchDispatchMode):
        folds = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.addmm_ and args[0].size(0) == args[0].size(1):
                Grams.folds += 1
            return func(*args, **(kwargs or {}))

    with Grams():
        stats = remove_low_rank(lm.model, batches, iter_batches(benign, 2), LowRankSpec(6, 0))
    layers = lm.model.config.num_hidden_layers
    assert Grams.folds == 4 * layers * len(batches)
    got = dict(lm.model.named_parameters())  # the values: test_remove_low_rank_equals_block_by_block_by_hand
    for n in scored_parameters(lm.model):
        assert stats[n]["rank_removed"] == rank_of(before[n] - got[n].detach())


def test_rank_removed_counts_the_directions_that_exist():
    """Fewer harmful directions than asked (few tokens), or all but two spared by the utility subspace."""
    harmful, benign = harmful_and_benign(tiny())
    few = {k: v[:1] for k, v in harmful.items()}  # one sample: fewer response tokens than r_h
    tokens = int((few["labels"] != -100).sum())
    lm = tiny()
    name = "model.layers.0.mlp.up_proj.weight"  # 128 x 64
    before = dict(lm.model.named_parameters())[name].detach().clone()
    stats = remove_low_rank(lm.model, iter_batches(few, 1), [], LowRankSpec(60, 0), [name])
    after = dict(lm.model.named_parameters())[name].detach()
    assert tokens < 60 and stats[name]["rank_removed"] == tokens
    assert rank_of(before - after) == tokens
    lm = tiny()
    name = "model.layers.1.self_attn.v_proj.weight"  # 32 x 64: r_u = 30 of 32 leaves 2 directions to remove
    before = dict(lm.model.named_parameters())[name].detach().clone()
    stats = remove_low_rank(lm.model, iter_batches(harmful, 2), iter_batches(benign, 2), LowRankSpec(8, 30), [name])
    after = dict(lm.model.named_parameters())[name].detach()
    assert stats[name]["rank_removed"] == 2 == rank_of(before - after)


def test_removal_on_a_model_off_the_cpu_mixes_no_devices(monkeypatch):
    """The whole removal (Grams, factors, eigensolves, sines, updates) on ``meta``, every matrix of both blocks.

    Meta holds no values: the eigensolve check (a host read) is stood in for, boolean selections keep every
    entry, and the run ends at the read-back of the statistics. Eager attention: HF's SDPA mask reads values.
    """
    from audit import assert_one_device, audit, meta_capable

    harmful, benign = harmful_and_benign(tiny())
    lm = tiny()
    lm.model.config._attn_implementation = "eager"
    lm.model.to("meta")
    monkeypatch.setattr(lowrank, "_accurate", lambda m, values, vectors: True)
    solved: list[str] = []
    real = lowrank._exact_removal
    monkeypatch.setattr(lowrank, "_exact_removal", lambda w, *a: solved.append(w.device.type) or real(w, *a))
    spec = LowRankSpec(4, 2)
    with meta_capable(monkeypatch):
        watch = audit(lambda: remove_low_rank(lm.model, iter_batches(harmful, 2), iter_batches(benign, 2), spec))
    assert_one_device(watch)
    assert solved == ["meta"] * len(scored_parameters(lm.model))


@pytest.mark.parametrize("shape", [(96, 160), (256, 96)])  # d_out <= d_in, and wide (gate/up)
@pytest.mark.parametrize(("r_h", "r_u"), [(8, 0), (40, 60)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowrank_bytes_is_the_measured_peak_of_one_matrix(shape, r_h, r_u, dtype):
    """The planner's figure against the live tensor bytes of one matrix's change on the CPU (Grams given)."""
    from alloc import peak_bytes

    from harmsweep.pruning.lowrank_size import eigh_workspace_bytes, lowrank_bytes

    d_out, d_in = shape
    g = torch.Generator().manual_seed(6)
    w = torch.randn(shape, generator=g).to(dtype)
    x_h, x_u = (torch.randn(300, d_in, generator=g, dtype=torch.float64) for _ in range(2))
    g_h, g_u = x_h.T @ x_h, x_u.T @ x_u if r_u else None
    keys = (("h", "x"), ("u", "x") if r_u else None)
    measured = peak_bytes(lambda: lowrank._change(w, g_h, g_u, LowRankSpec(r_h, r_u), {}, keys))
    tensors = lowrank_bytes(d_in, d_out, r_h, r_u, w.element_size(), workspace=False)
    assert tensors == pytest.approx(measured, rel=0.15)
    solver = eigh_workspace_bytes(min(d_out, d_in))  # every eigensolve is of this size: at most one at a time
    assert tensors < lowrank_bytes(d_in, d_out, r_h, r_u, w.element_size()) <= tensors + solver


def test_lowrank_grams_are_the_grams_of_a_block():
    from harmsweep.pruning.lowrank_size import FOLD_ROWS, lowrank_grams

    lm = tiny()
    layer = 1
    weights = {n: p.detach() for n, p in lm.model.named_parameters() if n in scored_parameters(lm.model)
               and f"layers.{layer}." in n}  # fmt: skip
    grams, keys = lowrank._grams(lm.model, list(iter_batches(encoded(lm), 2)), weights, "response", layer, "harmful")
    assert len(grams) == 4 and len(set(keys.values())) == 4  # q/k/v, o, gate/up, down
    dims = [g.size(0) for g in grams.values()]
    assert sum(g.nbytes for g in grams.values()) == lowrank_grams(dims, 0) - 8 * FOLD_ROWS * max(dims)
    assert lowrank_grams(dims, 3) - lowrank_grams(dims, 0) == sum(g.nbytes for g in grams.values())
