"""How scores are computed and kept, as configured: the ``scoring`` and ``scores`` blocks.

No torch here: the command line and the sweep side read these settings without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from harmsweep.errors import HarmsweepError

FORMATS = ("compact", "dense")
ACCUMULATE = ("fp32", "bf16")  # scoring.accumulate: fp32 sums, or the authors' bf16 per-example sums


@dataclass
class ScoringOptions:
    """The ``scoring`` block: what the score sets hold, and where the memory of scoring goes.

    ``criterion`` and ``accumulate`` are in the run id; the memory knobs change no score (they are left out of it).
    """

    criterion: str = "snip"  # snip | wanda: what the score sets hold
    # fp32: every sum in fp32 (default) | bf16: the authors' arithmetic for bit-level comparison (batch of one,
    # each example's bf16 gradient summed into a bf16 buffer, W*G formed in bf16; needs scores.store=dense)
    accumulate: str = "fp32"
    gradient_checkpointing: bool = False  # keep only block inputs, recompute each block in backward
    offload: bool = True  # move each finished score buffer off the GPU at once (to host memory)

    def validate(self, store: StoreSpec | None = None) -> None:
        """The values, and with the ``scores`` block what bf16 accumulation needs; one line, before any work."""
        if self.accumulate not in ACCUMULATE:
            raise HarmsweepError(f"scoring.accumulate={self.accumulate} is not one of {', '.join(ACCUMULATE)}")
        if self.accumulate != "bf16":
            return
        if self.criterion == "wanda":
            raise HarmsweepError("scoring.accumulate=bf16 emulates SNIP's gradient sums: scoring.criterion=wanda has "
                                 "none (use scoring.accumulate=fp32)")  # fmt: skip
        if store is not None and store.store != "dense":
            raise HarmsweepError(f"scoring.accumulate=bf16 needs scores.store=dense (bf16 scores tie often, and their "
                                 f"top-k ties need every score), not scores.store={store.store}")  # fmt: skip


@dataclass
class StoreSpec:
    """The ``scores`` block: how a score set is kept on disk; masks do not depend on it.

    ``keep`` / ``keep_benign``: the fraction of each unit's ranking a compact set keeps, or ``auto``: what the
    run reads (harm side: sparsity + protect, benign side: protect), at least the floors, which cover the
    paper's range (sparsity and protect up to 1e-2) with one set, so the runs of a sweep share it. A stored
    set keeping at least what a run needs serves it; a shorter one is scored again (pipeline.stages.score).
    """

    store: str = "compact"
    keep: Any = "auto"  # harm side: "auto" or a fraction in (0, 1]
    keep_benign: Any = "auto"  # benign side: "auto" or a fraction in (0, 1]

    AUTO: ClassVar[str] = "auto"
    # sparsity 1e-2 + protect 1e-2, and 1% to spare: round(s n) + round(p n) may exceed round((s + p) n) by one
    HARM_FLOOR: ClassVar[float] = 0.0202
    BENIGN_FLOOR: ClassVar[float] = 0.01  # protect up to 1e-2 (one count: no rounding to spare)
    SPARE: ClassVar[float] = 1.01

    def validate(self) -> None:
        if self.store not in FORMATS:
            raise HarmsweepError(f"scores.store={self.store} is not one of {', '.join(FORMATS)}")
        for name in ("keep", "keep_benign"):
            value = getattr(self, name)
            if value == self.AUTO:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value <= 1.0:
                raise HarmsweepError(f"scores.{name}={value} must be auto or a fraction in (0, 1]")

    def setting(self, kind: str) -> str:
        return "keep" if kind.startswith("harm") else "keep_benign"

    def fraction(self, kind: str) -> float:
        """The fraction kept for ``kind``; ``auto`` unresolved (no run to size it by): its floor."""
        value = getattr(self, self.setting(kind))
        if value == self.AUTO:
            return self.HARM_FLOOR if kind.startswith("harm") else self.BENIGN_FLOOR
        return float(value)

    @staticmethod
    def needs(prune: Any) -> tuple[float, float]:
        """The tails a run with this ``pruning`` block (a PruneSpec) reads, as fractions of a unit: harm, benign.

        The harm top-k skips protected weights, so in the worst case (every protected weight at the top of H)
        it reaches sparsity + protect down the ranking; a harm_fraction takes its top fraction of H before
        the set difference, which needs no more than itself (twice itself with pruning.freeze_first_top_q, whose
        band reaches the top 2q). The benign side reads its top ``protect``.
        """
        wanted = prune.harm_fraction if prune.harm_fraction is not None else prune.sparsity
        if getattr(prune, "freeze_first_top_q", False) and prune.harm_fraction is not None:
            wanted = 2 * prune.harm_fraction
        if not prune.protects:
            return float(wanted), 0.0
        return float(wanted + (prune.protect if prune.harm_fraction is None else 0.0)), float(prune.protect)

    def resolved(self, harm_need: float = 0.0, benign_need: float = 0.0) -> StoreSpec:
        """Concrete fractions: ``auto`` becomes the need (with rounding to spare) or its floor; numbers stay."""
        # six digits (a plain number in headers and overrides): far less than the 1% spared
        keep = float(f"{max(self.HARM_FLOOR, harm_need * self.SPARE):.6g}") if self.keep == self.AUTO else self.keep
        benign = max(self.BENIGN_FLOOR, benign_need) if self.keep_benign == self.AUTO else self.keep_benign
        return StoreSpec(self.store, float(keep), float(benign))
