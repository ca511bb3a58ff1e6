"""``harmsweep plan [-m] <overrides>``: what each job of a run or sweep needs, before anything is submitted.

It composes the jobs exactly as ``harmsweep`` would (the experiment's sweep parameters and the command
line's), reads each model's config alone (a local ``config.json``, a GGUF header, a tiny spec, the preset's
``architecture`` block or the hub), sizes every job with harmsweep.plan, and counts shared artifacts once, in
sweep order, as the content-keyed cache does. It exits 2 with one line when a job cannot fit its GPU or the sweep
the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harmsweep.config.schema import Config
from harmsweep.errors import HarmsweepError, exit_usage
from harmsweep.evaluation.spec import JUDGES, metric_plan
from harmsweep.scoring.spec import StoreSpec
from harmsweep.sweep.attack_sizing import attack_finetunes, attack_load
from harmsweep.sweep.experiment_sizing import experiment_finetunes, experiment_stages, phase_totals, size_staged
from harmsweep.sweep.plan_table import advice, render

if TYPE_CHECKING:
    from harmsweep.sweep.sizing import Workload

ITEM_BYTES = 4096  # one evaluated item in eval_before.json / items.jsonl (prompt, answer, scores)
# calibration.max_length=null (the authors' recipe: no truncation) is sized as pairs of this many tokens: the
# longest of 1,000 Alpaca pairs is ~560 tokens, the longest in a batch of 8 ~470 at the 99th percentile
UNTRUNCATED_LENGTH = 512


def _args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="harmsweep plan", description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--multirun", action="store_true", help="plan the whole sweep")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU the jobs ask for (GiB)")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs per job (default: the launcher's, else 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the plan as JSON")
    parser.add_argument("--tflops", type=float, default=150.0, help="effective bf16 TFLOP/s of one GPU")
    parser.add_argument("--bandwidth-gbs", type=float, default=1500.0, help="GPU memory bandwidth (GB/s)")
    return parser.parse_known_args(argv)


def jobs(overrides: list[str], multirun: bool) -> list[tuple[list[str], dict[str, Any], dict[str, Any]]]:
    """(overrides, resolved config, hydra launcher config) of every job, in the sweep's order."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from harmsweep.config.compose import CONF_DIR

    parser = OverridesParser.create()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        first = compose(config_name="config", overrides=_first_values(parser, overrides), return_hydra_config=True)
        swept = {str(k): str(v) for k, v in (first.hydra.sweeper.params or {}).items()} if multirun else {}
        given = {o.split("=", 1)[0].lstrip("+~"): o for o in overrides}
        combined = [f"{k}={v}" for k, v in swept.items() if k not in given] + overrides
        parsed = parser.parse_overrides(combined)
        if not multirun and any(o.is_sweep_override() for o in parsed):
            raise HarmsweepError("a sweep override (a,b,...) needs -m: harmsweep plan -m ...")
        batches = BasicSweeper.split_arguments(parsed, None)[0] if multirun else [combined]
        out = []
        for job in batches:
            cfg = compose(config_name="config", overrides=list(job), return_hydra_config=True)
            launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
            tree = OmegaConf.to_container(cfg, resolve=False)
            tree.pop("hydra")
            out.append((list(job), OmegaConf.to_container(OmegaConf.create(tree), resolve=True), launcher))
    return out


def _first_values(parser: Any, overrides: list[str]) -> list[str]:
    return [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else a
            for o, a in zip(parser.parse_overrides(overrides), overrides, strict=True)]  # fmt: skip


def model_config(cfg: Config) -> Any:
    """The transformers config of the checkpoint a job loads: no weights are read (a split embedded GGUF is
    joined into the cache once, as its first run would). A local folder, GGUF or tiny spec is read; a hub
    checkpoint is sized from ``model.architecture`` when the preset has one, else from the hub."""
    from transformers import AutoConfig

    from harmsweep.models.checkpoints import checkpoint_spec, locate
    from harmsweep.models.loading import byte_tokenizer

    model, derive = cfg.model, cfg.alignment.derive
    variant = derive.parent if derive and not model.path else cfg.alignment.name
    spec, where = checkpoint_spec(model, variant)
    found = locate(spec, f"model={model.name}", where, Path(os.path.expanduser(cfg.paths.cache_dir)))
    if found.kind == "tiny":
        tiny = {k: v for k, v in dict(found.tiny or {}).items() if k != "seed"}
        tiny.setdefault("vocab_size", len(byte_tokenizer()))
        return AutoConfig.for_model(tiny.pop("model_type"), **tiny)
    if found.kind == "gguf":
        return AutoConfig.from_pretrained(found.path.parent, gguf_file=found.path.name)
    if found.kind == "dir":
        file = found.path / "config.json"
        if not file.is_file():
            raise HarmsweepError(f"{where}={found.path} has no config.json (plan needs only that file)")
        try:
            return AutoConfig.from_pretrained(found.path, trust_remote_code=model.trust_remote_code)
        except (ValueError, KeyError, OSError) as exc:
            raise HarmsweepError(
                f"{file} is not a model config ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            ) from None
    if model.architecture:  # the preset's copy of the hub checkpoint's config.json: no hub call, works offline
        arch = dict(model.architecture)
        return AutoConfig.for_model(str(arch.pop("model_type")), **arch)
    try:
        return AutoConfig.from_pretrained(found.hub_id, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError):
        raise HarmsweepError(
            f"the config of {found.hub_id} is not available offline; download its config.json into DIR and pass "
            "model.path=DIR (or give the preset an architecture: block)"
        ) from None


def _judge_config(cfg: Config) -> Any | None:
    from transformers import AutoConfig

    from harmsweep.sweep.sizing import GEMMA_2B

    if "strongreject_finetuned" not in metric_plan(cfg.eval, cfg.judges)[0]:
        return None
    path = Path(os.path.expanduser(str(cfg.judges["strongreject_finetuned"]["path"])))
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path)
    spec = dict(GEMMA_2B)  # a hub id or a LoRA adapter on gemma-2b
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def _workload(
    cfg: Config, new: Mapping[str, bool], gpus: int, held_out: int, shape: Any, gpu_gb: float, kinds: Sequence[str] = ()
) -> Workload:
    from harmsweep.devices import GIB
    from harmsweep.sweep.sizing import Workload

    cal, ev, p = cfg.calibration, cfg.eval, cfg.pruning
    cal_length = cal.max_length or UNTRUNCATED_LENGTH
    em_run = cfg.experiment == "orgad2026_em" and cfg.em is not None  # its stages measure (experiment_sizing)
    metrics = [] if em_run else metric_plan(ev, cfg.judges)[0]
    judged = [m for m in metrics if m in JUDGES]
    attack = ev.generation.attack
    per_stage = (1 if judged else 0) + (1 if "refusal" in metrics and (attack != "none" or not judged) else 0)
    stages = 1 + int(new["eval_before"])
    n_eval = 0 if em_run else held_out if ev.n is None else ev.n
    n_harm = min(cal.n, cfg.em.held_out) if em_run and cfg.em else cal.n  # stage 3: the EM model's answers
    forward_tokens, lengths, window = 0, [0], 0
    if "harm_likelihood" in metrics:
        forward_tokens += 2 * n_eval * cal_length
        lengths.append(cal_length)
    if "perplexity" in metrics and ev.perplexity.corpus == "wikitext":  # windows of `chunk` tokens, one at a time
        chunk = ev.perplexity.chunk
        forward_tokens += _wikitext_windows(ev.perplexity.file, chunk) * chunk
        window = chunk  # batch 1: its activations are chunk tokens', the other forwards' batch x length
    elif "perplexity" in metrics:
        forward_tokens += n_eval * ev.perplexity.max_length
        lengths.append(ev.perplexity.max_length)
    if "recognition" in metrics:
        forward_tokens += 2 * n_eval * 128  # a harmful and a benign question each
        lengths.append(128)
    if "lm_eval" in metrics:  # ~4 choices of ~256 tokens per request (whole tasks: ~1000 requests)
        forward_tokens += len(ev.lm_eval.tasks) * (ev.lm_eval.limit or 1000) * 4 * 256
        lengths.append(256)
    cal_gen = 0
    from_files = cal.btap_data or cal.harmful.responses == "file" or em_run  # harmful pairs read (EM: answers)
    if new["calibration"] and not from_files:
        cal_gen = (cal.n + n_eval) * cal.harmful.max_new_tokens
    one_each = cfg.scoring.accumulate == "bf16"  # the authors' bf16 sums: one example per pass

    def run(kind: str) -> tuple[int, bool]:
        n = n_harm if kind.startswith("harm") else (cal.n_benign or cal.n)
        return int(n), one_each or kind.endswith("_unsigned")

    judge = cfg.judges.get("strongreject_finetuned", {})
    spec = cfg.prune_spec()
    lowrank = cfg.method == "lowrank"
    kept = cfg.scores.resolved(*StoreSpec.needs(spec))
    k = round((p.harm_fraction if p.harm_fraction is not None else p.sparsity) * shape.n_scored)
    return Workload(
        score_sets=0 if (lowrank or p.sequential) else int(new["scores"]),
        unsigned=spec.harm_set() == "harm_unsigned",
        set_runs=tuple(run(kind.split("@")[0]) for kind in kinds),
        cal_n=n_harm,
        cal_batch=1 if cfg.scoring.accumulate == "bf16" else cal.batch_size,  # bf16: one example per pass
        cal_length=cal_length,
        cal_gen_tokens=cal_gen,
        eval_prompts=n_eval,
        eval_batch=ev.generation.batch_size,
        prompt_length=128,
        max_new_tokens=ev.generation.max_new_tokens,
        generations=per_stage * stages,
        judge_batch=int(judge.get("batch_size") or 8) if "strongreject_finetuned" in metrics else 0,
        judge_tokens=int(judge.get("max_response_tokens") or 512) + 400,  # the template is ~400 tokens
        checkpointing=cfg.scoring.gradient_checkpointing,
        gpus=gpus,
        eval_forward_tokens=forward_tokens * stages,
        criterion=cfg.scoring.criterion,
        sequential=p.sequential and not lowrank,
        sequential_kinds=len(spec.needed_scores()) if p.sequential and not lowrank else 0,
        method=cfg.method,
        rank_harmful=cfg.lowrank.rank_harmful,
        rank_utility=cfg.lowrank.rank_utility,
        masked=0 if lowrank else k,
        replace_base=p.replace == "base" and not lowrank,
        logits_chunk=cfg.model.logits_chunk,
        dense_scores=cfg.scores.store == "dense",
        kept_fraction=kept.keep + kept.keep_benign,
        forward_batch=1 if window > ev.batch_size * max(lengths) else ev.batch_size,
        forward_length=window if window > ev.batch_size * max(lengths) else max(lengths),
        backend=ev.generation.backend,
        gpu_bytes=gpu_gb * GIB,
        finetunes=experiment_finetunes(cfg) + attack_finetunes(cfg, stages),
        **attack_load(cfg, shape, stages, n_eval),
    )


def _wikitext_windows(file: str | None, chunk: int) -> int:
    """WikiText windows of ``chunk`` tokens: from the local file's characters, else WikiText-2 test's ~290k tokens."""
    from harmsweep.evaluation.utility import CHARS_PER_TOKEN, WIKITEXT_TOKENS, wikitext_rows

    tokens = WIKITEXT_TOKENS
    if file is not None:
        tokens = round(sum(len(r) + 2 for r in wikitext_rows(file, download=False)) / CHARS_PER_TOKEN)
    return max(1, tokens // chunk)


def _keys(cfg: Mapping[str, Any], typed: Config) -> dict[str, str]:
    """What the shared artifacts of a job are keyed by (the parts of the plain config that feed their keys)."""
    from harmsweep.scoring.store import Layout
    from harmsweep.sweep.jobs import needed_scores

    model = {k: v for k, v in cfg["model"].items() if k not in ("device_map", "max_memory")}
    base = json.dumps([model, cfg["alignment"], cfg["data"].get("harmful"), cfg["data"].get("benign"),
                       cfg["calibration"], cfg["seed"], cfg.get("em") if cfg.get("experiment") == "orgad2026_em"
                       else None], sort_keys=True, default=str)  # fmt: skip
    p = typed.pruning
    needed = {entry.split("@")[0] for entry in needed_scores(typed)}
    layout = {kind: Layout.read_by(typed.scores, kind, p.benign_importance, p.granularity).key() for kind in needed}
    return {
        "calibration": base + json.dumps(cfg["eval"]["n"]),
        "eval_before": base + json.dumps([cfg["eval"], cfg["judges"]], sort_keys=True, default=str),
        **{f"scores_{kind}": base + kind + json.dumps(layout[kind], sort_keys=True) for kind in needed},
    }


def _held_out(cfg: Config) -> int:
    """How many prompts eval.n=null evaluates: the exact split when the data is here, else AdvBench's 520 - n."""
    from harmsweep.calibration.sets import held_out_splits

    try:
        splits = held_out_splits(cfg.calibration, cfg.data, cfg.eval.n, cfg.seed, basename=cfg.btap_basename())
        return len(splits.harmful_eval)
    except (HarmsweepError, OSError, KeyError, TypeError):
        return 520 - cfg.calibration.n


def _free_bytes(path: str | None) -> int | None:
    if not path:
        return None
    folder = Path(os.path.expanduser(path))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def build(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The plan of every job and the sweep's totals; also the problems that make it fail."""
    from harmsweep.config.checks import check_config
    from harmsweep.config.schema import to_config
    from harmsweep.devices import GIB
    from harmsweep.models.memory import model_shape
    from harmsweep.scoring.store import stored_bytes
    from harmsweep.sweep.sizing import Throughput

    args, overrides = _args(argv)
    speed = Throughput(tflops=args.tflops, bandwidth_gbs=args.bandwidth_gbs)
    shapes: dict[str, Any] = {}
    configs: dict[str, Any] = {}  # one read of each checkpoint's config (a GGUF's takes seconds), not one per job
    seen: set[str] = set()
    made: dict[str, int] = {}  # experiment stages made once per sweep (the EM model): key -> the job that makes it
    rows, problems = [], []
    disk: dict[str, float] = {"calibration": 0.0, "scores": 0.0, "masks": 0.0, "evaluations": 0.0}
    artifacts_dir = None
    for job, plain, launcher in jobs(overrides, args.multirun):
        cfg = to_config(plain)
        spec = check_config(
            cfg, data_root=False
        )  # what a run would refuse, plan refuses too: one line, before any sizing
        gpus = args.gpus or (int(launcher.get("gpus_per_node") or 1) if "gpus_per_node" in launcher else 1)
        read = json.dumps([cfg.model, cfg.alignment.name, cfg.alignment.derive, cfg.paths.cache_dir], default=repr)
        if read not in configs:
            configs[read] = model_config(cfg)
        config = configs[read]
        key = json.dumps(config.to_dict(), sort_keys=True, default=str) + cfg.model.dtype
        if key not in shapes:
            shapes[key] = model_shape(config, cfg.model.dtype)
        shape = shapes[key]
        judge_cfg = _judge_config(cfg)
        judge = None
        if judge_cfg is not None:
            jkey = json.dumps(judge_cfg.to_dict(), sort_keys=True, default=str)
            if jkey not in shapes:
                shapes[jkey] = model_shape(judge_cfg, "bfloat16")
            judge = shapes[jkey]
        keys = _keys(plain, cfg)
        new = {name: k not in seen for name, k in keys.items()}
        new_sets = [name.removeprefix("scores_") for name, v in new.items() if v and name.startswith("scores_")]
        n_scores_new = len(new_sets)
        held_out = _held_out(cfg) if cfg.eval.n is None else 0
        work = _workload(cfg, {"calibration": new["calibration"], "eval_before": new["eval_before"],
                               "scores": n_scores_new}, gpus, held_out, shape, args.gpu_gb, new_sets)  # fmt: skip
        stages = experiment_stages(cfg, plain, made, len(rows), work.eval_prompts, 1 + int(new["eval_before"]))
        size = size_staged(shape, work, judge, speed, stages)
        stage_items = sum(s.prompts for s in stages if s.made_by is None)  # answers kept in items.jsonl
        seen |= set(keys.values())
        p = cfg.pruning
        k = round((p.harm_fraction if p.harm_fraction is not None else p.sparsity) * shape.n_scored)
        job_disk = {
            "calibration": (4 * (work.cal_n + work.eval_prompts) * work.cal_length * 3 * 8)
            if new["calibration"]
            else 0,
            "scores": sum(
                stored_bytes(cfg.scores.resolved(*StoreSpec.needs(spec)), kind, shape.n_scored) for kind in new_sets
            ),
            "masks": k * 8,
            "evaluations": (work.eval_prompts * (1 + int(new["eval_before"])) + stage_items) * ITEM_BYTES,
        }
        for name, value in job_disk.items():
            disk[name] += value
        artifacts_dir = artifacts_dir or cfg.paths.artifacts
        row = {"job": len(rows), "overrides": job, "gpus": gpus, **size.as_dict(), "disk": job_disk,
               "stages": [asdict(s) for s in stages]}  # fmt: skip
        rows.append(row)
        if size.peak > args.gpu_gb * GIB * 1.0:
            problems.append(
                f"job {row['job']} ({' '.join(job) or 'defaults'}) needs {size.peak / GIB:.1f} GiB per GPU in "
                f"{size.phase}, more than --gpu-gb {args.gpu_gb:g}: {advice(size.phase)}, or more GPUs "
                "(hardware=gpu_node)"
            )
    total_disk = sum(disk.values())
    free = _free_bytes(artifacts_dir)
    if free is not None and total_disk > free:
        problems.append(
            f"the sweep writes {total_disk / GIB:.1f} GiB but {artifacts_dir} has {free / GIB:.1f} GiB free"
        )
    plan = {
        "jobs": rows,
        "disk": {
            **disk,
            "total": total_disk,
            "free": free,
            "artifacts": artifacts_dir,
            "read": sum(r["disk_read"] for r in rows),
        },
        "gpu_hours": sum(r["gpu_hours"] for r in rows),
        "phases": phase_totals(rows),
        "assumptions": {"gpu_gb": args.gpu_gb, **speed.__dict__, "prompt_tokens": 128},
        "problems": problems,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(plan, indent=2, default=str))
    return plan, problems


def main(argv: list[str]) -> None:
    from harmsweep.config.compose import check_composition

    check_composition(_args(argv)[1])  # a typo'd key or a wrong type: one line, exit 2
    try:
        plan, problems = build(argv)
    except HarmsweepError as exc:
        exit_usage(str(exc), "harmsweep plan")
    print(render(plan))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        exit_usage(f"{problems[0]}{more}", "harmsweep plan")
