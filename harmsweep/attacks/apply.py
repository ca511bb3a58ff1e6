"""An attack on the model under test, applied right before its harmful answers are generated and undone after.

The paper's order (their ``main()``): utility is measured on the pruned model, then the attack changes the weights
in place, answers are generated and judged, and WikiText perplexity is measured once more on the attacked model.
harmsweep evaluates the unpruned model the same way first, so a harm reduction under an attack compares the attacked
unpruned model with the attacked pruned one; ``WeightSnapshot`` puts every changed weight back, bit for bit, so the
rest of the evaluation (and the pruning between the two stages) sees the model as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harmsweep.attacks.restore import WeightSnapshot
from harmsweep.attacks.spec import AttackConfig, weight_attack
from harmsweep.calibration.pairs import Pair
from harmsweep.data.records import Record
from harmsweep.losses import DEFAULT_LOGITS_CHUNK
from harmsweep.models.loading import LoadedModel
from harmsweep.models.parts import scored_parameters
from harmsweep.scoring.spec import ScoringOptions

log = logging.getLogger(__name__)


@dataclass
class Attacker:
    """What a weight-changing attack reads: its block, the model, how the run tokenises, and the run's records."""

    attack: str  # eval.generation.attack
    cfg: AttackConfig
    lm: LoadedModel
    template: str
    fmt: str = "template"  # calibration.format: the attack's pairs are tokenised as the run calibrates
    benign_side: str = "benign"  # Splits.benign_as
    harmful: Sequence[Record] = ()  # the run's harmful calibration prompts (refusals generated from them)
    benign: Sequence[Record] = ()  # the run's benign calibration records (their Alpaca pairs)
    max_length: int | None = None
    batch_size: int = 8
    gen_batch: int = 16
    seed: int = 0
    options: ScoringOptions = field(default_factory=ScoringOptions)
    logits_chunk: int = DEFAULT_LOGITS_CHUNK
    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> what the attack did (result.json)
    _refusals: list[Pair] | None = None
    _harmful_pairs: list[Record] | None = None

    @property
    def kind(self) -> str | None:
        return weight_attack(self.attack)

    @contextmanager
    def applied(self, stage: str) -> Iterator[dict[str, Any]]:
        """The attacked model inside the block; ``done[stage]`` says what changed."""
        if self.kind == "refusal":
            with self._refusal_ablated() as info:
                self.done[stage] = info
                yield info
        elif self.kind == "finetune":
            with self._finetuned() as info:
                self.done[stage] = info
                yield info
        else:
            yield {}

    @contextmanager
    def _refusal_ablated(self) -> Iterator[dict[str, Any]]:
        from harmsweep.attacks.refusal import (
            ablated,
            benign_pairs_tensors,
            mask_size,
            refusal_mask,
            refusal_pairs,
            refusal_tensors,
        )

        cfg, lm = self.cfg.refusal, self.lm
        if self._refusals is None:  # one refusal set for both stages: from the file, or the unpruned model's answers
            self._refusals = refusal_pairs(cfg, seed=self.seed, model=lm.model, tokenizer=lm.tokenizer,
                                           records=self.harmful, template=self.template, batch_size=self.gen_batch)  # fmt: skip
        refusal = refusal_tensors(lm.tokenizer, self._refusals, self.fmt, self.template, "harmful", self.max_length)
        benign = benign_pairs_tensors(lm.tokenizer, self.benign, cfg.n, self.fmt, self.template, self.max_length,
                                      side=self.benign_side)  # fmt: skip
        mask = refusal_mask(lm.model, refusal, benign, cfg, batch_size=self.batch_size, options=self.options,
                            logits_chunk=self.logits_chunk)  # fmt: skip
        with ablated(lm.model, mask) as snapshot:
            yield {"attack": self.attack, "refusal_pairs": len(self._refusals), "zeroed": mask_size(mask),
                   "refusal_source": cfg.file or "generated", "snapshot_bytes": snapshot.bytes}  # fmt: skip

    @contextmanager
    def _finetuned(self) -> Iterator[dict[str, Any]]:
        from harmsweep.attacks.finetune import harmful_finetune
        from harmsweep.data.redteam import read_harmful_pairs

        cfg, lm = self.cfg.finetune, self.lm
        if self._harmful_pairs is None:
            self._harmful_pairs = read_harmful_pairs(Path(str(cfg.file)).expanduser(), cfg.n, self.seed)
        with WeightSnapshot.of_parameters(lm.model, scored_parameters(lm.model)) as snapshot:
            stats = harmful_finetune(lm.model, lm.tokenizer, self._harmful_pairs, cfg, template=self.template,
                                     seed=self.seed)  # fmt: skip
            yield {"attack": self.attack, "pairs": len(self._harmful_pairs), **stats, "snapshot_bytes": snapshot.bytes}
