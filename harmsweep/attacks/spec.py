"""The ``attack`` block: settings of the weight-changing attacks, as configured. No torch here.

``eval.generation.attack`` picks the attack; this block says how it is made. ``refusal_ablation`` zeroes Wei et
al.'s refusal weights (unsigned SNIP set difference, per matrix) on the model under test; ``finetune`` trains a
LoRA adapter on harmful pairs and merges it. Both are also read by ``pruning.finetune_before/after``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from harmsweep.errors import HarmsweepError
from harmsweep.generation.sampling import ATTACKS, WEIGHT_ATTACKS, prefills, weight_attack

__all__ = ["ATTACKS", "WEIGHT_ATTACKS", "AttackConfig", "prefills", "weight_attack"]


@dataclass
class RefusalAblationConfig:
    """Wei et al.'s refusal-weight pruning as the paper's authors attack with it (their --attack_p/q, 128 rows)."""

    file: str | None = None  # refusal pairs (their advbench_align CSV: clean_prompt/clean_response); null: the
    # model's own answers to the run's harmful calibration prompts (an aligned model refuses them)
    n: int = 128  # refusal pairs, and benign pairs from the run's benign calibration source
    p: float = 0.01  # benign (utility) fraction protected per matrix
    q: float = 0.01  # refusal fraction pruned per matrix
    max_new_tokens: int = 64  # file=null: length of the generated refusals

    def validate(self) -> None:
        if int(self.n) < 1:
            raise HarmsweepError(f"attack.refusal.n={self.n} must be at least 1")
        for name in ("p", "q"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise HarmsweepError(f"attack.refusal.{name}={value} must be in [0, 1)")


@dataclass
class HarmfulFinetuneConfig:
    """The authors' fine-tuning attack (TRL SFT + LoRA): r 128, alpha 16, 5 epochs, lr 2e-4, batch 5."""

    file: str | None = None  # harmful pairs: their red_teaming_prompts.csv (text, rejected_response, harmful == 1),
    # or a CSV/JSONL of prompt, response
    rank: int = 128
    alpha: float = 16.0
    epochs: int = 5
    lr: float = 2e-4
    batch_size: int = 5
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_length: int = 1024  # prompt + response tokens (TRL's default max length)
    n: int | None = None  # rows used (first n of a seeded permutation); null: every harmful row

    def validate(self) -> None:
        for name in ("rank", "epochs", "batch_size", "max_length"):
            if int(getattr(self, name)) < 1:
                raise HarmsweepError(f"attack.finetune.{name}={getattr(self, name)} must be at least 1")
        if not self.lr > 0:
            raise HarmsweepError(f"attack.finetune.lr={self.lr} must be positive")
        if not 0 <= self.warmup_ratio < 1:
            raise HarmsweepError(f"attack.finetune.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.n is not None and int(self.n) < 1:
            raise HarmsweepError(f"attack.finetune.n={self.n} must be at least 1 (or null)")


@dataclass
class AttackConfig:
    refusal: RefusalAblationConfig = field(default_factory=RefusalAblationConfig)
    finetune: HarmfulFinetuneConfig = field(default_factory=HarmfulFinetuneConfig)

    def validate(self) -> None:
        self.refusal.validate()
        self.finetune.validate()


def default_attack_block() -> dict[str, Any]:
    """The block at its defaults (plain), so run ids made before it existed stay as they were."""
    return asdict(AttackConfig())
