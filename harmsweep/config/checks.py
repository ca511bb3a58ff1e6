"""Every check that needs no model: ranges and rules across blocks, so bad input fails in a second.

Each block checks itself (``PruneSpec.validate``, ``StoreSpec.validate``, the evaluation's ``metric_plan``, ...);
this module adds what only the whole config can tell (a file setting read in another mode, a compact
score set too short for the sparsity, an experiment without its block). No torch here.
"""

from __future__ import annotations

import csv
from pathlib import Path

from harmsweep.alignment.spec import COMPLY_RESPONSES, DERIVE_GOALS, GOAL_ONLY, DeriveConfig
from harmsweep.calibration.spec import FORMATS, RESPONSE_MODES, ROWS
from harmsweep.config.eval_checks import check_evaluation
from harmsweep.config.schema import CAPABILITIES, Config
from harmsweep.data.btap import btap_files, check_pair_file
from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.spec import JUDGES, metric_plan
from harmsweep.generation.sampling import prefills
from harmsweep.masks.options import check_given
from harmsweep.models.checkpoints import checkpoint_spec
from harmsweep.pruning.spec import PruneSpec, is_zero_alpha
from harmsweep.scoring.spec import StoreSpec

METHODS = ("prune", "lowrank")
# experiments whose body selects its own masks -> the config block they read
EXPERIMENT_BLOCKS = {"cross_harm": "cross_harm", "em": "em", "dissociation": "dissociation", "orgad2026_em": "em"}


def check_config(cfg: Config, *, data_root: bool = True) -> PruneSpec:
    """Every check that needs no model, so bad input fails in a second, before any work; the run's rule.

    ``data_root=False``: the data folder is not looked for (``harmsweep plan`` reads configs only, and may
    run where the data is not)."""
    spec = cfg.prune_spec()
    _check_method(cfg, spec)
    body = cfg.experiment if cfg.experiment in EXPERIMENT_BLOCKS else None  # an experiment that selects its own masks
    check_given(spec.mask_file, spec.intersect, sequential=spec.sequential, method=cfg.method, experiment=body,
                score_rule=spec.harm_set() is not None)  # fmt: skip
    cfg.model.validate()
    _check_own_alignment(cfg)
    cfg.scores.validate()
    cfg.scoring.validate(cfg.scores)
    _check_store(spec, cfg.scores)
    cfg.bootstrap.validate()
    metric_plan(cfg.eval, cfg.judges)
    _check_vllm(cfg)
    check_evaluation(cfg, files_here=data_root)
    cal, data = cfg.calibration, cfg.data
    mode = cal.harmful.responses
    _check_calibration(cfg, data_root)
    for side, ref in (("harmful", data.harmful), ("benign", data.benign)):
        ref.validate(side)
        if ref.name == "custom" and not ref.file:
            raise HarmsweepError(
                f"data.{side}.name=custom needs data.{side}.file=PATH (CSV, JSON or JSONL with a prompt column)"
            )
    _check_experiment(cfg)
    # held-out harmful prompts come from the rows calibration leaves, else from data.harmful under the root
    harmful_from_root = mode != "file" and not data.harmful.file and not (data_root and _rows_left(cfg))
    harmful_from_root = harmful_from_root and not (cfg.eval.harmful_file and (cal.btap_data or mode == "file"))
    benign_from_root = not cal.benign.file and not data.benign.file and not cal.btap_data
    if data_root and (harmful_from_root or benign_from_root) and (not data.root or not Path(str(data.root)).is_dir()):
        raise HarmsweepError(
            f"data root not found: {data.root} (set data.root=DIR or the HARMSWEEP_DATA environment variable)"
        )
    return spec


def _check_calibration(cfg: Config, data_root: bool) -> None:
    """The calibration block: choices and counts, which file settings go together, and (when files may be read)
    the authors' files exist with their pair columns. Reads CSV headers only."""
    cal = cfg.calibration
    mode = cal.harmful.responses
    if mode not in RESPONSE_MODES:
        raise HarmsweepError(f"calibration.harmful.responses={mode} is not one of {', '.join(RESPONSE_MODES)}")
    for key, value, choices in (("format", cal.format, FORMATS), ("rows", cal.rows, ROWS)):
        if value not in choices:
            raise HarmsweepError(f"calibration.{key}={value} is not one of {', '.join(choices)}")
    counts = (("calibration.n", cal.n), ("calibration.n_benign", cal.n_benign), ("eval.n", cfg.eval.n or 1))
    counts += (("calibration.max_length", cal.max_length),)
    for key, value in counts:
        if value is not None and int(value) < 1:
            raise HarmsweepError(f"{key}={value} must be at least 1")
    if cal.format == "template" and cal.separator != "\n":
        raise HarmsweepError(
            f"calibration.separator={cal.separator!r} is read only with calibration.format=btap (the authors' "
            "tokenisation): drop it or set calibration.format=btap"
        )
    if cal.btap_data:
        for key, value in (("harmful.file", cal.harmful.file), ("benign.file", cal.benign.file)):
            if value:
                raise HarmsweepError(
                    f"calibration.{key}={value} and calibration.btap_data={cal.btap_data} both name pairs: keep one"
                )
    elif mode == "file" and not cal.harmful.file:
        raise HarmsweepError(
            "calibration.harmful.responses=file needs calibration.harmful.file=PATH (JSONL: prompt, response)"
            " or calibration.btap_data=DIR"
        )
    if mode != "file" and cal.harmful.file:
        add = "calibration.harmful.responses=file" if cal.format == "btap" else "calibration=file"
        raise HarmsweepError(
            f"calibration.harmful.file={cal.harmful.file} is read only with calibration=file (harmful "
            f"responses from the file; now they come from calibration.harmful.responses={mode}): add {add} "
            "to use it, or drop the file setting"
        )
    for key, path in (("calibration.harmful.file", cal.harmful.file), ("calibration.benign.file", cal.benign.file)):
        if path and not Path(path).is_file():
            raise HarmsweepError(f"{key} not found: {path}")
    if not data_root:  # harmsweep plan: configs only, files may live elsewhere
        return
    if cal.btap_data:
        if not Path(cal.btap_data).expanduser().is_dir():
            raise HarmsweepError(f"calibration.btap_data={cal.btap_data} is not a folder")
        name = cfg.btap_basename()
        for path, setting, align in btap_files(cal.btap_data, cal.prune_data, cal.preserve_data, name).values():
            check_pair_file(path, f"{setting} with the model basename {name} under calibration.btap_data", align)
    elif cal.format == "btap":
        for key, path, align in (("harmful", cal.harmful.file, True), ("benign", cal.benign.file, False)):
            if path:
                check_pair_file(Path(path).expanduser(), f"calibration.{key}.file", align)


def _rows_left(cfg: Config) -> bool:
    """Whether the authors' harmful file (calibration.btap_data) holds more rows than calibration.n, so that the
    evaluation prompts come from its other rows (rows counted with the csv module: no ``datasets`` here)."""
    cal = cfg.calibration
    if not cal.btap_data:
        return False
    path = btap_files(cal.btap_data, cal.prune_data, cal.preserve_data, cfg.btap_basename())["harmful"][0]
    if path.suffix.lower() != ".csv":
        return True  # JSON files: counted when read; data.harmful is looked for then, if needed
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return sum(1 for _ in csv.reader(handle)) - 1 > cal.n


def _check_method(cfg: Config, spec: PruneSpec) -> None:
    """method, the low-rank block, and what pruning.replace=base and the experiments need."""
    if cfg.method not in METHODS:
        raise HarmsweepError(f"method={cfg.method} is not one of {', '.join(METHODS)}")
    if cfg.method == "lowrank":
        cfg.lowrank.validate()
        if cfg.experiment in EXPERIMENT_BLOCKS:
            raise HarmsweepError(f"method=lowrank is a run of its own: experiment={cfg.experiment} prunes masks")
    if cfg.experiment in EXPERIMENT_BLOCKS and (
        spec.replace != "zero" or spec.sequential or not is_zero_alpha(spec.alpha)
    ):
        raise HarmsweepError(
            f"experiment={cfg.experiment} applies and restores masks on one loaded model: it supports "
            "pruning.replace=zero, pruning.alpha=0 and pruning.sequential=false only"
        )
    if spec.replace == "base":
        variants = cfg.model.variants or {}
        if "base" not in variants:
            raise HarmsweepError(
                f"pruning.replace=base takes the pruned weights from the base variant, and model={cfg.model.name} "
                f"has none (it has: {', '.join(sorted(variants)) or 'none'}): add model.variants.base"
            )
        if cfg.alignment.name == "base":
            raise HarmsweepError("pruning.replace=base on alignment=base would change nothing: prune another variant")


def _check_vllm(cfg: Config) -> None:
    """A vLLM engine loads the checkpoint and takes the run's mask: what it cannot serve stops here, not as
    silently wrong answers (a low-rank change) or a failed engine start (an adapter) after scoring."""
    if cfg.eval.generation.backend == "auto" and cfg.experiment != "orgad2026_em":
        raise HarmsweepError(
            "eval.generation.backend=auto (vLLM where installed on a GPU, else hf) is read by experiment=orgad2026_em "
            "only: use hf or vllm"
        )
    if cfg.eval.generation.backend == "vllm" and cfg.em is not None and cfg.experiment != "orgad2026_em":
        raise HarmsweepError(
            "experiment=em answers with fine-tuned weights held in memory, which a vLLM engine (the checkpoint, "
            "with a mask applied inside it) would not serve: use eval.generation.backend=hf"
        )
    planned, _ = metric_plan(cfg.eval, cfg.judges)
    if cfg.eval.generation.backend != "vllm" or not any(m in JUDGES for m in planned):
        return  # nothing is generated by an engine
    if not is_zero_alpha(cfg.pruning.alpha):
        raise HarmsweepError(
            f"pruning.alpha={cfg.pruning.alpha} scales the selected weights, and a vLLM engine takes the run's mask as "
            "zeros: use eval.generation.backend=hf"
        )
    if cfg.method == "lowrank":
        raise HarmsweepError(
            "method=lowrank changes whole matrices, which a vLLM engine (the checkpoint, with a mask applied "
            "inside it) would not serve: use eval.generation.backend=hf"
        )
    if cfg.alignment.derive is None:  # a derived variant is a full checkpoint in the cache
        found, where = checkpoint_spec(cfg.model, cfg.alignment.name)
        path = found.get("path")
        if found.get("base_revision") or (path and (Path(str(path)).expanduser() / "adapter_config.json").is_file()):
            raise HarmsweepError(
                f"{where} is a PEFT adapter, which vLLM cannot serve with the run's mask: use "
                "eval.generation.backend=hf, or merge the adapter into a full checkpoint and load that"
            )


def _check_own_alignment(cfg: Config) -> None:
    """A model by path alone (conf/model/own.yaml) is one checkpoint, the aligned one: another alignment needs its
    checkpoint given, never the path standing in for it (a derived variant is trained from its parent)."""
    model, alignment = cfg.model, cfg.alignment
    if model.path and not model.variants and alignment.derive is None and alignment.name != "aligned":
        raise HarmsweepError(
            f"model.path={model.path} is the aligned checkpoint; alignment={alignment.name} needs its own: "
            f"model.variants.{alignment.name}.path=DIR (or model.variants.{alignment.name}.hub_id=ID)"
        )


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
    # scores.keep*=auto sizes each tail from this run's needs (StoreSpec.resolved): only numbers can fall short
    wanted = spec.harm_fraction if spec.harm_fraction is not None else spec.sparsity
    if spec.freeze_first_top_q and spec.harm_fraction is not None:
        wanted = 2 * spec.harm_fraction  # the band reaches down to the top 2q
    harm_kept = kept.keep if kept.keep != kept.AUTO else None
    if spec.needed_scores() & {"harm", "harm_unsigned"} and harm_kept is not None and wanted > harm_kept:
        name = "harm_fraction" if spec.harm_fraction is not None else "sparsity"
        raise HarmsweepError(
            f"pruning.{name}={wanted:g} is more than the stored score tail scores.keep={harm_kept:g}: "
            f"use scores.keep=auto (sized from the run), raise scores.keep (to at least {wanted:g} + pruning.protect "
            "to be safe) or use scores.store=dense"
        )
    benign_kept = kept.keep_benign if kept.keep_benign != kept.AUTO else None
    if spec.protects and benign_kept is not None and spec.protect > benign_kept:
        raise HarmsweepError(
            f"pruning.protect={spec.protect:g} is more than the stored benign tail scores.keep_benign="
            f"{benign_kept:g}: use scores.keep_benign=auto, raise it, or use scores.store=dense"
        )


def _check_experiment(cfg: Config) -> None:
    """Fine-tune blocks and experiment blocks are checked here too, not minutes into a run."""
    name = cfg.experiment
    if name in EXPERIMENT_BLOCKS and not getattr(cfg, EXPERIMENT_BLOCKS[str(name)]):
        block = EXPERIMENT_BLOCKS[str(name)]
        raise HarmsweepError(f"experiment={name} needs its {block}: block; use the preset: -m experiment={name}")
    if name == "orgad2026_capabilities":
        _check_capabilities(cfg)
    if name == "cross_harm" and cfg.data.harmful.minus_category:
        raise HarmsweepError(
            "experiment=cross_harm calibrates on every category in turn: data.harmful.minus_category filters one "
            "category of a single run; drop it"
        )
    derive = cfg.alignment.derive
    for block in (derive, cfg.em, cfg.dissociation):
        if block:
            block.finetune.validate()
    if derive:
        _check_derive(derive, cfg.alignment.name)
    dis = cfg.dissociation
    tuned_in_memory = name == "em" or (name == "dissociation" and dis and dis.recovery_steps > 0)
    if tuned_in_memory and cfg.eval.generation.backend == "vllm":
        raise HarmsweepError(
            f"experiment={name} generates from models fine-tuned in memory, which a vLLM engine cannot see: "
            "use eval.generation.backend=hf"
        )
    if dis and (dis.recovery_steps < 0 or dis.recovery_every < 1):
        raise HarmsweepError("dissociation.recovery_steps must be >= 0 and dissociation.recovery_every >= 1")


def _check_capabilities(cfg: Config) -> None:
    """The capability pruned must be one of the four and have a file; harm is measured under a prefilling attack."""
    cap = cfg.capabilities
    if cap is None:
        raise HarmsweepError(
            "experiment=orgad2026_capabilities needs its capabilities: block; use the preset: "
            "-m experiment=orgad2026_capabilities"
        )
    if cap.prune not in CAPABILITIES:
        raise HarmsweepError(f"capabilities.prune={cap.prune} is not one of {', '.join(CAPABILITIES)}")
    if not cap.files.get(cap.prune):
        raise HarmsweepError(f"capabilities.files has no file for {cap.prune}: set capabilities.files.{cap.prune}=NAME")
    if not prefills(cap.attack):
        raise HarmsweepError(
            f"capabilities.attack={cap.attack} measures harm without a prefix: use prefill, refusal_ablation_prefill "
            "or finetune_prefill (their dissociation numbers are prefilled)"
        )


def _check_derive(block: DeriveConfig, variant: str) -> None:
    """An alignment.derive block that contradicts itself fails here, not after the parent has loaded."""
    if block.parent == variant:
        raise HarmsweepError(f"alignment.derive.parent={block.parent} names the derived variant itself")
    goal = block.goal
    if goal not in DERIVE_GOALS:
        raise HarmsweepError(f"alignment.derive.goal={goal} is not one of {', '.join(DERIVE_GOALS)}")
    defaults = DeriveConfig()
    other = next(g for g in DERIVE_GOALS if g != goal)
    for key in GOAL_ONLY[other]:
        if getattr(block, key) != getattr(defaults, key):
            raise HarmsweepError(
                f"alignment.derive.{key}={getattr(block, key)} is read only with goal={other}, and this block has "
                f"goal={goal}: drop it or change the goal"
            )
    for key in ("n_harmful", "n_benign", "eval_n", "check_tokens"):
        if getattr(block, key) < 1:
            raise HarmsweepError(f"alignment.derive.{key}={getattr(block, key)} must be at least 1")
    if block.refusals_file and not Path(block.refusals_file).is_file():
        raise HarmsweepError(f"alignment.derive.refusals_file not found: {block.refusals_file}")
    if goal != "comply":
        return
    responses, file = block.responses, block.responses_file
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
    if file and block.harmful != defaults.harmful:
        raise HarmsweepError(
            f"alignment.derive.harmful={block.harmful} is not read with responses=file: the prompts come from the file"
        )
    if block.prefill_tokens < 0 or block.max_new_tokens < 1:
        raise HarmsweepError("alignment.derive.prefill_tokens must be >= 0 and alignment.derive.max_new_tokens >= 1")
    if not 0 < block.min_kept <= 1:
        raise HarmsweepError(f"alignment.derive.min_kept={block.min_kept:g} must be in (0, 1]")
