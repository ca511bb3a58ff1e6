"""What every stage of a run reads: the typed config (converted once), the run's identity and folders,
the loaded model with its template and held-out splits, and where the time went.

The plain resolved config travels only as ``plain``: for the run id, result.json and the W&B config.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from harmsweep.alignment.derive import load_derived, trained_prompts
from harmsweep.calibration.pairs import resolve_template
from harmsweep.calibration.sets import Splits, held_out_splits, with_eval_prompts
from harmsweep.config.eval_checks import eval_file
from harmsweep.config.schema import Config
from harmsweep.devices import place_model
from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.judges.source import JudgeSource
from harmsweep.generation.prefixes import read_prefix_answers, read_prompt_file
from harmsweep.generation.sampling import prefills
from harmsweep.masks.files import GivenMask, read_mask_file
from harmsweep.models.loading import LoadedModel, load_model
from harmsweep.models.parts import ScoredParam, scored_parameters
from harmsweep.pruning.spec import PruneSpec

T = TypeVar("T")


STAGE = ["load"]  # the stage running now in this process: what a Ctrl-C or SIGTERM message names (cli.py)


@dataclass
class RunContext:
    cfg: Config
    plain: Mapping[str, Any]  # the resolved config as composed: run id, result.json, W&B
    run_id: str
    run_dir: Path
    spec: PruneSpec  # the run's selection rule (cfg.prune_spec(), checked)
    lm: LoadedModel
    template: str  # "chat" or "plain": what this model's prompts are formatted with
    splits: Splits
    params: dict[str, ScoredParam]  # the scored weights and where they sit
    timings: dict[str, float] = field(default_factory=dict)
    computed: dict[str, bool] = field(default_factory=dict)  # shared artifacts this run computed (False: reused)
    given: GivenMask | None = None  # pruning.mask_file, read and checked against the model when it loaded

    @classmethod
    def open(cls, cfg: Config, plain: Mapping[str, Any], run_id: str, run_dir: Path, spec: PruneSpec) -> RunContext:
        """Load the run's model (a derived variant is trained once, then cached), its template and splits."""
        start = time.perf_counter()
        lm = load_run_model(cfg)
        load_s = time.perf_counter() - start
        params = scored_parameters(lm.model)
        spec.check_layers(p.layer for p in params.values())  # a layer the model lacks: before any data is read
        given = None
        if spec.mask_file:  # a mask file for another model stops here, not after calibration
            shapes = {n: tuple(p.shape) for n, p in lm.model.named_parameters() if n in params}
            given = read_mask_file(spec.mask_file, params, shapes, spec.layers)
        template = resolve_template(lm.tokenizer, cfg.alignment.template)
        exclude = trained_prompts(lm.source, cfg.paths.cache_dir)  # a derived model's training prompts
        basename = cfg.btap_basename()  # names the files under calibration.btap_data
        splits = held_out_splits(cfg.calibration, cfg.data, cfg.eval.n, cfg.seed, exclude=exclude, basename=basename,
                                 fixed_eval=bool(cfg.eval.harmful_file))  # fmt: skip
        fixed = eval_file(cfg, cfg.eval.harmful_file, "eval.harmful_file")
        if fixed is not None:  # their validation prompts in place of a held-out split
            splits = with_eval_prompts(splits, read_prompt_file(fixed), cfg.eval.n, str(fixed))
        gen = cfg.eval.generation
        if gen.prefix == "file" and prefills(gen.attack):  # a prompt without an answer stops here, before any work
            read_prefix_answers(eval_file(cfg, gen.prefix_file, "eval.generation.prefix_file"), splits.harmful_eval)
        elif prefills(gen.attack) and any(not r.target for r in splits.harmful_eval):
            first = next(r for r in splits.harmful_eval if not r.target)
            raise HarmsweepError(
                f"eval.generation.attack={gen.attack} prefills the dataset's target and {first.source_id} has none: "
                "use eval.generation.prefix=file with a prefix_file of real answers"
            )
        ctx = cls(cfg, plain, run_id, run_dir, spec, lm, template, splits, params, given=given)
        ctx.timings["load"] = load_s
        return ctx

    @property
    def root(self) -> Path:
        """Where shared artifacts live: the configured cache, or the run folder when sharing is off."""
        return Path(self.cfg.paths.artifacts) if self.cfg.paths.artifacts else self.run_dir / "artifacts"

    def timed(self, name: str, fn: Callable[[], T]) -> T:
        """fn(), its seconds added to ``timings[name]``; the stage an interruption names meanwhile (STAGE)."""
        STAGE[0] = name
        start = time.perf_counter()
        out = fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        return out

    def weights(self) -> dict[str, torch.nn.Parameter]:
        """The scored weights of the model, by parameter name."""
        return {n: p for n, p in self.lm.model.named_parameters() if n in self.params}

    def n_scored(self) -> int:
        return sum(w.numel() for w in self.weights().values())

    def judges(self) -> JudgeSource:
        return JudgeSource(self.cfg.judges, self.cfg.data.root, self.cfg.data.download, self.cfg.paths.cache_dir)


def load_run_model(cfg: Config) -> LoadedModel:
    """The checkpoint the config names (derived variants trained or loaded from the cache), on its device."""
    if cfg.alignment.derive:
        lm = load_derived(cfg.alignment, cfg.model, cfg.data, cfg.paths.cache_dir, cfg.device)
    else:
        lm = load_model(cfg.model, cfg.alignment.name, cfg.paths.cache_dir)
    place_model(lm.model, cfg.device, cfg.model.device_map, cfg.model.max_memory)
    return lm
