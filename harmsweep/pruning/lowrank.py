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
Gram G is accumulated (one d_in x d_in matrix per distinct input: q/k/v share one, gate/up another; X is
never kept) and torch.linalg.eigh (exact) replaces their randomised torch.svd_lowrank. Everything is float64:
squaring W X^T squares its condition, and float32 eigh on a rank-deficient 8192^2 Gram (70B) fails to
converge or returns garbage in cuSOLVER. Directions whose energy is below RTOL of the top one (or below the
Gram's own rounding) are numerically zero and never chosen, so a subspace can have fewer directions than
asked; ``rank_removed`` is the rank of the update actually applied. Each eigensolve is checked (finite,
residual, orthonormal) and redone on the host in float64, then by SVD, if the device's fails.

Where: Grams, solves and updates stay on the weight's device (A100/H100/H200 run float64 at half or all of
the float32 rate); only a failed solve moves its matrix to the host on purpose (LAPACK, then back).

Memory (all float64, figures in harmsweep.pruning.lowrank_size, which ``plan`` reads): one block's Grams at
a time, 8 d_in^2 bytes per distinct input and set (``lowrank_grams``), and per matrix, one at a time
(``lowrank_bytes``): the weight's float64 copy 8 d_out d_in; for d_out <= d_in, G W^T and M = W G W^T, then M
with its eigenvectors (2 x 8 d_out^2) and the solver's workspace (~2 x 8 d_out^2); for d_out > d_in (gate/up),
G's factor F (8 d_in^2, shared by the layers reading G) and A = W F (8 d_out d_in); the bases (8 d_out r);
then Delta (8 d_out d_in), turned into W - Delta in place and copied into the weight.

Layer by layer, as theirs: block l's Grams are recorded after blocks 0..l-1 were changed, so each block
sees what the modified model feeds it. Cost: per calibration set one partial forward per block (the
forward stops after block l: about L/2 full passes in all), no backward; the benign set is skipped when
r_u = 0.
"""

from __future__ import annotations

import weakref
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping

import torch
from torch import Tensor, nn

from harmsweep.errors import HarmsweepError
from harmsweep.models.activations import fold_inputs, linear_modules
from harmsweep.models.parts import scored_parameters
from harmsweep.pruning.lowrank_size import FOLD_ROWS, gram_bytes, lowrank_bytes, lowrank_grams
from harmsweep.pruning.spec import LowRankSpec

__all__ = ["gram_bytes", "lowrank_bytes", "lowrank_grams", "projector", "removal", "remove_low_rank"]

F64 = torch.float64
RTOL = 1e-10  # energy (s^2) share of the top direction below which a direction is numerically zero
CHECK = 1e-8  # relative residual and orthonormality an eigensolve must reach to be used
SINE = 1e-8  # a harmful direction this close to the utility subspace is spared whole
Batch = Mapping[str, Tensor]


def _zero_rtol(n: int, dtype: torch.dtype) -> float:
    """Energies under this share of the largest are noise: RTOL, or the rounding of an n x n Gram of ``dtype``."""
    return max(RTOL, n * torch.finfo(dtype).eps)


def _eigh_on_host(m: Tensor) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh(m.cpu())
    return values.to(m.device), vectors.to(m.device)


def _svd_on_host(m: Tensor) -> tuple[Tensor, Tensor]:
    """For a symmetric PSD m the SVD is its eigendecomposition; ascending, as eigh's."""
    u, s, _ = torch.linalg.svd(m.cpu())
    return s.flip(0).to(m.device), u.flip(1).to(m.device)


def _accurate(m: Tensor, values: Tensor, vectors: Tensor) -> bool:
    """Whether the chosen eigenpairs are eigenpairs of m: finite, small residual, orthonormal (one host sync)."""
    residual = (m @ vectors).addcmul_(vectors, values, value=-1)
    gram = vectors.T @ vectors
    gram.diagonal().sub_(1)
    scale = m.norm()
    ok = (residual.norm() <= CHECK * scale) & (gram.norm() <= CHECK * max(vectors.size(1), 1) ** 0.5)
    return bool(ok & torch.isfinite(values).all() & torch.isfinite(scale))


def _top(m: Tensor, rank: int, rtol: float) -> tuple[Tensor, Tensor]:
    """The top eigenpairs of the symmetric PSD float64 ``m`` (only its lower triangle is read): at most ``rank``,
    none numerically zero. Values (k,) and vectors (n x k), on m's device, in no particular order."""
    n = m.size(0)
    rank = min(rank, n)
    for solve in (torch.linalg.eigh, _eigh_on_host, _svd_on_host):
        if solve is _eigh_on_host and m.device.type == "cpu":
            continue  # the host is where it just failed
        try:
            values, vectors = solve(m)  # ascending
        except (torch.linalg.LinAlgError, RuntimeError):  # no convergence; cuSOLVER status errors, out of memory
            continue
        keep = values[n - rank :] > rtol * values[-1]  # a zero matrix keeps nothing
        top, basis = values[n - rank :][keep], vectors[:, n - rank :][:, keep]  # copies: the n x n go now
        del values, vectors
        if _accurate(m, top, basis):
            return top, basis
    raise HarmsweepError(f"the eigensolve of a {n} x {n} low-rank matrix failed on the device and on the host")


def _factor(gram: Tensor) -> Tensor:
    """F (d_in x k, float64) with F F^T = G on G's numerical range: a wide weight's input side (gate/up).

    A = W F has the left singular vectors of W X^T, so a wide output never forms a d_out x d_out problem.
    """
    d_in = gram.size(0)
    values, vectors = _top(gram.to(F64), d_in, _zero_rtol(d_in, gram.dtype))
    return vectors.mul_(values.sqrt())


def _basis(w: Tensor, gram: Tensor, rank: int, factor: Tensor | None = None) -> Tensor:
    """U: the top left singular vectors of W X^T (at most ``rank``, none numerically zero), d_out x k float64.

    ``w`` is float64, d_out x d_in, on the device the result lives on; ``factor`` is G's (``_factor``), when
    already computed for another weight reading the same input.
    """
    d_out, d_in = w.shape
    rank = min(rank, d_out, d_in)
    if rank <= 0:
        return w.new_zeros((d_out, 0))
    rtol = _zero_rtol(max(d_out, d_in), gram.dtype)
    if d_out <= d_in:
        m = w @ (gram.to(device=w.device, dtype=F64) @ w.T)  # W G W^T
        return _top(m, rank, rtol)[1]
    f = factor if factor is not None else _factor(gram.to(w.device))
    a = w @ f
    s2, v = _top(a.T @ a, rank, rtol)
    return (a @ v).div_(s2.sqrt())


def projector(weight: Tensor, gram: Tensor, rank: int) -> Tensor:
    """P = U_r U_r^T (d_out x d_out, float32): the orthogonal projection on the top-``rank`` output subspace
    of ``weight`` (d_out x d_in) on inputs whose Gram X^T X is ``gram`` (its directions that carry signal)."""
    u = _basis(weight.detach().to(F64), gram, rank)
    return (u @ u.T).float()


def removal(
    weight: Tensor, gram_harmful: Tensor, gram_utility: Tensor | None, rank_harmful: int, rank_utility: int
) -> Tensor:
    """Delta = (I - P_u) P_h W, same dtype and shape as ``weight`` (given as d_out x d_in); W - Delta is ActSVD's.

    Computed from the bases (U (U^T W)), never forming I - P_u; ``gram_utility`` may be None when r_u = 0.
    """
    w = weight.detach().to(F64)
    return _exact_removal(w, gram_harmful, gram_utility, rank_harmful, rank_utility)[0].to(weight.dtype)


def _exact_removal(
    w: Tensor,
    gram_harmful: Tensor,
    gram_utility: Tensor | None,
    rank_harmful: int,
    rank_utility: int,
    factors: tuple[Tensor | None, Tensor | None] = (None, None),
) -> tuple[Tensor, int | Tensor]:
    """Delta (float64, from the float64 ``w``) and its rank: the harmful directions the utility subspace leaves.

    (I - P_u) U_h = Y S Z^T: the sines S of U_h's angles to the utility subspace; those under SINE are spared
    whole, so the update applied has exactly the rank reported.
    """
    u_h = _basis(w, gram_harmful, rank_harmful, factors[0])
    rank: int | Tensor = u_h.size(1)
    c = u_h
    if rank_utility > 0 and u_h.size(1) > 0:
        if gram_utility is None:
            raise ValueError("rank_utility > 0 needs the utility Gram")
        c, rank = _spared(u_h, _basis(w, gram_utility, rank_utility, factors[1]))
    return c @ (u_h.T @ w), rank


def _spared(u_h: Tensor, u_u: Tensor) -> tuple[Tensor, Tensor]:
    """(I - P_u) U_h without the directions the utility subspace holds (sines under SINE), and its rank."""
    c = u_h - u_u @ (u_u.T @ u_h)
    y, sines, _ = torch.linalg.svd(c, full_matrices=False)
    kept = sines > SINE
    y = y[:, kept]
    return y @ (y.T @ c), kept.sum()


def _change(
    w: Tensor,
    gram_harmful: Tensor,
    gram_utility: Tensor | None,
    spec: LowRankSpec,
    factors: dict[tuple[str, str], Tensor],
    keys: tuple[tuple[str, str], tuple[str, str] | None],
) -> tuple[int | Tensor, Tensor]:
    """W <- W - Delta for one matrix (``w``: its d_out x d_in view, written in place); rank(Delta), ||Delta||/||W||.

    A wide matrix's Gram factors go into ``factors`` (under ``keys``) for the next matrix reading that input.
    Peak device bytes: ``lowrank_bytes``.
    """
    exact = w.to(F64)  # may be w itself: never changed in place
    if w.size(0) > w.size(1):
        for key, gram in ((keys[0], gram_harmful), (keys[1], gram_utility)):
            if key is not None and gram is not None and key not in factors:
                factors[key] = _factor(gram)
    side = tuple(factors.get(k) if k is not None else None for k in keys)
    delta, rank = _exact_removal(exact, gram_harmful, gram_utility, spec.rank_harmful, spec.rank_utility, side)
    ratio = delta.norm() / exact.norm().clamp_min(1e-30)
    with torch.no_grad():
        w.copy_(delta.neg_().add_(exact))  # W - Delta in float64, rounded once to the weight's dtype
    return rank, ratio


class _SharedInputs:
    """Which linear layers read the very same tensor in a forward (q/k/v, gate/up): they share one Gram.

    Forward pre-hooks, registered before fold_inputs' own so they run first, remember each input by weak
    reference (nothing is kept alive) and name, for each layer, the first layer seen with the same input.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.last: dict[str, weakref.ref[Tensor]] = {}
        self.source: dict[str, str] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def see(module: nn.Module, args: tuple) -> None:
            x = args[0]
            same = next((o for o, ref in self.last.items() if o != name and ref() is x), name)
            self.source[name] = self.source.get(same, same) if same != name else name
            self.last[name] = weakref.ref(x)

        return see

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _grams(
    model: nn.Module, batches: list[Batch], weights: Mapping[str, Tensor], tokens: str, layer: int, what: str
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """X^T X (float64, beside the weights) per distinct input of ``weights`` (d_out x d_in, all in block
    ``layer``), keyed by the first layer reading it, and the key of each weight's Gram."""
    grams: dict[str, Tensor] = {}
    keys: dict[str, str] = {}
    counts = dict.fromkeys(weights, 0)
    shared = _SharedInputs(linear_modules(model, weights))

    def fold(name: str, x: Tensor) -> None:
        key = shared.source[name]
        if keys.setdefault(name, key) != key:
            raise HarmsweepError(f"{name} shares its input with {key} in one batch and not in another")
        counts[name] += x.size(0)
        if key != name:
            return  # the Gram of that input is folded already
        if name not in grams:
            grams[name] = weights[name].new_zeros((x.size(1), x.size(1)), dtype=F64)
        for rows in x.split(FOLD_ROWS):  # float64 rows, a bounded number at a time
            rows = rows.to(F64)
            grams[name].addmm_(rows.T, rows)

    try:
        fold_inputs(model, batches, list(weights), fold, tokens, upto_layer=layer, desc=f"lowrank {what} block {layer}")
    finally:
        shared.remove()
    empty = [n for n, c in counts.items() if c == 0]
    if empty:
        raise HarmsweepError(f"no {what} calibration tokens (lowrank.tokens={tokens}) reached {empty[0]}")
    return grams, keys


def remove_low_rank(
    model: nn.Module,
    harmful_batches: Iterable[Batch],
    benign_batches: Iterable[Batch],
    spec: LowRankSpec,
    names: Collection[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Subtract Delta from every scored weight (or those in ``names``), block by block, in place.

    Returns per weight ``rank_removed`` (rank(Delta): at most r_h, fewer where the data hold fewer directions
    or the utility subspace spares some) and ``relative_norm`` ||Delta||_F / ||W||_F. Both are read back from
    the device once, at the end.
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
    if spec.rank_harmful == 0:  # nothing to remove: no forward pass at all
        return {n: {"rank_removed": 0, "relative_norm": 0.0} for ns in by_layer.values() for n in ns}
    harmful = list(harmful_batches)  # every block reads the sets again
    benign = list(benign_batches) if spec.rank_utility > 0 else []
    found: dict[str, tuple[int | Tensor, Tensor]] = {}
    for layer in sorted(by_layer):
        conv = {n: rows[n].rows_dim == 1 for n in by_layer[layer]}  # Conv1D stores (d_in, d_out)
        weights = {n: named[n].detach().T if c else named[n].detach() for n, c in conv.items()}  # d_out x d_in
        g_harm, k_harm = _grams(model, harmful, weights, spec.tokens, layer, "harmful")
        g_util, k_util = _grams(model, benign, weights, spec.tokens, layer, "benign") if spec.rank_utility else ({}, {})
        sides = (("h", g_harm, k_harm), ("u", g_util, k_util))
        users = Counter((s, keys[n]) for s, _, keys in sides for n in keys)
        factors: dict[tuple[str, str], Tensor] = {}
        order = {k: i for i, k in enumerate(g_harm)}  # the weights of one input together: its Gram goes after
        for n in sorted(weights, key=lambda n: order[k_harm[n]]):
            g_u, key_u = (g_util[k_util[n]], ("u", k_util[n])) if spec.rank_utility else (None, None)
            found[n] = _change(weights[n], g_harm[k_harm[n]], g_u, spec, factors, (("h", k_harm[n]), key_u))
            for s, grams, keys in sides:  # a Gram (and its factor) goes with the last weight reading it
                if n in keys:
                    users[(s, keys[n])] -= 1
                    if users[(s, keys[n])] == 0:
                        grams.pop(keys[n])
                        factors.pop((s, keys[n]), None)
    return {n: {"rank_removed": int(r), "relative_norm": float(norm)} for n, (r, norm) in found.items()}
