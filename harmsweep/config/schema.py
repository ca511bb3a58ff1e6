"""The config: its schema (typos and wrong types fail while composing), its checks, its identity.

conf/config.yaml composes onto ``Config`` (registered as ``harmsweep_schema``), so an override such
as ``pruning.sparsty=1e-4`` or ``pruning.sparsity=lots`` fails while composing, before any work.
Value ranges and cross-field rules are checked by check_config (with PruneSpec.validate and the
evaluation plan) before any work; run_id names a run by what can change its results.
Free-form parts (a model's checkpoints, judge options) stay dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore

from harmsweep.alignment.finetune import FinetuneSpec

if TYPE_CHECKING:
    pass


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






















def register() -> None:
    ConfigStore.instance().store(name="harmsweep_schema", node=Config)
