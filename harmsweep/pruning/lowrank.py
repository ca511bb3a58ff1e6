"""Low-rank removal (method=lowrank): Wei et al. 2024's ActSVD with orthogonal projection.

Why: pruning removes single weights; ActSVD removes directions. For a linear layer W (d_out x d_in) and
calibration inputs X (tokens x d_in), the left singular vectors of W X^T are the output directions the
layer actually uses on that data, ordered by how much. The top r_h of them on harmful calibration
responses span the harmful subspace (projector P_h); the top r_u on benign responses the utility
subspace (P_u). The update

    W_new = W - (I - P_u) P_h W

takes out of W what it writes into the harmful subspace, except what also lies in the utility subspace
(rank(Delta) <= r_h; r_u = 0 removes the whole harmful subspace, r_h = 0 changes nothing).
This is their main_low_rank_diff.py, whose prune_data_neg set is played here by the harmful set and
prune_data_pos by the benign one. Their flags --rank_pos/--rank_neg are the ranks *kept* out of
total = min(d_out, d_in) (a subspace of rank q = total - rank_pos is computed); here the ranks are those of
the subspaces directly: rank_utility = total - rank_pos, rank_harmful = total - rank_neg.

Exactness: the left singular vectors of W X^T are the eigenvectors of W G W^T with G = X^T X, so only the
Gram G is accumulated (fp32, one d_in x d_in matrix per weight; X is never kept) and torch.linalg.eigh
(exact, float64 up to d_out = 4096) replaces their randomised torch.svd_lowrank.

Layer by layer, as theirs: block l's Grams are recorded after blocks 0..l-1 were changed, so each block
sees what the modified model feeds it. Cost: per calibration set one partial forward per block (the
forward stops after block l: about L/2 full passes in all), no backward; the benign set is skipped when
r_u = 0. Memory: the Grams of one block and one set pair at a time, beside the weights.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping

import torch
from torch import Tensor, nn

from harmsweep.errors import HarmsweepError
from harmsweep.models.activations import fold_inputs
from harmsweep.models.parts import scored_parameters
from harmsweep.pruning.spec import LowRankSpec

EXACT_MAX_D_OUT = 4096  # eigh in float64 up to this d_out, float32 above (time and memory of a d_out^2 matrix)
Batch = Mapping[str, Tensor]


def _compute_dtype(d_out: int) -> torch.dtype:
    return torch.float64 if d_out <= EXACT_MAX_D_OUT else torch.float32


def _basis(weight: Tensor, gram: Tensor, rank: int) -> Tensor:
    """U_r: the top-``rank`` eigenvectors of W G W^T (= left singular vectors of W X^T), d_out x r.

    ``rank`` is clipped to min(d_out, d_in); the result is in the compute dtype, on the weight's device.
    A wide output (d_out > d_in: gate/up projections) is solved on the input side instead: with
    A = W G^(1/2), A A^T = W G W^T, and the top eigenvectors V of the d_in x d_in matrix A^T A give
    U = A V / s, so no d_out x d_out eigenproblem is ever formed.
    """
    d_out, d_in = weight.shape
    rank = min(rank, d_out, d_in)
    dtype = _compute_dtype(min(d_out, d_in))
    if rank <= 0:
        return weight.new_zeros((d_out, 0), dtype=dtype)
    w = weight.detach().to(dtype)
    g = gram.to(device=w.device, dtype=dtype)
    if d_out <= d_in:
        m = w @ (g @ w.T)
        _, vectors = torch.linalg.eigh((m + m.T) / 2)  # ascending eigenvalues
        return vectors[:, d_out - rank :]
    values, q = torch.linalg.eigh((g + g.T) / 2)
    a = w @ (q * values.clamp(min=0).sqrt()) @ q.T  # W G^(1/2)
    m = a.T @ a
    s2, v = torch.linalg.eigh((m + m.T) / 2)
    s = s2[d_in - rank :].clamp(min=0).sqrt()
    used = s > s.max() * d_in * torch.finfo(dtype).eps  # directions the data never reaches have no U: drop them
    return (a @ v[:, d_in - rank :])[:, used] / s[used]


def projector(weight: Tensor, gram: Tensor, rank: int) -> Tensor:
    """P = U_r U_r^T (d_out x d_out, float32): the orthogonal projection on the top-``rank`` output subspace
    of ``weight`` (d_out x d_in) on inputs whose Gram X^T X is ``gram``."""
    u = _basis(weight, gram, rank)
    return (u @ u.T).float()


def removal(
    weight: Tensor, gram_harmful: Tensor, gram_utility: Tensor | None, rank_harmful: int, rank_utility: int
) -> Tensor:
    """Delta = (I - P_u) P_h W, same dtype and shape as ``weight`` (given as d_out x d_in); W - Delta is ActSVD's.

    Computed from the bases (U (U^T W)), never forming I - P_u; ``gram_utility`` may be None when r_u = 0.
    """
    return _exact_removal(weight, gram_harmful, gram_utility, rank_harmful, rank_utility).to(weight.dtype)


def _exact_removal(
    weight: Tensor, gram_harmful: Tensor, gram_utility: Tensor | None, rank_harmful: int, rank_utility: int
) -> Tensor:
    """Delta in the compute dtype (float64 up to d_out = 4096), so that W - Delta is rounded once."""
    u_h = _basis(weight, gram_harmful, rank_harmful)
    w = weight.detach().to(u_h.dtype)
    delta = u_h @ (u_h.T @ w)
    if rank_utility > 0 and u_h.size(1) > 0:
        if gram_utility is None:
            raise ValueError("rank_utility > 0 needs the utility Gram")
        u_u = _basis(weight, gram_utility, rank_utility)
        delta = delta - u_u @ (u_u.T @ delta)
    return delta


def _grams(
    model: nn.Module, batches: list[Batch], weights: Mapping[str, Tensor], tokens: str, layer: int, what: str
) -> dict[str, Tensor]:
    """X^T X (fp32, beside each weight) of the inputs of ``weights`` (d_out x d_in, all in block ``layer``)."""
    grams = {n: w.new_zeros((w.size(1), w.size(1)), dtype=torch.float32) for n, w in weights.items()}
    names = list(weights)
    counts = dict.fromkeys(names, 0)

    def fold(name: str, x: Tensor) -> None:
        grams[name].addmm_(x.T, x)
        counts[name] += x.size(0)

    fold_inputs(model, batches, names, fold, tokens, upto_layer=layer, desc=f"lowrank {what} block {layer}")
    empty = [n for n, c in counts.items() if c == 0]
    if empty:
        raise HarmsweepError(f"no {what} calibration tokens (lowrank.tokens={tokens}) reached {empty[0]}")
    return grams


def remove_low_rank(
    model: nn.Module,
    harmful_batches: Iterable[Batch],
    benign_batches: Iterable[Batch],
    spec: LowRankSpec,
    names: Collection[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Subtract Delta from every scored weight (or those in ``names``), block by block, in place.

    Returns per weight ``rank_removed`` (r_h clipped to min(d_out, d_in): the rank of the harmful subspace
    used, an upper bound of rank(Delta)) and ``relative_norm`` ||Delta||_F / ||W||_F.
    """
    spec.validate()
    rows = scored_parameters(model)
    if names is not None and set(names) - rows.keys():
        raise ValueError(f"not scored weights: {sorted(set(names) - rows.keys())[:3]}")
    named = dict(model.named_parameters())
    by_layer: dict[int, list[str]] = defaultdict(list)
    for n, r in rows.items():
        if names is None or n in names:
            by_layer[r.layer].append(n)
    stats: dict[str, dict[str, float]] = {}
    if spec.rank_harmful == 0:  # nothing to remove: no forward pass at all
        return {n: {"rank_removed": 0, "relative_norm": 0.0} for ns in by_layer.values() for n in ns}
    harmful = list(harmful_batches)  # every block reads the sets again
    benign = list(benign_batches) if spec.rank_utility > 0 else []
    for layer in sorted(by_layer):
        conv = {n: rows[n].rows_dim == 1 for n in by_layer[layer]}  # Conv1D stores (d_in, d_out)
        weights = {n: named[n].detach().T if c else named[n].detach() for n, c in conv.items()}  # d_out x d_in
        g_harm = _grams(model, harmful, weights, spec.tokens, layer, "harmful")
        g_util = _grams(model, benign, weights, spec.tokens, layer, "benign") if spec.rank_utility else {}
        for n, w in weights.items():
            delta = _exact_removal(w, g_harm.pop(n), g_util.pop(n, None), spec.rank_harmful, spec.rank_utility)
            exact = w.to(delta.dtype)  # may be w itself: never changed in place
            stats[n] = {
                "rank_removed": min(spec.rank_harmful, *w.shape),
                "relative_norm": float(delta.norm() / exact.norm().clamp_min(1e-30)),
            }
            new = (exact - delta).to(w.dtype)  # one rounding to the weight's dtype (bf16: not two)
            with torch.no_grad():
                named[n].copy_(new.T if conv[n] else new)
            del delta, exact, new
    return stats
