"""The ``harmsweep`` command: a Hydra app around pipeline.run.run_pipeline.

Hydra stays here: it composes conf/, this module turns the result into a plain dict, picks the experiment body, runs the
pipeline in the Hydra run folder and prints a short summary. User errors (HarmsweepError, an
unknown config group option) print one line and exit with status 2; nothing is left behind that
looks like a finished run. Torch and transformers (seconds to import) are imported only when a run computes:
``--help``, ``--cfg``, a bad override and a relaunched finished run (``finished``: its result.json) never import them.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harmsweep.config.compose import (
    CONF_DIR,
    check_composition,
    check_group_overrides,
    check_run_folder,
    sweep_dir,
    with_own_model,
)
from harmsweep.report.console import summary
from harmsweep.sweep import manifest
from harmsweep.sweep.outcome import RAN, outcome_lines

log = logging.getLogger("harmsweep.cli")  # also when run as __main__


class Terminated(KeyboardInterrupt):
    """SIGTERM (scancel, a node's shutdown), handled like Ctrl-C: a mark in the run folder and one line."""

    signum = signal.SIGTERM


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _interrupted(run_dir: Path | None, signum: int) -> None:
    """One line naming the stage reached and how to resume, ``INTERRUPTED`` (stage, signal, time) in the run
    folder, exit 128 + the signal (130 for SIGINT, 143 for SIGTERM). Finished stages stay: a relaunch resumes."""
    import time

    stage = sys.modules["harmsweep.pipeline.context"].STAGE[0] if "harmsweep.pipeline.context" in sys.modules else None
    name = signal.Signals(signum).name
    if run_dir is not None and run_dir.is_dir():
        from harmsweep.artifacts import write_json

        write_json(
            {"stage": stage, "signal": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, run_dir / "INTERRUPTED"
        )
    where = f" during {stage}" if stage else ""
    folder = f" ({run_dir})" if run_dir is not None else ""
    print(f"harmsweep: interrupted by {name}{where}{folder}; finished stages are kept: run the same command again "
          "to resume", file=sys.stderr, flush=True)  # fmt: skip
    sys.exit(128 + signum)


LAUNCH: dict[str, Path | None] = {"made": None}  # the run folder this single-run launch is about to create
LAUNCH_FILES = {".hydra", "run.json", "FAILED", "INTERRUPTED"}  # what a launch writes before any work (and *.log)


def _unmake(run_dir: Path) -> bool:
    """Remove the run folder this launch created when it holds nothing but the launch's own files (no stage ran)."""
    import shutil

    if LAUNCH["made"] is None or LAUNCH["made"].resolve() != run_dir.resolve() or not run_dir.is_dir():
        return False
    if any(p.name not in LAUNCH_FILES and p.suffix != ".log" for p in run_dir.iterdir()):
        return False
    shutil.rmtree(run_dir)
    return True


def _mark_failed(run_dir: Path, message: str) -> None:
    """A FAILED file with the error: SLURM reports COMPLETED for Python exceptions, this does not."""
    import traceback

    from harmsweep.artifacts import write_json

    write_json({"error": message, "traceback": traceback.format_exc()}, run_dir / "FAILED")


def _run_id_resolver(*, _root_: Any) -> str:
    """``${harmsweep_run_id:}``: the run id of the composed config, so run folders are named by it."""
    from omegaconf import OmegaConf

    from harmsweep.config.identity import run_id

    tree = OmegaConf.to_container(_root_, resolve=False)
    tree.pop("hydra", None)
    return run_id(OmegaConf.to_container(OmegaConf.create(tree), resolve=True))


def finished(plain: Mapping[str, Any], run_dir: Path) -> dict[str, Any] | None:
    """The stored result when ``run_dir`` holds this config's finished run, else None (the pipeline takes it).

    Read before the pipeline is imported (torch and transformers: seconds per start, per run of a relaunched local
    sweep). Only the case the pipeline would answer from result.json alone: the folder is this run's (run.json) and
    result.json, written last, exists. A folder holding another run, a half-done run or a prepare job falls
    through to run_pipeline, which refuses, finishes or runs it.
    """
    from harmsweep.config.identity import run_id, stored_run_id

    result_path = run_dir / "result.json"
    if (plain.get("stage") or "run") != "run" or not result_path.is_file():
        return None
    rid = run_id(plain)
    if stored_run_id(run_dir) != rid:
        return None
    (run_dir / "FAILED").unlink(missing_ok=True)  # as the pipeline does: a relaunch clears an earlier failure
    log.info("run %s is already done: %s", rid, result_path)
    return json.loads(result_path.read_text())


def _run(plain: dict[str, Any], run_dir: Path, sweep: str | None) -> dict[str, Any]:
    """The pipeline (or the experiment's body) on ``plain``: the only place the command line imports torch."""
    from harmsweep.experiments import runner
    from harmsweep.pipeline.run import run_pipeline

    logging.getLogger("transformers").setLevel(logging.ERROR)
    experiment = runner(plain.get("experiment"))
    body, check, shared = experiment if experiment else (None, None, None)
    return run_pipeline(plain, run_dir, sweep=sweep, body=body, check=check, shared=shared)


def _compose_faster() -> None:
    """Two of Hydra's repeated costs, cut without changing what it composes (a relaunched done sweep is mostly these).

    1. Hydra deep-copies its config repository for every composition and every config group ``--help`` lists
       (about 60), and the copy takes the process-wide ConfigStore with it (every schema: 30 ms a copy, 3 s of
       ``--help``). The copies share it: ConfigStore.load hands out copies, and fresh sources read the singleton.
    2. The sweeper composes every job of a batch to validate it, drops the configs, and the launcher composes each
       job again. The launcher takes the validated config instead (each once, at most VALIDATED_KEPT a batch);
       any other composition (a job's own process, a later launch) is done as before.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.config_store import ConfigStore
    from hydra.plugins.sweeper import Sweeper

    if "__deepcopy__" not in vars(ConfigStore):
        ConfigStore.__deepcopy__ = _itself  # type: ignore[attr-defined]
    if getattr(Sweeper.validate_batch_is_legal, "composes_once", False):
        return
    validated: dict[tuple[int, tuple[str, ...]], Any] = {}
    load = ConfigLoaderImpl.load_sweep_config

    def validate_batch_is_legal(self: Sweeper, batch: Sequence[Sequence[str]]) -> None:
        context = getattr(self, "hydra_context", None)
        loader = context.config_loader if context is not None else self.config_loader  # type: ignore[attr-defined]
        validated.clear()
        SWEEP["jobs"] += len(batch)
        _record_returns(self)
        for i, overrides in enumerate(batch):
            cfg = loader.load_sweep_config(master_config=self.config, sweep_overrides=list(overrides))
            if i < VALIDATED_KEPT:
                validated[(id(self.config), tuple(overrides))] = cfg

    def load_sweep_config(self: ConfigLoaderImpl, master_config: Any, sweep_overrides: list[str]) -> Any:
        cfg = validated.pop((id(master_config), tuple(sweep_overrides)), None)
        return cfg if cfg is not None else load(self, master_config, sweep_overrides)

    validate_batch_is_legal.composes_once = True  # type: ignore[attr-defined]
    Sweeper.validate_batch_is_legal = validate_batch_is_legal  # type: ignore[method-assign]
    ConfigLoaderImpl.load_sweep_config = load_sweep_config  # type: ignore[method-assign]


VALIDATED_KEPT = 64  # validated job configs kept for the launcher (each a full composed config)
SWEEP: dict[str, Any] = {"jobs": 0, "done": [], "returns": []}  # this multirun: its job count, its runs finished
# in this process, and every JobReturn its launcher gave (for the lines that end it)


def _record_returns(sweeper: Any) -> None:
    """The sweeper's launcher, wrapped once so that every JobReturn it gives lands in SWEEP["returns"]."""
    launcher = getattr(sweeper, "launcher", None)
    if launcher is None or getattr(launcher.launch, "records", False):
        return
    launch = launcher.launch

    def recording(job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        results = launch(job_overrides, initial_job_idx)
        SWEEP["returns"].extend(results)
        return results

    recording.records = True  # type: ignore[attr-defined]
    launcher.launch = recording


def _manifest_key(argv: Sequence[str]) -> str | None:
    """The key of a multirun's manifest (harmsweep/sweep/manifest.py); None where the command line is not one that
    the config tree and its overrides alone decide (another config folder or search path, --cfg, --help, ...)."""
    if not {"-m", "--multirun"} & set(argv) or any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return None
    overrides = [a for a in argv if not a.startswith("-")]
    if any(o.lstrip("+~").startswith("hydra.searchpath") for o in overrides):
        return None
    return manifest.key(overrides, CONF_DIR)


def _finished_sweep(argv: Sequence[str]) -> bool:
    """A relaunch of a multirun whose every run is done and unchanged: print each run as a relaunch would, then stop."""
    digest = _manifest_key(argv)
    folder = sweep_dir([a for a in argv if not a.startswith("-")]) if digest else None
    runs = manifest.finished_runs(folder, digest) if folder and digest else None
    if runs is None:
        return False
    for run_dir, result in runs:
        print(summary(result))
        print(f"  results in {run_dir}")
    print(f"sweep {folder}: all {len(runs)} runs are done and unchanged ({manifest.path(folder, digest).name})")
    print(f"  compare them: harmsweep-report {folder}")
    return True


def _record_finished_sweep(argv: Sequence[str]) -> None:
    """After a multirun whose every job ran and finished in this process: its manifest, for the next relaunch."""
    done, digest = SWEEP["done"], _manifest_key(argv)
    folders = {run_dir.parent for run_dir, _ in done}
    if digest and done and len(done) == SWEEP["jobs"] and len(folders) == 1:
        manifest.write(folders.pop(), digest, done)


def _itself(obj: Any, memo: dict[int, Any]) -> Any:
    return obj


def main() -> None:
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # not under submitit, whose own handlers requeue a job
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _main()
    except KeyboardInterrupt as exc:  # outside a run (composing, between a sweep's jobs): the same one line
        _interrupted(None, getattr(exc, "signum", signal.SIGINT))


def _main() -> None:
    sys.argv[1:] = with_own_model(sys.argv[1:])  # model.path alone: a model of its own (before Hydra reads argv)
    if sys.argv[1:2] in (["mask-from-checkpoint"], ["compare-masks"]):  # mask tools: no Hydra, no model
        from harmsweep.masks.cli import main as masks_main

        masks_main(sys.argv[1:])
        return
    _compose_faster()
    if sys.argv[1:2] == ["plan"]:  # harmsweep plan [-m] <overrides>: a dry run that sizes every job
        from omegaconf import OmegaConf

        from harmsweep.config.schema import register
        from harmsweep.sweep.plan import main as plan_main

        check_group_overrides([a for a in sys.argv[2:] if not a.startswith("-")])  # plan has flags of its own
        OmegaConf.register_new_resolver("harmsweep_run_id", _run_id_resolver, replace=True)
        register()
        plan_main(sys.argv[2:])
        return
    check_group_overrides(sys.argv[1:])
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from harmsweep.config.schema import register

    OmegaConf.register_new_resolver("harmsweep_run_id", _run_id_resolver, replace=True)
    register()
    if _finished_sweep(sys.argv[1:]):
        return
    composed = check_composition(sys.argv[1:])
    multirun = bool({"-m", "--multirun"} & set(sys.argv[1:]))
    if composed is not None and not multirun and "--cfg" not in sys.argv and "-c" not in sys.argv:
        folder = check_run_folder(composed)  # before Hydra writes its .hydra/ files into it
        LAUNCH["made"] = folder if folder is not None and not folder.exists() else None

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def app(cfg: DictConfig) -> str:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from omegaconf.errors import OmegaConfBaseException

        from harmsweep.errors import HarmsweepError, exit_usage

        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        sweep = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None
        try:
            plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
            result, state = finished(plain, run_dir), "done"
            if result is None:
                result, state = _run(plain, run_dir, sweep), RAN
            (run_dir / "INTERRUPTED").unlink(missing_ok=True)  # resumed to the end (or found done)
        except (HarmsweepError, OmegaConfBaseException) as exc:
            message = str(exc).splitlines()[0]
            if sweep is None and _unmake(run_dir):  # refused before any work: the folder this launch made goes
                exit_usage(message)
            _mark_failed(run_dir, message)
            if sweep is not None:
                raise  # the sweep (local or SLURM) must end non-zero and name the failing job
            exit_usage(message)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (_on_sigterm)
            _interrupted(run_dir, getattr(exc, "signum", signal.SIGINT))
        except BaseException as exc:
            _mark_failed(run_dir, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            raise
        print(summary(result))
        print(f"  results in {run_dir}")
        if sweep is not None:
            SWEEP["done"].append((run_dir, result["run_id"]))
        return state

    try:
        app()
    finally:  # also when a job failed and Hydra exits non-zero: what ran, what failed, where
        lines = outcome_lines(SWEEP["returns"])
        if lines:
            print("\n".join(lines), flush=True)
    _record_finished_sweep(sys.argv[1:])


if __name__ == "__main__":
    main()
