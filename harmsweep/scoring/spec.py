"""How scores are computed and kept, as configured: the ``scoring`` and ``scores`` blocks.

No torch here: the command line and the sweep side read these settings without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from harmsweep.errors import HarmsweepError

FORMATS = ("compact", "dense")


@dataclass
class ScoringOptions:
    """The ``scoring`` block: what the score sets hold, and where the memory of scoring goes.

    ``criterion`` is in the run id; the memory knobs change no score (they are left out of it).
    """

    criterion: str = "snip"  # snip | wanda: what the score sets hold
    gradient_checkpointing: bool = False  # keep only block inputs, recompute each block in backward
    offload: bool = True  # move each finished score buffer off the GPU at once (to host memory)


@dataclass
class StoreSpec:
    """The ``scores`` block: how a score set is kept on disk; masks do not depend on it."""

    store: str = "compact"
    keep: float = 0.011  # harm side: fraction of each unit kept; >= the largest sparsity + protect is always enough
    keep_benign: float = 0.01  # benign side: fraction kept; must be >= pruning.protect

    def validate(self) -> None:
        if self.store not in FORMATS:
            raise HarmsweepError(f"scores.store={self.store} is not one of {', '.join(FORMATS)}")
        for name in ("keep", "keep_benign"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise HarmsweepError(f"scores.{name}={getattr(self, name)} must lie in (0, 1]")

    def setting(self, kind: str) -> str:
        return "keep" if kind.startswith("harm") else "keep_benign"

    def fraction(self, kind: str) -> float:
        return getattr(self, self.setting(kind))
