"""What to prune, as configured: the ``pruning`` and ``lowrank`` blocks, their allowed values and checks.

``PruningConfig`` is the ``pruning`` block as the user writes it (the Hydra schema node). ``PruneSpec`` is
what a selection reads: the block plus the two run-level settings the rules depend on (the seed of the
random rule, the scoring criterion that names the score sets). No torch here: the command line imports it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from harmsweep.errors import HarmsweepError

RULES = ("signed_snip", "no_set_difference", "unsigned_snip", "magnitude", "random")
SCORE_RULES = ("signed_snip", "no_set_difference", "unsigned_snip")
GRANULARITIES = ("global", "matrix", "row", "nm", "head")
BENIGN_IMPORTANCE = ("abs_signed", "unsigned", "signed")
CRITERIA = ("snip", "wanda")  # scoring.criterion: what the score sets hold
TOKENS = ("response", "all")  # lowrank.tokens: labels != -100 (Wei et al.'s disentangle mode), or every token
CHOICES = {
    "counts": ("round", "floor"),  # K = round(f * N), or int(f * N) as Wei et al.'s code does
    "ties": ("index", "topk"),  # ties at a threshold: by matrix then flat index, or torch.topk's own order
    "order": ("top", "bottom"),  # prune the highest-ranked weights, or the lowest-ranked
    "replace": ("zero", "base"),  # pruned weights become 0, or the base variant's values
    "eligible": ("positive", "all"),  # H > 0 only, or any sign (the authors' top-k)
}


@dataclass
class PruningConfig:
    """The ``pruning`` block: how to choose the weights to prune (every field is the option of the same name)."""

    rule: str = "signed_snip"
    sparsity: float = 1e-5  # target count K = round(sparsity * N) per granularity unit
    protect: float = 0.01  # fraction p of each unit protected by benign importance U
    harm_fraction: float | None = None  # q: when set, prune TopK_q(H) minus TopK_p(U) instead
    granularity: str = "global"  # global | matrix | row | nm (N of every M along a row) | head (attention heads)
    benign_importance: str = "abs_signed"
    counts: str = "round"
    ties: str = "index"
    order: str = "top"
    nm_n: int = 2  # granularity=nm: N weights pruned in every group of M consecutive inputs of a row
    nm_m: int = 4
    replace: str = "zero"
    sequential: bool = False  # score and prune layer by layer, each layer scored with the lower ones pruned
    eligible: str = "positive"  # positive: only H > 0 can be pruned | all: the top of H whatever its sign (theirs)
    layers: list[int] | None = None  # only these decoder layers lose weights (all are still scored); null: all
    alpha: Any = 0  # 0: zero the selected weights | a number: scale them by it | mean: set them to their mean
    freeze_first_top_q: bool = False  # prune the next band: TopK_2q(H) minus TopK_q(H) minus the protected
    mask_file: str | None = None  # prune this mask (mask.safetensors, or JSON/safetensors of layer, module, row, col)
    intersect: list[str] | None = None  # harmful calibration files: prune the intersection of their masks
    finetune_before: bool = False  # fine-tune on harmful pairs (the attack block's recipe), then score and prune
    finetune_after: bool = False  # prune, fine-tune (the merge overwrites the zeros), then score and prune again


@dataclass
class PruneSpec(PruningConfig):
    """A selection rule: the ``pruning`` block, the run's ``seed`` (the random rule) and ``scoring.criterion``."""

    seed: int = 0
    criterion: str = "snip"

    @classmethod
    def of(cls, block: PruningConfig, seed: int, criterion: str) -> PruneSpec:
        """The block of a typed config with the run-level settings it is read with, checked."""
        spec = cls(**asdict(block), seed=seed, criterion=criterion)
        spec.validate()
        return spec

    def validate(self) -> None:
        for field, value, allowed in (
            ("rule", self.rule, RULES),
            ("granularity", self.granularity, GRANULARITIES),
            ("benign_importance", self.benign_importance, BENIGN_IMPORTANCE),
            *((name, getattr(self, name), allowed) for name, allowed in CHOICES.items()),
        ):
            if value not in allowed:
                raise HarmsweepError(f"pruning.{field}={value} is not one of {', '.join(allowed)}")
        if self.criterion not in CRITERIA:
            raise HarmsweepError(f"scoring.criterion={self.criterion} is not one of {', '.join(CRITERIA)}")
        self._validate_combination()
        if not 0.0 <= float(self.sparsity) <= 1.0:
            raise HarmsweepError(f"pruning.sparsity={self.sparsity} must lie in [0, 1]")
        for field, value in (("protect", self.protect), ("harm_fraction", self.harm_fraction)):
            # fractions of a ranking (the authors' p and q): 1 would protect (or take) every weight
            if value is not None and not 0.0 <= float(value) < 1.0:
                raise HarmsweepError(f"pruning.{field}={value} must lie in [0, 1)")

    def _validate_combination(self) -> None:
        """Settings that only make sense together fail here, in one line, before any work."""
        if self.ties == "topk" and self.granularity != "matrix":
            raise HarmsweepError(
                "pruning.ties=topk (Wei et al.'s torch.topk per matrix) needs pruning.granularity=matrix"
            )
        if self.granularity == "nm":
            if not 0 < self.nm_n <= self.nm_m:
                raise HarmsweepError(f"pruning.nm_n={self.nm_n} must lie in 1..pruning.nm_m={self.nm_m}")
            if self.harm_fraction is not None:
                raise HarmsweepError(
                    "pruning.granularity=nm fixes the count (nm_n of every nm_m): drop pruning.harm_fraction"
                )
        if self.sequential and self.granularity in ("global", "head"):
            raise HarmsweepError(
                f"pruning.sequential=true prunes each layer before the next is scored, so its counts are per matrix: "
                f"pruning.granularity={self.granularity} needs a whole-model ranking; use matrix, row or nm"
            )
        self._validate_authors_options()

    def _validate_authors_options(self) -> None:
        """layers, alpha and freeze_first_top_q (the authors' --layers, --alpha, --freeze_first_top_q)."""
        if self.layers is not None:
            layers = list(self.layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
                raise HarmsweepError(
                    f"pruning.layers={layers} must be a non-empty list of decoder-layer indices (null: every layer)"
                )
        if not is_zero_alpha(self.alpha):
            if self.alpha != "mean" and (isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float)):
                raise HarmsweepError(f"pruning.alpha={self.alpha} must be a number (0: zero the weights) or mean")
            if self.replace == "base":
                raise HarmsweepError(
                    f"pruning.alpha={self.alpha} rewrites the selected weights, and pruning.replace=base sets them to "
                    "the base variant's values: use one of the two"
                )
        if self.freeze_first_top_q:
            if self.harm_fraction is None or self.granularity != "matrix":
                raise HarmsweepError(
                    "pruning.freeze_first_top_q=true prunes TopK_2q(H) minus TopK_q(H) per matrix: it needs "
                    "pruning.harm_fraction (q) and pruning.granularity=matrix"
                )
            if self.harm_fraction > 0.5:
                raise HarmsweepError(
                    f"pruning.freeze_first_top_q=true ranks the top 2q of H: pruning.harm_fraction={self.harm_fraction} "
                    "must be at most 0.5"
                )

    def check_layers(self, available: Iterable[int]) -> None:
        """Stop when pruning.layers names a decoder layer the model lacks (before a mask is built)."""
        have = sorted(set(available))
        missing = sorted(set(self.layers or ()) - set(have))
        if missing:
            span = f"{have[0]}-{have[-1]}" if have else "none"
            raise HarmsweepError(f"pruning.layers={list(self.layers or ())}: the model has layers {span}")

    def prunes_layer(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    @property
    def protects(self) -> bool:
        return self.rule in ("signed_snip", "unsigned_snip") and self.protect > 0

    def harm_set(self) -> str | None:
        """The score set the harm ranking comes from (None: magnitude and random need none)."""
        if self.rule not in SCORE_RULES:
            return None
        if self.criterion == "wanda":
            return "harm_wanda"
        return "harm_unsigned" if self.rule == "unsigned_snip" else "harm"

    def benign_set(self) -> str:
        if self.criterion == "wanda":
            return "benign_wanda"
        return "benign_unsigned" if self.benign_importance == "unsigned" else "benign"

    def needed_scores(self) -> set[str]:
        """Score sets this spec reads: 'harm', 'harm_unsigned', 'harm_wanda' and their 'benign' twins."""
        out = {self.harm_set()} - {None}
        if self.protects:
            out.add(self.benign_set())
        return out

    def reads_every_score(self) -> bool:
        """Rankings a compact set (top tails) cannot serve: the low end, or sums over a head."""
        return self.order == "bottom" or self.granularity in ("nm", "head")


def count(spec: PruneSpec, fraction: float, size: int | Sequence[int]) -> int:
    """How many of ``size`` a fraction selects: rounded, or floored like Wei et al.'s ``int(p * numel)``.

    ``size`` is a count, or a matrix's shape (rows, cols): floored, a matrix counts as the authors' code does,
    ``int(f * cols * rows)`` (floats multiplied in that order, which can fall one short of ``int(f * numel)``).
    """
    if isinstance(size, int):
        n = size
    else:
        n = 1
        for d in size:
            n *= int(d)
        if spec.counts == "floor" and len(size) == 2:
            return int(fraction * int(size[1]) * int(size[0]))
    return int(fraction * n) if spec.counts == "floor" else round(fraction * n)


def is_zero_alpha(alpha: Any) -> bool:
    """pruning.alpha 0 (or 0.0, or unset): the selected weights become zeros."""
    return alpha is None or (not isinstance(alpha, str | bool) and alpha == 0)


@dataclass
class LowRankSpec:
    """The ``lowrank`` block (method=lowrank): the ranks of ActSVD's subspaces."""

    rank_harmful: int = 16  # r_h: rank of the harmful subspace projected out of each matrix
    rank_utility: int = 0  # r_u: rank of the utility subspace kept out of the removal
    tokens: str = "response"  # response | all: the calibration positions whose inputs count

    def validate(self) -> None:
        if self.rank_harmful < 0 or self.rank_utility < 0:
            raise HarmsweepError(
                f"lowrank ranks must be >= 0 (got rank_harmful={self.rank_harmful}, rank_utility={self.rank_utility})"
            )
        if self.tokens not in TOKENS:
            raise HarmsweepError(f"lowrank.tokens={self.tokens} is not one of {', '.join(TOKENS)}")


def asked_count(spec: PruneSpec, shapes: Mapping[str, Sequence[int]]) -> int | None:
    """How many weights a sparsity asks the rule to prune over matrices of these shapes, where that is fixed in
    advance (a global or per-matrix ranking over every layer); None where the selection decides it (a harm
    fraction, N:M, rows, heads, listed layers, a given mask). A run that pruned fewer says so (too few eligible)."""
    if spec.harm_fraction is not None or spec.layers is not None or spec.mask_file or spec.intersect:
        return None
    if spec.granularity == "global":
        return count(spec, spec.sparsity, sum(math.prod(int(d) for d in shape) for shape in shapes.values()))
    if spec.granularity == "matrix":
        return sum(count(spec, spec.sparsity, tuple(shape)) for shape in shapes.values())
    return None
