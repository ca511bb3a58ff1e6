"""The config: its schema (typos and wrong types fail while composing), its checks, its identity.

conf/config.yaml composes onto ``Config`` (registered as ``harmsweep_schema``), so an override such
as ``pruning.sparsty=1e-4`` or ``pruning.sparsity=lots`` fails while composing, before any work.
Value ranges and cross-field rules are checked by check_config (with PruneSpec.validate and the
evaluation plan) before any work; run_id names a run by what can change its results.
Free-form parts (a model's checkpoints, judge options) stay dicts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore

from harmsweep.calibration import RESPONSE_MODES
from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.suite import plan
from harmsweep.finetune import FinetuneSpec
from harmsweep.intervals import BootstrapSpec
from harmsweep.pruning import PruneSpec
from harmsweep.score_store import StoreSpec

if TYPE_CHECKING:
    from harmsweep.lowrank import LowRankSpec


@dataclass
class ModelConfig:
    name: str = "?"
    path: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    variants: dict[str, Any] = field(default_factory=dict)  # alignment name -> checkpoint spec
    device_map: Any = None  # null: one device (``device``); auto: accelerate's placement over the job's GPUs
    max_memory: dict[str, Any] | None = None  # per-device budgets for device_map=auto; null: room left for scores


@dataclass
class DeriveConfig:
    """A fine-tune of the ``parent`` variant that adds or removes refusals (harmsweep/derive.py).

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
    finetune: FinetuneSpec = field(
        default_factory=lambda: FinetuneSpec(lr=2e-4, epochs=2, batch_size=8, max_length=192)
    )


DERIVE_GOALS = ("refuse", "comply")
COMPLY_RESPONSES = ("prefill", "file")
GOAL_ONLY = {  # settings read by one goal only
    "refuse": ("refusals", "refusals_file", "refusal_model"),
    "comply": ("harmful", "responses", "responses_file", "prefill_tokens", "max_new_tokens", "min_kept"),
}


@dataclass
class AlignmentConfig:
    name: str = "aligned"
    template: str = "chat"
    derive: DeriveConfig | None = None  # set: the checkpoint is derived from another variant by fine-tuning


@dataclass
class DatasetRef:
    name: str = "advbench"
    file: str | None = None
    categories: list[str] | None = None


@dataclass
class DataConfig:
    root: str | None = None
    download: bool = False
    harmful: DatasetRef = field(default_factory=DatasetRef)
    benign: DatasetRef = field(default_factory=lambda: DatasetRef(name="alpaca"))


@dataclass
class HarmfulCalibration:
    responses: str = "prefill"
    file: str | None = None
    prefill_tokens: int = 8
    max_new_tokens: int = 48


@dataclass
class BenignCalibration:
    file: str | None = None


@dataclass
class CalibrationConfig:
    n: int = 32
    batch_size: int = 8
    gen_batch_size: int = 16
    max_length: int = 256
    harmful: HarmfulCalibration = field(default_factory=HarmfulCalibration)
    benign: BenignCalibration = field(default_factory=BenignCalibration)


@dataclass
class ScoringConfig:
    """Memory knobs of scoring (harmsweep/scoring.py ScoringOptions); none changes a score."""

    criterion: str = "snip"  # snip | wanda: what the score sets hold (this one is in the run id)
    gradient_checkpointing: bool = False
    offload: bool = True


@dataclass
class LowRankConfig:
    """method=lowrank: ActSVD removal of the harmful activation subspace (harmsweep/lowrank.py LowRankSpec)."""

    rank_harmful: int = 16
    rank_utility: int = 0
    tokens: str = "response"


@dataclass
class BootstrapConfig:
    """Intervals of every figure (harmsweep/intervals.py BootstrapSpec); they change no measurement."""

    samples: int = 1000
    level: float = 0.95
    seed: int = 0


@dataclass
class ScoresConfig:
    """How score sets are stored (harmsweep/score_store.py StoreSpec); masks do not depend on it."""

    store: str = "compact"
    keep: float = 0.011
    keep_benign: float = 0.01


@dataclass
class PruningConfig:
    rule: str = "signed_snip"
    sparsity: float = 1e-5
    protect: float = 0.01
    harm_fraction: float | None = None
    granularity: str = "global"
    benign_importance: str = "abs_signed"
    counts: str = "round"
    ties: str = "index"
    order: str = "top"
    nm_n: int = 2
    nm_m: int = 4
    replace: str = "zero"
    sequential: bool = False


@dataclass
class GenerationConfig:
    attack: str = "none"
    prefill_tokens: int = 8
    max_new_tokens: int = 64
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    backend: str = "hf"


@dataclass
class PerplexityConfig:
    max_length: int = 256


@dataclass
class LmEvalConfig:
    tasks: list[str] = field(default_factory=list)
    limit: int | None = 200
    batch_size: Any = 8  # a number, or auto
    num_fewshot: int | None = 0  # null: each task's standard few-shot setting


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=list)
    n: int | None = 32  # null: every held-out prompt
    batch_size: int = 8
    benign_references: str = "model"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)


@dataclass
class LoggerConfig:
    name: str = "none"
    project: str = "harmsweep"
    entity: str | None = None
    mode: str = "auto"
    dir: str | None = None
    group: str | None = None
    job_type: str | None = None
    tags: list[str] = field(default_factory=list)
    log_generations: bool = False
    log_mask: bool = False


@dataclass
class PathsConfig:
    cache_dir: str = "~/.cache/harmsweep"
    artifacts: str | None = None


@dataclass
class CrossHarmConfig:
    """Experiment 2: calibrate per harm category, prune, evaluate every category (experiments/cross_harm.py)."""

    categories: list[str] | None = None  # null: every category of data.harmful
    judges: list[str] = field(default_factory=list)  # judged generations per cell (refusal, strongreject_*)
    controls: list[str] = field(default_factory=lambda: ["benign", "random"])
    control_benign: str = "alpaca_eval"  # the benign-calibrated control row's data


@dataclass
class EMDomain:
    name: str = "insecure"
    file: str | None = None  # JSONL of {"messages": [...]}; null: em/insecure_small.jsonl under data.root


@dataclass
class EMConfig:
    """Experiment 3: emergent misalignment with and without harm pruning (experiments/em.py)."""

    domains: list[EMDomain] = field(default_factory=lambda: [EMDomain()])
    arms: list[str] = field(default_factory=lambda: ["none", "prune_before", "prune_after"])
    questions: str | None = None  # null: em/first_plot_questions.yaml under data.root
    question_ids: list[str] | None = None
    samples_per_question: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    n_train: int | None = None  # null: the whole domain file
    judge: dict[str, Any] = field(default_factory=lambda: {"name": "em_proxy"})
    finetune: FinetuneSpec = field(
        default_factory=lambda: FinetuneSpec(lr=1e-4, epochs=3, batch_size=4, max_length=384)
    )


@dataclass
class DissociationConfig:
    """Experiment 4: harm vs refusal pruning on generation/recognition, and recovery (experiments/dissociation.py)."""

    refusals: str = "wei2024_refusals"  # harmful prompts with refusal responses: the control's calibration
    refusals_file: str | None = None
    recovery_steps: int = 8  # fine-tune steps on harmful pairs after harm pruning; 0: no recovery curve
    recovery_every: int = 2
    finetune: FinetuneSpec = field(default_factory=lambda: FinetuneSpec(lr=1e-4, batch_size=8, epochs=100))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    scores: ScoresConfig = field(default_factory=ScoresConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    method: str = "prune"  # prune: a mask of weights | lowrank: ActSVD removal of a subspace (lowrank block)
    lowrank: LowRankConfig = field(default_factory=LowRankConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    judges: dict[str, Any] = field(default_factory=dict)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    experiment: str | None = None  # name of the experiment preset, if any (W&B job type)
    cross_harm: CrossHarmConfig | None = None  # set by experiment=cross_harm
    em: EMConfig | None = None  # set by experiment=em
    dissociation: DissociationConfig | None = None  # set by experiment=dissociation
    seed: int = 0
    device: str = "auto"
    stage: str = "run"  # run | prepare: a launcher's job making a group's shared artifacts (run.prepare)
    prepare_scores: list[str] | None = None  # stage=prepare: score kinds to make; null: what pruning needs


# stage, prepare_scores: a prepare job is its group's first run with another stage (harmsweep/launcher.py)
NOT_IN_RUN_ID = (
    "paths", "logger", "launcher", "hydra", "scoring", "scores", "bootstrap", "stage", "prepare_scores",
)  # fmt: skip
PLACEMENT_KEYS = ("device_map", "max_memory")  # where the model sits changes no result
# Settings added after sweeps were run: at their default they leave the run id as it was, so finished runs stay found.
LATER_DEFAULTS = {
    "pruning": {"counts": "round", "ties": "index", "order": "top", "nm_n": 2, "nm_m": 4, "replace": "zero",
                "sequential": False},
    "": {"method": "prune"},
}  # fmt: skip
METHODS = ("prune", "lowrank")


def run_id(cfg: Mapping[str, Any]) -> str:
    """Hash of the resolved config minus where things are stored, placed, launched and logged."""
    kept = {k: v for k, v in cfg.items() if k not in NOT_IN_RUN_ID and v is not None}
    kept["data"] = {k: v for k, v in kept.get("data", {}).items() if k not in ("root", "download")}
    if "model" in kept:
        kept["model"] = {k: v for k, v in kept["model"].items() if k not in PLACEMENT_KEYS}
    for block, defaults in LATER_DEFAULTS.items():
        target = kept.get(block) if block else kept
        if isinstance(target, Mapping):
            target = {k: v for k, v in target.items() if not (k in defaults and v == defaults[k])}
            kept = {**kept, block: target} if block else target
    if kept.get("method", "prune") == "prune":
        kept.pop("lowrank", None)  # read by method=lowrank only
    else:
        kept.pop("pruning", None)  # a low-rank removal selects no weights
    criterion = (cfg.get("scoring") or {}).get("criterion", "snip")
    if criterion != "snip":
        kept["scoring"] = {"criterion": criterion}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prune_spec(cfg: Mapping[str, Any]) -> PruneSpec:
    p = cfg["pruning"]
    spec = PruneSpec(
        rule=p["rule"],
        sparsity=float(p["sparsity"]),
        protect=float(p["protect"]),
        harm_fraction=None if p.get("harm_fraction") is None else float(p["harm_fraction"]),
        granularity=p["granularity"],
        benign_importance=p["benign_importance"],
        seed=int(cfg["seed"]),
        counts=p.get("counts", "round"),
        ties=p.get("ties", "index"),
        order=p.get("order", "top"),
        nm_n=int(p.get("nm_n", 2)),
        nm_m=int(p.get("nm_m", 4)),
        replace=p.get("replace", "zero"),
        sequential=bool(p.get("sequential", False)),
        criterion=(cfg.get("scoring") or {}).get("criterion", "snip"),
    )
    spec.validate()
    return spec


def lowrank_spec(cfg: Mapping[str, Any]) -> LowRankSpec:
    from harmsweep.lowrank import LowRankSpec

    block = cfg.get("lowrank") or {}
    spec = LowRankSpec(int(block.get("rank_harmful", 16)), int(block.get("rank_utility", 0)),
                       str(block.get("tokens", "response")))  # fmt: skip
    spec.validate()
    return spec


def check_config(cfg: Mapping[str, Any]) -> PruneSpec:
    """Every check that needs no model, so bad input fails in a second, before any work."""
    spec = prune_spec(cfg)
    _check_method(cfg, spec)
    _check_store(spec, StoreSpec.from_config(cfg.get("scores")))
    BootstrapSpec.from_config(cfg.get("bootstrap"))
    plan(cfg["eval"], cfg["judges"])
    cal, data = cfg["calibration"], cfg["data"]
    mode = cal["harmful"]["responses"]
    if mode not in RESPONSE_MODES:
        raise HarmsweepError(f"calibration.harmful.responses={mode} is not one of {', '.join(RESPONSE_MODES)}")
    for key, value in (("calibration.n", cal["n"]), ("eval.n", cfg["eval"]["n"] or 1)):
        if int(value) < 1:
            raise HarmsweepError(f"{key}={value} must be at least 1")
    if mode == "file" and not cal["harmful"].get("file"):
        raise HarmsweepError(
            "calibration.harmful.responses=file needs calibration.harmful.file=PATH (JSONL: prompt, response)"
        )
    if mode != "file" and cal["harmful"].get("file"):
        raise HarmsweepError(
            f"calibration.harmful.file={cal['harmful']['file']} is read only with calibration=file (harmful "
            f"responses from the file; now they come from calibration.harmful.responses={mode}): add calibration=file "
            "to use it, or drop the file setting"
        )
    for key in ("calibration.harmful.file", "calibration.benign.file"):
        path = cal[key.split(".")[1]].get("file")
        if path and not Path(path).is_file():
            raise HarmsweepError(f"{key} not found: {path}")
    for side in ("harmful", "benign"):
        if data[side]["name"] == "custom" and not data[side].get("file"):
            raise HarmsweepError(
                f"data.{side}.name=custom needs data.{side}.file=PATH (CSV, JSON or JSONL with a prompt column)"
            )
    _check_experiment(cfg)
    harmful_from_root = mode != "file" and not data["harmful"].get("file")
    benign_from_root = not cal["benign"].get("file") and not data["benign"].get("file")
    needs_root = harmful_from_root or benign_from_root
    root = data.get("root")
    if needs_root and (not root or not Path(str(root)).is_dir()):
        raise HarmsweepError(
            f"data root not found: {root} (set data.root=DIR or the HARMSWEEP_DATA environment variable)"
        )
    return spec


def _check_method(cfg: Mapping[str, Any], spec: PruneSpec) -> None:
    """method, the low-rank block, and what pruning.replace=base and the experiments need."""
    method = cfg.get("method", "prune")
    if method not in METHODS:
        raise HarmsweepError(f"method={method} is not one of {', '.join(METHODS)}")
    if method == "lowrank":
        lowrank_spec(cfg)
        if cfg.get("experiment") in EXPERIMENT_BLOCKS:
            raise HarmsweepError(f"method=lowrank is a run of its own: experiment={cfg['experiment']} prunes masks")
    if cfg.get("experiment") in EXPERIMENT_BLOCKS and (spec.replace != "zero" or spec.sequential):
        raise HarmsweepError(
            f"experiment={cfg['experiment']} applies and restores masks on one loaded model: it supports "
            "pruning.replace=zero and pruning.sequential=false only"
        )
    if spec.replace == "base":
        variants = cfg["model"].get("variants") or {}
        if "base" not in variants:
            raise HarmsweepError(
                f"pruning.replace=base takes the pruned weights from the base variant, and model={cfg['model']['name']} "
                f"has none (it has: {', '.join(sorted(variants)) or 'none'}): add model.variants.base"
            )
        if cfg["alignment"]["name"] == "base":
            raise HarmsweepError("pruning.replace=base on alignment=base would change nothing: prune another variant")


def _check_store(spec: PruneSpec, kept: StoreSpec) -> None:
    """A compact set cannot serve a top-k larger than its tail: say which setting to raise before scoring."""
    if kept.store != "compact" or spec.sequential:  # sequential scores live in memory, one layer at a time
        return
    if spec.reads_every_score() and spec.needed_scores():
        what = "pruning.order=bottom" if spec.order == "bottom" else f"pruning.granularity={spec.granularity}"
        raise HarmsweepError(
            f"{what} reads every score, and a compact score set keeps only the top tails: use scores.store=dense "
            "(or pruning.sequential=true, which keeps one layer's scores in memory)"
        )
    wanted = spec.harm_fraction if spec.harm_fraction is not None else spec.sparsity
    if spec.needed_scores() & {"harm", "harm_unsigned"} and wanted > kept.keep:
        name = "harm_fraction" if spec.harm_fraction is not None else "sparsity"
        raise HarmsweepError(
            f"pruning.{name}={wanted:g} is more than the stored score tail scores.keep={kept.keep:g}: "
            f"raise scores.keep (to at least {wanted:g} + pruning.protect to be safe) or use scores.store=dense"
        )
    if spec.protects and spec.protect > kept.keep_benign:
        raise HarmsweepError(
            f"pruning.protect={spec.protect:g} is more than the stored benign tail scores.keep_benign="
            f"{kept.keep_benign:g}: raise scores.keep_benign or use scores.store=dense"
        )


def _check_experiment(cfg: Mapping[str, Any]) -> None:
    """Fine-tune blocks and experiment blocks are checked here too, not minutes into a run."""
    name = cfg.get("experiment")
    if name in EXPERIMENT_BLOCKS and not cfg.get(name):
        raise HarmsweepError(f"experiment={name} needs its {name}: block; use the preset: -m experiment={name}")
    derive = cfg["alignment"].get("derive")
    for where, block in (
        ("alignment.derive", derive),
        ("em", cfg.get("em")),
        ("dissociation", cfg.get("dissociation")),
    ):
        if block:
            FinetuneSpec.from_config(block["finetune"])
            if where == "alignment.derive":
                _check_derive(block, cfg["alignment"]["name"])
    dis = cfg.get("dissociation")
    tuned_in_memory = name == "em" or (name == "dissociation" and dis and int(dis["recovery_steps"]) > 0)
    if tuned_in_memory and cfg["eval"]["generation"]["backend"] == "vllm":
        raise HarmsweepError(
            f"experiment={name} generates from models fine-tuned in memory, which a vLLM engine cannot see: "
            "use eval.generation.backend=hf"
        )
    if dis and (int(dis["recovery_steps"]) < 0 or int(dis["recovery_every"]) < 1):
        raise HarmsweepError("dissociation.recovery_steps must be >= 0 and dissociation.recovery_every >= 1")


def _check_derive(block: Mapping[str, Any], variant: str) -> None:
    """An alignment.derive block that contradicts itself fails here, not after the parent has loaded."""
    if block["parent"] == variant:
        raise HarmsweepError(f"alignment.derive.parent={block['parent']} names the derived variant itself")
    goal = block.get("goal", "refuse")
    if goal not in DERIVE_GOALS:
        raise HarmsweepError(f"alignment.derive.goal={goal} is not one of {', '.join(DERIVE_GOALS)}")
    defaults = DeriveConfig()
    other = next(g for g in DERIVE_GOALS if g != goal)
    for key in GOAL_ONLY[other]:
        if key in block and block[key] != getattr(defaults, key):
            raise HarmsweepError(
                f"alignment.derive.{key}={block[key]} is read only with goal={other}, and this block has goal={goal}: "
                "drop it or change the goal"
            )
    for key in ("n_harmful", "n_benign", "eval_n"):
        if int(block[key]) < 1:
            raise HarmsweepError(f"alignment.derive.{key}={block[key]} must be at least 1")
    if block.get("refusals_file") and not Path(block["refusals_file"]).is_file():
        raise HarmsweepError(f"alignment.derive.refusals_file not found: {block['refusals_file']}")
    if goal != "comply":
        return
    responses, file = block.get("responses", "prefill"), block.get("responses_file")
    if responses not in COMPLY_RESPONSES:
        raise HarmsweepError(f"alignment.derive.responses={responses} is not one of {', '.join(COMPLY_RESPONSES)}")
    if responses == "file" and not file:
        raise HarmsweepError(
            "alignment.derive.responses=file needs alignment.derive.responses_file=PATH (prompt, response)"
        )
    if responses != "file" and file:
        raise HarmsweepError(
            f"alignment.derive.responses_file={file} is read only with responses=file (now responses={responses})"
        )
    if file and not Path(file).is_file():
        raise HarmsweepError(f"alignment.derive.responses_file not found: {file}")
    if file and block.get("harmful", defaults.harmful) != defaults.harmful:
        raise HarmsweepError(
            f"alignment.derive.harmful={block['harmful']} is not read with responses=file: the prompts come from the file"
        )
    if int(block.get("prefill_tokens", 0)) < 0 or int(block.get("max_new_tokens", 1)) < 1:
        raise HarmsweepError("alignment.derive.prefill_tokens must be >= 0 and alignment.derive.max_new_tokens >= 1")
    kept = float(block.get("min_kept", defaults.min_kept))
    if not 0 < kept <= 1:
        raise HarmsweepError(f"alignment.derive.min_kept={kept:g} must be in (0, 1]")


EXPERIMENT_BLOCKS = ("cross_harm", "em", "dissociation")


def register() -> None:
    ConfigStore.instance().store(name="harmsweep_schema", node=Config)
