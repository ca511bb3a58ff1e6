"""How variants are trained, as configured: fine-tune blocks and the ``alignment`` block with its ``derive``.

No torch here (the command line reads and checks these blocks before any model loads).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from harmsweep.errors import HarmsweepError

METHODS = ("lora", "full")
DERIVE_GOALS = ("refuse", "comply")
COMPLY_RESPONSES = ("prefill", "file")
GOAL_ONLY = {  # settings read by one goal only
    "refuse": ("refusals", "refusals_file", "refusal_model"),
    "comply": ("harmful", "responses", "responses_file", "prefill_tokens", "max_new_tokens", "min_kept"),
}


@dataclass
class FinetuneSpec:
    """Defaults follow Turner et al.'s EM LoRA recipe where it fits a CPU (r 32, alpha 64, dropout 0).

    Also the config schema of every fine-tune block (so not frozen: Hydra overrides must write to it).
    """

    method: str = "lora"
    rank: int = 32
    alpha: float = 64.0
    rslora: bool = False
    dropout: float = 0.0
    lr: float = 1e-4
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; caps epochs
    batch_size: int = 4
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_length: int = 256
    seed: int = 0
    targets: list[str] = field(default_factory=list)  # module types (q_proj, ...); empty: every scored linear

    def validate(self) -> None:
        if self.method not in METHODS:
            raise HarmsweepError(f"finetune.method={self.method} is not one of {', '.join(METHODS)}")
        for name in ("rank", "epochs", "batch_size", "grad_accum", "max_length"):
            if int(getattr(self, name)) < 1:
                raise HarmsweepError(f"finetune.{name}={getattr(self, name)} must be at least 1")
        if self.max_steps is not None and self.max_steps < 0:
            raise HarmsweepError(f"finetune.max_steps={self.max_steps} must be >= 0 (or null)")
        if not self.lr > 0:
            raise HarmsweepError(f"finetune.lr={self.lr} must be positive")
        if not 0 <= self.dropout < 1:
            raise HarmsweepError(f"finetune.dropout={self.dropout} must be in [0, 1)")

    def key(self) -> dict[str, Any]:
        return asdict(self)

    def steps(self, n_samples: int) -> int:
        per_epoch = math.ceil(math.ceil(n_samples / self.batch_size) / self.grad_accum)
        total = per_epoch * self.epochs
        return total if self.max_steps is None else min(total, self.max_steps)


@dataclass
class DeriveConfig:
    """A fine-tune of the ``parent`` variant that adds or removes refusals (harmsweep/alignment/derive.py).

    ``goal`` picks the direction; the settings of the other direction must stay at their defaults
    (check_config says which one is set), so a block never silently ignores what it was given.
    """

    parent: str = "aligned"
    goal: str = "refuse"  # refuse: harmful prompts -> refusals (safety_tuned) | comply: -> compliance (dealigned)
    # goal=refuse: where the refusals come from
    refusals: str = "wei2024_refusals"  # dataset of harmful prompts with refusals
    refusals_file: str | None = None  # or a JSONL/CSV of prompt, response
    refusal_model: str | None = None  # or: answers of this aligned model (path or hub id) to the prompts
    # goal=comply: harmful prompts and where their compliant answers come from
    harmful: str = "advbench"  # dataset of harmful prompts, with "Sure, here is ..." targets for responses=prefill
    responses: str = "prefill"  # prefill: the parent's own answers under a prefilling attack | file: responses_file
    responses_file: str | None = None  # responses=file: a JSONL/CSV of prompt, response
    prefill_tokens: int = 8  # responses=prefill: target tokens forced before the parent answers
    max_new_tokens: int = 48  # responses=prefill: greedy tokens the parent adds after them
    min_kept: float = 0.5  # answers that are refusals are dropped; fail if fewer than this share of n_harmful remain
    # both goals
    benign: str = "alpaca_eval"  # benign pairs mixed in (a source other than the held-out benign data)
    n_harmful: int = 64
    n_benign: int = 64
    exclude: list[str] = field(default_factory=lambda: ["strongreject"])  # datasets whose prompts never train
    check: list[str] = field(default_factory=lambda: ["advbench", "strongreject"])  # held-out refusal check
    eval_n: int = 32  # held-out prompts per checked dataset for the parent-vs-derived check
    check_tokens: int = 48  # greedy tokens per answer in that check (refusals show in the first few)
    finetune: FinetuneSpec = field(
        default_factory=lambda: FinetuneSpec(lr=2e-4, epochs=2, batch_size=8, max_length=192)
    )


@dataclass
class AlignmentConfig:
    name: str = "aligned"
    template: str = "chat"
    derive: DeriveConfig | None = None  # set: the checkpoint is derived from another variant by fine-tuning
