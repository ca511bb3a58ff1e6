"""One run: calibrate -> score -> mask -> evaluate before -> apply -> evaluate after -> record.

Takes a plain resolved config dict (Hydra stays in cli.py). Every stage writes its artifact into the
run folder atomically; a re-run loads finished artifacts instead of recomputing them, and a run
whose result.json exists is returned as is. result.json is written last, so its presence means done.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import transformers

import harmsweep
from harmsweep.alignment.derive import derivation, load_derived, trained_prompts
from harmsweep.artifacts import write_json, write_jsonl
from harmsweep.cache import VERSIONS, cached, content_key, write_key_info
from harmsweep.calibration.pairs import PLAIN_TEMPLATE, resolve_template
from harmsweep.calibration.sets import calibrate, held_out_splits
from harmsweep.config.checks import check_config
from harmsweep.config.identity import run_id
from harmsweep.devices import place_model
from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.suite import COUNTS, JUDGES, HeldOut, Suite, deltas, plan
from harmsweep.intervals import BootstrapSpec, derived_metrics, run_intervals, samples_from_json, samples_to_json
from harmsweep.models.loading import LoadedModel, load_model
from harmsweep.models.parts import scored_parameters
from harmsweep.pipeline.stages import choose_mask, remove_low_rank_in_place, replacement, score, scoring_passes, timed
from harmsweep.pruning.masks import apply_mask, mask_counts
from harmsweep.pruning.spec import PruneSpec
from harmsweep.tracking import open_tracker

log = logging.getLogger(__name__)
Body = Callable[..., tuple[dict[str, Any], list[dict[str, Any]]]]  # (cfg, spec, run id, run dir) -> result, items


def run_pipeline(
    cfg: Mapping[str, Any], run_dir: Path, sweep: str | None = None, body: Body | None = None
) -> dict[str, Any]:
    """Run (or finish, or return the finished) run of ``cfg`` in ``run_dir``, logging it when configured.

    ``body``: an experiment's stages in place of one pruning run's (the command line picks it, so this
    package never imports the experiments built on it).
    """
    spec = check_config(cfg)
    rid = run_id(cfg)
    stage = cfg.get("stage") or "run"
    if stage == "prepare":  # a launcher's job making its group's shared artifacts: no pruning, no W&B run
        return prepare(cfg, spec, rid, run_dir)
    if stage != "run":
        raise HarmsweepError(f"stage={stage} is not one of run, prepare")
    _claim(run_dir, rid, cfg)
    (run_dir / "FAILED").unlink(missing_ok=True)  # a retry clears the previous failure
    result_path = run_dir / "result.json"
    if result_path.is_file():
        log.info("run %s is already done: %s", rid, result_path)
        return json.loads(result_path.read_text())
    logger_cfg = dict(cfg.get("logger") or {"name": "none"})
    if sweep and not logger_cfg.get("group"):
        logger_cfg["group"] = sweep
    if cfg.get("experiment") and not logger_cfg.get("job_type"):
        logger_cfg["job_type"] = cfg["experiment"]
    tracker = open_tracker(logger_cfg, run_id=rid, run_dir=run_dir, config=cfg)
    failed = True
    try:
        result, items = (body or _run)(cfg, spec, rid, run_dir)
        _log_reused(result)
        mask = result.get("artifacts", {}).get("mask")
        tracker.log_result(result, items, Path(mask) if mask else None)
        failed = False
        return result
    finally:
        tracker.finish(failed=failed)


def _run(
    cfg: Mapping[str, Any], spec: PruneSpec, rid: str, run_dir: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The stages; returns the result and the per-item rows (also written to items.jsonl)."""
    result_path = run_dir / "result.json"
    torch.manual_seed(int(cfg["seed"]))
    timings: dict[str, float] = {}
    computed: dict[str, bool] = {}  # which shared artifacts this run computed (False: reused)
    lm, template, splits, root, sets, cal_entry = _calibrated(cfg, run_dir, timings, computed)

    params = scored_parameters(lm.model)
    weights = {n: p for n, p in lm.model.named_parameters() if n in params}
    lowrank = cfg.get("method", "prune") == "lowrank"
    mask: dict[str, torch.Tensor] = {}
    score_paths: dict[str, str] = {}
    values = None
    if not lowrank:
        mask, score_paths = choose_mask(cfg, spec, lm, sets, root, params, weights, run_dir, timings, computed)
        # read before the long evaluation, so an unreachable base checkpoint fails in the first minute
        values = timed(timings, "base_values", lambda: replacement(cfg, spec, mask, weights))
    kinds = sorted(k.removeprefix("scores_") for k in score_paths)

    start = time.perf_counter()
    suite, before, computed["eval_before"], before_path = evaluate_before(
        cfg, lm, template, splits, sets, cal_entry, root
    )
    timings["evaluate_before"] = time.perf_counter() - start
    zeros_before = sum(int((w == 0).sum()) for w in weights.values())
    if lowrank:
        change = timed(timings, "lowrank", lambda: remove_low_rank_in_place(cfg, lm, sets))
        changed = 0
    else:
        changed = apply_mask(lm.model, mask, values, count_changed=True)
        change = {**spec.__dict__, **mask_counts(params, mask)}
    suite.mask = mask  # generation engines that hold their own weights (vLLM) apply it too
    zeros_after = sum(int((w == 0).sum()) for w in weights.values())
    after = timed(timings, "evaluate_after", lambda: _evaluate(suite, "after", None))
    artifacts_before = str(before_path)
    items = before["items"] + after["items"]
    write_jsonl(items, run_dir / "items.jsonl")

    n_scored = sum(w.numel() for w in weights.values())
    n_pruned = sum(int(idx.numel()) for idx in mask.values())
    boot = BootstrapSpec.from_config(cfg.get("bootstrap"))
    samples = {"before": samples_from_json(before.get("samples")), "after": samples_from_json(after["samples"])}
    intervals = run_intervals(samples["before"], samples["after"], boot)
    metrics = {
        **before["metrics"],
        **after["metrics"],
        **deltas(before["metrics"], after["metrics"]),
        **derived_metrics(intervals),
        "n_pruned": n_pruned,
        "target_sparsity": None if lowrank else spec.sparsity,
        # weights this pruning changed (zeroed, or set to the base variant's values); selected weights that
        # held that value already (GGUF dequantisation leaves zeros) do not count
        "actual_sparsity": changed / n_scored,
        "zero_fraction_after": zeros_after / n_scored,
        **({f"lowrank/{k}": v for k, v in change["summary"].items()} if lowrank else {}),
    }
    result = {
        "run_id": rid,
        "model": cfg["model"]["name"],
        "alignment": cfg["alignment"]["name"],
        "model_source": lm.source,
        "model_fingerprint": lm.fingerprint,
        "template": template if template == "chat" else f"plain: {PLAIN_TEMPLATE!r}",
        "derivation": derivation(lm.source, cfg["paths"]["cache_dir"]),
        "n_scored": n_scored,
        "n_pruned": n_pruned,
        "actual_sparsity": metrics["actual_sparsity"],
        "zero_fraction_before": zeros_before / n_scored,
        "metrics": metrics,
        "skipped_metrics": plan(cfg["eval"], cfg["judges"])[1],
        "judges": {
            name: suite.judge_versions().get(name) for name in plan(cfg["eval"], cfg["judges"])[0] if name in JUDGES
        },
        "pruning": {"rule": "lowrank", "sparsity": None, "protect": None, **change["spec"]} if lowrank else change,
        **({"lowrank": change} if lowrank else {}),
        "intervals": {"settings": boot.describe(), "metrics": intervals, "without": _without(metrics, intervals)},
        "samples": {stage: samples_to_json(s) for stage, s in samples.items()},
        "computed": computed,
        "scoring_passes": scoring_passes(spec, params, sets, kinds, computed, int(cfg["calibration"]["batch_size"])),
        "artifacts": {
            "calibration": str(cal_entry / "calibration.safetensors"),
            **score_paths,
            **({} if lowrank else {"mask": str(run_dir / "mask.safetensors")}),
            "eval_before": artifacts_before,
            "items": str(run_dir / "items.jsonl"),
        },
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "versions": {
            "harmsweep": harmsweep.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "config": dict(cfg),
    }
    write_json(result, result_path)
    return result, items


def _calibrated(
    cfg: Mapping[str, Any], run_dir: Path, timings: dict[str, float], computed: dict[str, bool]
) -> tuple[LoadedModel, str, Any, Path, dict[str, dict[str, torch.Tensor]], Path]:
    """The first stages of a run and of a prepare job: the model, its template and splits, the calibration."""
    lm = timed(timings, "load", lambda: load_run_model(cfg))
    template = resolve_template(lm.tokenizer, cfg["alignment"]["template"])
    splits = held_out_splits(cfg, exclude=trained_prompts(lm.source, cfg["paths"]["cache_dir"]))
    root = artifacts_root(cfg, run_dir)
    start = time.perf_counter()
    sets, cal_entry, computed["calibration"] = calibrate(cfg, lm, template, splits, root)
    timings["calibrate"] = time.perf_counter() - start
    return lm, template, splits, root, sets, cal_entry


def artifacts_root(cfg: Mapping[str, Any], run_dir: Path) -> Path:
    """Where shared artifacts live: the configured cache, or the run folder when sharing is off."""
    return Path(cfg["paths"]["artifacts"]) if cfg["paths"].get("artifacts") else run_dir / "artifacts"


def _claim(run_dir: Path, rid: str, cfg: Mapping[str, Any]) -> None:
    """Mark the folder as this run's, or refuse one that holds another run's artifacts."""
    identity = run_dir / "run.json"
    if identity.is_file():
        stored = json.loads(identity.read_text()).get("run_id")
        if stored != rid:
            raise HarmsweepError(
                f"{run_dir} holds run {stored}, not this config's run {rid}: use another hydra.run.dir or remove it"
            )
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json({"run_id": rid, "config": dict(cfg)}, identity)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def load_run_model(cfg: Mapping[str, Any]) -> LoadedModel:
    """The checkpoint the config names (derived variants trained or loaded from the cache), on its device."""
    if cfg["alignment"].get("derive"):
        lm = load_derived(cfg)
    else:
        lm = load_model(cfg["model"], cfg["alignment"]["name"], cfg["paths"]["cache_dir"])
    place_model(lm.model, cfg.get("device", "auto"), cfg["model"].get("device_map"), cfg["model"].get("max_memory"))
    return lm


def _without(metrics: Mapping[str, Any], intervals: Mapping[str, Any]) -> list[str]:
    """Measured figures that carry no interval (no per-item values: lm-eval), so the gap is on record."""
    counts = ("n_pruned", "target_sparsity", "actual_sparsity", "zero_fraction_after")
    return sorted(
        k for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k not in intervals and k not in counts
        and not k.split("/")[0].replace("_after", "_before").endswith(COUNTS)  # item counts (judge _n, _unscored)
    )  # fmt: skip


def _evaluate(suite: Suite, stage: str, path: Path | None, info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One stage's metrics, per-item rows and per-item values (the bootstrap's input)."""
    metrics, items = suite.run(stage)
    out = {"metrics": metrics, "items": items, "samples": samples_to_json(suite.samples(stage))}
    if path is not None:
        write_key_info(path.parent, info or {})
        write_json(out, path)
    return out


# ---------------------------------------------------------------- shared stages (also the launcher's prepare jobs)


def evaluate_before(
    cfg: Mapping[str, Any],
    lm: LoadedModel,
    template: str,
    splits: Any,
    sets: Mapping[str, dict[str, torch.Tensor]],
    cal_entry: Path,
    root: Path,
) -> tuple[Suite, dict[str, Any], bool, Path]:
    """The unpruned model's evaluation, cached like scores (the same for every rule and sparsity).

    Returns the suite (which evaluates the pruned model after), the evaluation, whether this call computed
    it, and its file.
    """
    held = HeldOut(splits.harmful_eval, splits.benign_eval, {k: sets[k] for k in ("eval_harmful", "eval_benign")})
    suite = Suite(cfg, lm, template, held)
    before_info = {"version": VERSIONS["eval"], "calibration": cal_entry.name, "eval": cfg["eval"],
                   "judges": cfg["judges"], "seed": cfg["seed"]}  # fmt: skip
    entry = root / "eval_before" / content_key(before_info)
    before, computed = cached(
        entry,
        lambda e: _evaluate(suite, "before", e / "eval_before.json", before_info),
        lambda e: _read_json(e / "eval_before.json"),
        "eval_before.json",
    )
    return suite, before, computed, entry / "eval_before.json"


def prepare(cfg: Mapping[str, Any], spec: PruneSpec, rid: str, run_dir: Path) -> dict[str, Any]:
    """``stage=prepare``: a group's shared artifacts, made once before its runs start (harmsweep/launcher.py).

    Calibration, every score set in ``prepare_scores`` (``kind`` or ``kind@granularity@benign_importance``:
    compact score sets are keyed by the ranking and unit their readers use; null: what ``spec`` needs) and
    the unpruned evaluation, into the shared artifact cache; nothing is pruned. ``run_dir/prepare.json``,
    written last, lists what was made, so a relaunch needs no second prepare job.
    """
    from dataclasses import replace

    torch.manual_seed(int(cfg["seed"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "FAILED").unlink(missing_ok=True)
    wanted = cfg.get("prepare_scores")
    entries = sorted(set(wanted)) if wanted is not None else sorted(spec.needed_scores())
    timings: dict[str, float] = {}
    computed: dict[str, bool] = {}
    lm, template, splits, root, sets, cal_entry = _calibrated(cfg, run_dir, timings, computed)
    artifacts = {"calibration": str(cal_entry / "calibration.safetensors")}
    for entry in entries:
        kind, *layout = entry.split("@")
        variant = spec
        if layout:  # the ranking and unit of the run that reads it; nothing else of the spec keys a score set
            importance = layout[1] if len(layout) > 1 else spec.benign_importance
            variant = replace(spec, granularity=layout[0], benign_importance=importance)
        start = time.perf_counter()
        _, path, computed[f"scores_{entry}"] = score(lm, cfg, sets, kind, root, variant)
        timings[f"score_{entry}"] = time.perf_counter() - start
        artifacts[f"scores_{entry}"] = str(path)
    start = time.perf_counter()
    _, _, computed["eval_before"], before_path = evaluate_before(cfg, lm, template, splits, sets, cal_entry, root)
    timings["evaluate_before"] = time.perf_counter() - start
    artifacts["eval_before"] = str(before_path)
    for name, made in computed.items():
        log.info("%s %s: %s", "computed" if made else "reusing", name, artifacts[name])
    result = {
        "run_id": rid,
        "experiment": "prepare",
        "stage": "prepare",
        "model": cfg["model"]["name"],
        "alignment": cfg["alignment"]["name"],
        "prepared_scores": entries,
        "computed": computed,
        "artifacts": artifacts,
        "metrics": {f"seconds_{k}": round(v, 3) for k, v in timings.items()},
        "figures": {},  # cli.summary prints it like an experiment's result: its timings
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    write_json(result, run_dir / "prepare.json")
    return result


def _log_reused(result: Mapping[str, Any]) -> None:
    """One line per shared artifact the run took from the cache (made by a prepare job or an earlier run)."""
    paths = result.get("artifacts") or {}
    for name, made in (result.get("computed") or {}).items():
        if not made:
            log.info("reusing %s: %s", name, paths.get(name, "(cached)"))
