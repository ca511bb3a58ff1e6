"""TODO docstring"""


from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harmsweep.alignment.finetune import FinetuneSpec
from harmsweep.calibration.pairs import RESPONSE_MODES
from harmsweep.config.schema import DeriveConfig
from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.suite import plan
from harmsweep.intervals import BootstrapSpec
from harmsweep.pruning.spec import PruneSpec
from harmsweep.scoring.store import StoreSpec

if TYPE_CHECKING:
    from harmsweep.pruning.lowrank import LowRankSpec


DERIVE_GOALS = ("refuse", "comply")


COMPLY_RESPONSES = ("prefill", "file")


GOAL_ONLY = {  # settings read by one goal only
    "refuse": ("refusals", "refusals_file", "refusal_model"),
    "comply": ("harmful", "responses", "responses_file", "prefill_tokens", "max_new_tokens", "min_kept"),
}


METHODS = ("prune", "lowrank")


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
    from harmsweep.pruning.lowrank import LowRankSpec

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

