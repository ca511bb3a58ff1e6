"""Device bytes of method=lowrank (ActSVD), torch-free so that ``harmsweep plan`` can size a run without torch.

The figures follow harmsweep.pruning.lowrank step by step (its module docstring lists the tensors); a test holds
them against the live tensor bytes of one matrix measured on the CPU. Every solve is float64 (8 bytes an entry);
the numerical ranks are not known before the run, so the full ranks are assumed (an upper bound).
"""

from __future__ import annotations

from collections.abc import Iterable

F64 = 8  # bytes of a float64 entry: Grams, bases, updates and eigensolves are all float64
FOLD_ROWS = 1024  # calibration rows cast to float64 at a time while a Gram is accumulated


def eigh_workspace_bytes(n: int) -> int:
    """The divide-and-conquer solver's workspace (cuSOLVER/LAPACK syevd with vectors: 1 + 6n + 2n^2 entries).

    It is no torch tensor, so CPU measurements of live tensors do not see it; on CUDA it comes from the caching
    allocator beside the tensors.
    """
    return F64 * (2 * n * n + 6 * n + 1)


def gram_bytes(d_in: int) -> int:
    """One Gram X^T X (float64, d_in x d_in)."""
    return F64 * d_in * d_in


def lowrank_grams(input_dims: Iterable[int], rank_utility: int) -> int:
    """Bytes of one block's Grams, alive together while its matrices are solved.

    ``input_dims``: d_in of each distinct input of the block (one Gram per input, shared by the layers that read
    it: a Llama block has four, attention input (q/k/v), o_proj's, MLP input (gate/up) and down_proj's). The
    benign set adds as many when rank_utility > 0; one batch's rows are cast to float64 in chunks meanwhile.
    """
    dims = list(input_dims)
    if not dims:
        return 0
    sets = 2 if rank_utility > 0 else 1
    return sets * sum(gram_bytes(d) for d in dims) + F64 * FOLD_ROWS * max(dims)


def _top_bytes(n: int, r: int, workspace: bool) -> int:
    """An eigensolve of an n x n matrix (not counted) keeping r pairs: its vectors, the copy kept, the check."""
    solve = F64 * (n * n + n) + (eigh_workspace_bytes(n) if workspace else 0)
    pick = F64 * (n * n + n * r)
    check = F64 * (2 * n * r + r * r)
    return max(solve, pick, check)


def _basis_bytes(d_out: int, d_in: int, r: int, workspace: bool) -> int:
    """Peak of one basis (d_out x r) beside the float64 weight, its Gram and (wide) G's factor F (d_in x d_in)."""
    if r <= 0:
        return 0
    if d_out <= d_in:  # M = W G W^T: G W^T and M, then M beside its eigensolve
        return max(F64 * (d_in * d_out + d_out * d_out), F64 * d_out * d_out + _top_bytes(d_out, r, workspace))
    k = d_in  # wide: A = W F (d_out x k) and A^T A beside its eigensolve, then U = A V / s
    solve = F64 * (d_out * k + k * k) + _top_bytes(k, r, workspace)
    return max(solve, F64 * (d_out * k + k * r + d_out * r))


def lowrank_bytes(
    d_in: int, d_out: int, rank_harmful: int, rank_utility: int, weight_bytes: int, *, workspace: bool = True
) -> int:
    """Peak extra device bytes while one d_out x d_in matrix is changed, beside its Grams (``lowrank_grams``).

    The weight's float64 copy (none when it is float64 already); for a wide matrix (d_out > d_in) G's factor
    per set; the harmful basis, the utility basis beside it, the sines, the update Delta; W - Delta is written
    back in place. ``workspace=False`` leaves out the eigensolver's workspace (no torch tensor: what a CPU
    measurement of live tensors sees).
    """
    r_h = min(rank_harmful, d_out, d_in)
    if r_h <= 0:
        return 0
    r_u = min(rank_utility, d_out, d_in)
    w64 = 0 if weight_bytes == F64 else F64 * d_out * d_in
    phases = [0]
    factors = 0
    if d_out > d_in:  # one factor per set, computed first and kept (gate and up share them)
        phases.append(_top_bytes(d_in, d_in, workspace))
        factors = F64 * d_in * d_in * (2 if r_u > 0 else 1)
        if r_u > 0:
            phases.append(F64 * d_in * d_in + _top_bytes(d_in, d_in, workspace))
    phases.append(factors + _basis_bytes(d_out, d_in, r_h, workspace))
    if r_u > 0:
        phases.append(factors + F64 * d_out * r_h + _basis_bytes(d_out, d_in, r_u, workspace))
        phases.append(factors + F64 * (3 * d_out * r_h + d_out * r_u + r_u * r_h))  # (I - P_u) U_h
        phases.append(factors + F64 * (4 * d_out * r_h + 2 * r_h * r_h))  # its SVD: the sines
    phases.append(factors + F64 * (2 * d_out * r_h + r_h * d_in + d_out * d_in))  # Delta = C (U_h^T W)
    return w64 + max(phases)
