"""The ``harmsweep`` command: a Hydra app around run.run_pipeline.

Hydra stays here: it composes conf/, this module turns the result into a plain dict, runs the
pipeline in the Hydra run folder and prints a short summary. User errors (HarmsweepError, an
unknown config group option) print one line and exit with status 2; nothing is left behind that
looks like a finished run.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
EXIT_USAGE = 2


def _fail(message: str) -> None:
    print(f"harmsweep: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def check_group_overrides(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject `group=option` overrides naming an option that does not exist, in one line.

    Hydra would say so too, but over several lines with a hint about HYDRA_FULL_ERROR.
    """
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in groups:
            continue
        options = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
        for option in value.split(","):  # multirun lists
            if option and option not in options:
                _fail(f"unknown {key} '{option}' (available: {', '.join(options)})")


SUMMARY = (
    ("harmful NLL", "nll_harmful"),
    ("benign NLL", "nll_benign"),
    ("keyword ASR", "asr_keyword_mean"),
    ("refusal rate", "refusal_rate"),
    ("short answers", "short_answer_rate"),
    ("StrongREJECT", "strongreject_mean"),
    ("rubric score", "rubric_mean"),
    ("perplexity", "perplexity"),
    ("recognition", "recognition_accuracy"),
)


INFO_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--info", "-i", "--shell-completion", "-sc")


def check_composition(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Compose every value of every override once, so a typo'd key or a wrong type fails in one line.

    Needs the run-id resolver and the schema registered (main does both).
    The schema (harmsweep/config.py) makes Hydra reject them too, but over several lines and, in a
    multirun, only when the job with the bad value starts.
    """
    if any(a.split("=")[0] in INFO_FLAGS for a in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = _overrides(argv)
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception as exc:
        _fail(_one_line(exc))
    base = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else a
            for o, a in zip(parsed, args, strict=True)]  # fmt: skip
    variants = [base] + [
        [*base[:i], f"{o.get_key_element()}={value}", *base[i + 1 :]]
        for i, o in enumerate(parsed) if o.is_sweep_override() for value in list(o.sweep_string_iterator())[1:]
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        for overrides in variants:
            try:
                compose(config_name="config", overrides=overrides, return_hydra_config=True)
            except Exception as exc:
                _fail(_one_line(exc))


VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun")  # fmt: skip


def _overrides(argv: list[str]) -> list[str]:
    """The key=value overrides of a command line, without flags and the values flags take."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in VALUE_FLAGS
        else:
            out.append(arg)
    return out


def _one_line(exc: BaseException) -> str:
    """Hydra's first line plus the first line of its cause (which names the key and the type)."""
    parts = [str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__]
    if exc.__cause__ is not None and str(exc.__cause__).strip():
        parts.append(str(exc.__cause__).strip().splitlines()[0])
    return ": ".join(p.rstrip(".") for p in parts)


def summary(result: dict[str, Any]) -> str:
    """A few lines: what was pruned, and each headline metric before -> after."""
    m = result["metrics"]
    if result.get("figures") is not None:  # an experiment: its headline numbers and where its figures are
        lines = [
            f"run {result['run_id']}: experiment {result['experiment']} on {result['model']} ({result['alignment']})"
        ]
        lines += [f"  {k:<40}{v:10.4f}" for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)]
        lines += [f"  figure {name}: {path}" for name, path in result["figures"].items()]
        return "\n".join(lines)
    lines = [f"run {result['run_id']}: {result['model']} ({result['alignment']}), rule {result['pruning']['rule']}"]
    if result.get("lowrank"):
        low = result["lowrank"]
        lines.append(
            f"  removed a rank-{low['spec']['rank_harmful']} harmful subspace (utility rank {low['spec']['rank_utility']}) "
            f"from {len(low['per_matrix'])} matrices (mean |dW|/|W| {low['summary']['relative_norm_mean']:.3g})"
        )
    else:
        verb = "reverted to base" if result["pruning"].get("replace") == "base" else "pruned"
        lines.append(
            f"  {verb} {result['n_pruned']:,} of {result['n_scored']:,} scored weights "
            f"(actual sparsity {result['actual_sparsity']:.3g})"
        )
    ci = (result.get("intervals") or {}).get("metrics") or {}
    level = f"{(result.get('intervals') or {}).get('settings', {}).get('level', 0.95):.0%}"

    def bounds(key: str, digits: int = 3) -> str:
        lo, hi = (ci.get(key) or {}).get("lo"), (ci.get(key) or {}).get("hi")
        return f" {level} CI [{lo:+.{digits}f}, {hi:+.{digits}f}]" if lo is not None and hi is not None else ""

    for label, key in SUMMARY:
        before, after = m.get(f"{key}_before"), m.get(f"{key}_after")
        if isinstance(before, int | float) and isinstance(after, int | float):
            lines.append(f"  {label:<13}{before:8.3f} -> {after:8.3f} ({after - before:+.3f}){bounds(f'delta_{key}')}")
    if m.get("selectivity") is not None:
        lines.append(
            f"  selectivity  {m['selectivity']:8.2f}  (harmful NLL rise / benign NLL rise){bounds('selectivity', 2)}"
        )
    n = (ci.get("nll_harmful_after") or ci.get("refusal_rate_after") or {}).get("n")
    if ci and n:
        lines.append(f"  intervals: paired bootstrap over {n} held-out harmful prompts (result.json intervals)")
    lines += [f"  skipped {name}: {why}" for name, why in result.get("skipped_metrics", {}).items()]
    return "\n".join(lines)


def _mark_failed(run_dir: Path, message: str) -> None:
    """A FAILED file with the error: SLURM reports COMPLETED for Python exceptions, this does not."""
    import traceback

    from harmsweep.artifacts import write_json

    write_json({"error": message, "traceback": traceback.format_exc()}, run_dir / "FAILED")


def _run_id_resolver(*, _root_: Any) -> str:
    """``${harmsweep_run_id:}``: the run id of the composed config, so run folders are named by it."""
    from omegaconf import OmegaConf

    from harmsweep.config import run_id

    tree = OmegaConf.to_container(_root_, resolve=False)
    tree.pop("hydra", None)
    return run_id(OmegaConf.to_container(OmegaConf.create(tree), resolve=True))


def main() -> None:
    if sys.argv[1:2] == ["plan"]:  # harmsweep plan [-m] <overrides>: a dry run that sizes every job
        from omegaconf import OmegaConf

        from harmsweep.config import register
        from harmsweep.plan_cli import main as plan_main

        check_group_overrides(sys.argv[2:])
        OmegaConf.register_new_resolver("harmsweep_run_id", _run_id_resolver, replace=True)
        register()
        plan_main(sys.argv[2:])
        return
    check_group_overrides(sys.argv[1:])
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from harmsweep.config import register

    OmegaConf.register_new_resolver("harmsweep_run_id", _run_id_resolver, replace=True)
    register()
    check_composition(sys.argv[1:])

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def app(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from omegaconf.errors import OmegaConfBaseException

        from harmsweep.errors import HarmsweepError
        from harmsweep.run import run_pipeline

        logging.getLogger("transformers").setLevel(logging.ERROR)
        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        sweep = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None
        try:
            plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
            result = run_pipeline(plain, run_dir, sweep=sweep)
        except (HarmsweepError, OmegaConfBaseException) as exc:
            message = str(exc).splitlines()[0]
            _mark_failed(run_dir, message)
            if sweep is not None:
                raise  # the sweep (local or SLURM) must end non-zero and name the failing job
            _fail(message)
        except BaseException as exc:
            _mark_failed(run_dir, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            raise
        print(summary(result))
        print(f"  results in {run_dir}")

    app()


if __name__ == "__main__":
    main()
