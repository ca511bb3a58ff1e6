"""What the paper's attacks and generated utility measures add to a job's size (``harmsweep plan``).

Refusal ablation scores two unsigned sets per evaluated stage and holds both sides' dense fp32 scores off the GPU
while it selects; a fine-tuning attack trains a LoRA adapter per stage and keeps a host copy of every scored weight
to undo the merge; TriviaQA, the Alpaca judge and financial advice generate answers of their own. No torch here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harmsweep.config.schema import Config
from harmsweep.evaluation.spec import TRIVIAQA_TOKENS, metric_plan
from harmsweep.generation.sampling import weight_attack

HARMFUL_ROWS = 500  # harmful pairs assumed when the fine-tune's file is not here to count (plan runs offline)


def attack_load(cfg: Config, shape: Any, stages: int, n_eval: int) -> dict[str, Any]:
    """What eval.generation.attack and the generated utility measures add: the refusal ablation's scorings and
    host memory, a fine-tune's weight snapshot, and the tokens TriviaQA, Alpaca and financial advice generate."""
    ev, out = cfg.eval, {}
    metrics = metric_plan(ev, cfg.judges)[0]
    kind = weight_attack(ev.generation.attack)
    extra = 0
    if kind == "refusal":
        n = cfg.attack.refusal.n
        out["attack_sets"] = ((n, True), (n, True)) * stages
        kept = 2 * cfg.attack.refusal.q * shape.n_scored * (8 + shape.dtype_bytes)  # indices and saved values
        out["attack_host"] = 2 * shape.n_scored * 4 + kept  # both sides' fp32 scores while selecting
        if not cfg.attack.refusal.file:  # the model's own refusals, generated once
            extra += n * cfg.attack.refusal.max_new_tokens
    elif kind == "finetune" or cfg.pruning.finetune_before or cfg.pruning.finetune_after:
        out["attack_host"] = shape.n_scored * shape.dtype_bytes if kind == "finetune" else 0.0  # the restore copy
    stage_tokens = 0
    if "triviaqa" in metrics:
        template = "chat" if cfg.alignment.template == "chat" else "plain"
        stage_tokens += ev.triviaqa.n * (ev.triviaqa.max_new_tokens or TRIVIAQA_TOKENS[template])
    if "alpaca_judge" in metrics:
        stage_tokens += (ev.alpaca.n if ev.alpaca.file else min(ev.alpaca.n, n_eval)) * ev.alpaca.max_new_tokens
    if "financial_advice" in metrics:
        stage_tokens += (ev.financial.n or 100) * ev.financial.max_new_tokens  # their file: ~100 prompts (assumed)
    out["extra_gen_tokens"] = extra + stage_tokens * stages
    return out


def attack_finetunes(cfg: Config, stages: int) -> tuple[Any, ...]:
    """The harmful LoRA fine-tunes: the attack's (once per evaluated stage) and pruning.finetune_before/after's."""
    from harmsweep.sweep.sizing import FineTune

    t = cfg.attack.finetune
    runs = stages if weight_attack(cfg.eval.generation.attack) == "finetune" else 0
    runs += int(cfg.pruning.finetune_before or cfg.pruning.finetune_after)
    if not runs:
        return ()
    rows = _harmful_rows(t.file) if t.n is None else int(t.n)
    steps = math.ceil(rows / t.batch_size) * t.epochs
    return (FineTune("harmful", "lora", t.rank, t.batch_size, t.max_length, steps * runs),)


def _harmful_rows(file: str | None) -> int:
    """Harmful pairs in the fine-tune's file when it is here; else HARMFUL_ROWS (stated in the plan's notes)."""
    if file and Path(file).expanduser().is_file():
        from harmsweep.data.redteam import read_harmful_pairs

        return len(read_harmful_pairs(Path(file).expanduser(), None, 0))
    return HARMFUL_ROWS
