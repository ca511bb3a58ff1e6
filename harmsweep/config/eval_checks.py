"""Checks of the paper's evaluation settings that need no model: the files they name exist, the attacks have what
they read, and settings that cannot work together stop in one line before any work. No torch here."""

from __future__ import annotations

from pathlib import Path

from harmsweep.attacks.spec import prefills, weight_attack
from harmsweep.config.schema import Config
from harmsweep.data.btap import BTAP_FILE, btap_valid_file
from harmsweep.data.sources import data_error
from harmsweep.errors import HarmsweepError

OWN_ARMS = ("cross_harm", "em", "dissociation", "orgad2026_em")  # experiments that evaluate arms of their own


def eval_file(cfg: Config, value: str | None, setting: str) -> Path | None:
    """The path a file setting names: ``btap`` is their validation file for this model under calibration.btap_data."""
    if not value:
        return None
    if value == BTAP_FILE:
        return btap_valid_file(cfg.calibration.btap_data, cfg.btap_basename(), setting)
    return Path(value).expanduser()


def check_evaluation(cfg: Config, files_here: bool = True) -> None:
    """Attack and evaluation files exist (``files_here``: not for ``harmsweep plan``, which may run elsewhere); attacks that change weights have their data; what cannot combine stops."""
    ev, gen, attack = cfg.eval, cfg.eval.generation, cfg.attack
    attack.validate()
    kind = weight_attack(gen.attack)
    if int(gen.prefill_tokens) < 1 and prefills(gen.attack):
        raise HarmsweepError(f"eval.generation.prefill_tokens={gen.prefill_tokens} must be at least 1 to prefill")
    needs_finetune = kind == "finetune" or cfg.pruning.finetune_before or cfg.pruning.finetune_after
    if needs_finetune and not attack.finetune.file:
        what = f"eval.generation.attack={gen.attack}" if kind == "finetune" else "pruning.finetune_before/after"
        raise HarmsweepError(f"{what} needs attack.finetune.file=PATH (their red_teaming_prompts.csv)")
    if kind and cfg.experiment in OWN_ARMS:
        raise HarmsweepError(
            f"eval.generation.attack={gen.attack} is applied by a pruning run's evaluation; experiment={cfg.experiment} "
            "evaluates its own arms: use attack none or prefill there"
        )
    if kind and gen.backend == "vllm":
        raise HarmsweepError(
            f"eval.generation.attack={gen.attack} changes the weights in memory, which a vLLM engine does not hold: "
            "use eval.generation.backend=hf"
        )
    if cfg.pruning.finetune_before and cfg.pruning.finetune_after:
        raise HarmsweepError("pruning.finetune_before and pruning.finetune_after are two protocols: set one of them")
    if (cfg.pruning.finetune_before or cfg.pruning.finetune_after) and cfg.method != "prune":
        raise HarmsweepError("pruning.finetune_before/after apply to method=prune only")
    p = cfg.pruning
    if p.finetune_after and (p.sequential or p.mask_file or p.intersect or cfg.experiment in OWN_ARMS):
        raise HarmsweepError(
            "pruning.finetune_after scores and selects a second mask with the run's own rule: "
            "not with pruning.sequential, pruning.mask_file, pruning.intersect or experiment=em/dissociation"
        )
    files = {
        "eval.harmful_file": ev.harmful_file,
        "eval.generation.prefix_file": gen.prefix_file if gen.prefix == "file" else None,
        "attack.refusal.file": attack.refusal.file if kind == "refusal" else None,
        "attack.finetune.file": attack.finetune.file if needs_finetune else None,
        "eval.triviaqa.file": ev.triviaqa.file if "triviaqa" in ev.metrics else None,
        "eval.alpaca.file": ev.alpaca.file if "alpaca_judge" in ev.metrics else None,
        "eval.financial.file": ev.financial.file if "financial_advice" in ev.metrics else None,
        "eval.detection.counterfact_file": ev.detection.counterfact_file if "detection" in ev.metrics else None,
    }
    for setting, value in files.items() if files_here else ():
        path = eval_file(cfg, value, setting)
        if path is not None and not path.is_file():
            raise data_error(path, f"not found (the file {setting} names)")
    if files_here and "triviaqa" in ev.metrics and not ev.triviaqa.file and not cfg.data.download:
        raise HarmsweepError(
            "eval.metrics has triviaqa but no eval.triviaqa.file (their unfiltered-web-dev.json); "
            "or set data.download=true to read it from the hub"
        )
