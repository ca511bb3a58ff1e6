"""Composition at the command line: the conf/ folder, and checks that make a bad override fail in one line.

Hydra would reject an unknown group option, a typo'd key or a wrong type too, but over several lines and, in a
multirun, only when the job with the bad value starts. These checks compose every value first. No torch here:
the command line and the sweep side import this module on every start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from harmsweep.errors import exit_usage as _fail

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def with_own_model(argv: list[str]) -> list[str]:
    """The command line as harmsweep reads it: ``model.path=P`` without a ``model=`` preset is a model of its own
    (conf/model/own.yaml: named after P, in P's dtype, no variants but those given), and a variant can be added
    without Hydra's ``+`` (``model.variants.base.path=DIR``). A sweep over several paths keeps its overrides."""
    out = [f"++{a}" if a.startswith("model.variants.") else a for a in argv]
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("model.path=")]
    if not paths or "," in paths[-1] or not paths[-1] or any(a.lstrip("+~").startswith("model=") for a in argv):
        return out
    given = {a.split("=", 1)[0] for a in argv}
    extra = ["model=own"]
    if "model.name" not in given:
        extra.append(f"model.name={own_name(paths[-1])}")
    if "model.dtype" not in given:
        extra.append(f"model.dtype={own_dtype(paths[-1])}")
    at = max(i for i, a in enumerate(out) if a.startswith("model.path=")) + 1  # among the overrides, not after a flag
    return [*out[:at], *extra, *out[at:]]


def own_name(path: str) -> str:
    """A local folder's name, a GGUF file's stem, a hub id's last part; letters, digits, . _ - only."""
    import re

    local = Path(os.path.expanduser(path))
    name = local.stem if local.suffix == ".gguf" else (local.name or path.rstrip("/").split("/")[-1])
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "own"


def own_dtype(path: str) -> str:
    """The checkpoint's torch_dtype from its config.json (a local folder, or a hub id already in the local cache:
    read without the network); float32 for a GGUF (dequantised) or when it cannot be told."""
    import json

    local = Path(os.path.expanduser(path))
    config: Path | None = local / "config.json" if local.is_dir() else None
    if config is None and not local.suffix and path.count("/") == 1 and not path.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(path, "config.json")
            config = Path(found) if isinstance(found, str) else None
        except Exception:
            config = None
    try:
        data = json.loads(config.read_text()) if config is not None and config.is_file() else {}
    except (OSError, ValueError):
        data = {}
    dtype = data.get("torch_dtype") or data.get("dtype") if isinstance(data, dict) else None
    return str(dtype) if dtype in ("float32", "float16", "bfloat16") else "float32"


def check_group_overrides(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject `group=option` overrides naming an option that does not exist, in one line.

    Hydra would say so too, but over several lines with a hint about HYDRA_FULL_ERROR.
    """
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    for arg in argv:
        if arg.startswith("-") and arg.split("=")[0] not in HYDRA_FLAGS:
            _fail(f"unknown option {arg} (harmsweep --help lists the commands, options and config groups)")
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in groups:
            continue
        options = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
        for option in value.split(","):  # multirun lists
            if option and option not in options:
                _fail(f"unknown {key} '{option}' (available: {', '.join(options)})")


HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--resolve", "--package", "-p", "--run",
               "-r", "--multirun", "-m", "--shell-completion", "-sc", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun", "--info", "-i")  # fmt: skip
INFO_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--info", "-i", "--shell-completion", "-sc")


def check_composition(argv: list[str], conf_dir: Path = CONF_DIR) -> Any:
    """Compose every value of every override once, so a typo'd key or a wrong type fails in one line.

    Needs the run-id resolver and the schema registered (main does both).
    The schema (harmsweep/config/schema.py) makes Hydra reject them too, but over several lines and, in a
    multirun, only when the job with the bad value starts.
    """
    if any(a.split("=")[0] in INFO_FLAGS for a in argv):
        return None
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    args = _overrides(argv)
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(args)
    except Exception as exc:
        bad = next((a for a in args if not _parses(parser, a)), None)
        _fail(f"cannot read the override '{bad}': {_one_line(exc)}" if bad else _one_line(exc))
    base = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else a
            for o, a in zip(parsed, args, strict=True)]  # fmt: skip
    variants = [base] + [
        [*base[:i], f"{o.get_key_element()}={value}", *base[i + 1 :]]
        for i, o in enumerate(parsed) if o.is_sweep_override() for value in list(o.sweep_string_iterator())[1:]
    ]  # fmt: skip
    composed = []
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        for overrides in variants:
            try:
                cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
                # a bad interpolation (capabilities.prune=typo) fails here, not in a traceback from the run folder name
                OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
            except Exception as exc:
                _fail(_one_line(exc))
            composed.append(cfg)
    return composed[0]


def check_run_folder(cfg: Any) -> Path | None:
    """The folder a single run of ``cfg`` writes (hydra.run.dir), checked before Hydra writes anything into it:
    refused in one line when it holds another run, is a sweep's folder, or lies in a sweep it does not belong to
    (a sweep names its run folders by run id). None where the folder cannot be told yet."""
    from omegaconf import OmegaConf

    from harmsweep.config.identity import another_run, run_id, stored_run_id

    try:
        run_dir = Path(str(cfg.hydra.run.dir))
        rid = run_id(OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True))
    except Exception:
        return None
    stored = stored_run_id(run_dir)
    if stored is not None and stored != rid:
        _fail(another_run(run_dir, stored, rid))
    if (run_dir / "multirun.yaml").is_file():  # Hydra writes it into every sweep folder
        _fail(f"hydra.run.dir={run_dir} is a sweep's folder (multirun.yaml): a single run needs a folder of its own")
    if (run_dir.parent / "multirun.yaml").is_file() and run_dir.name != rid:
        _fail(
            f"hydra.run.dir={run_dir} lies in the sweep {run_dir.parent}, whose run folders are named by run id "
            f"({rid} for this config): use {run_dir.parent / rid} or a folder outside the sweep"
        )
    return run_dir


def sweep_dir(overrides: list[str], conf_dir: Path = CONF_DIR) -> Path | None:
    """The folder a multirun of these overrides writes to (hydra.sweep.dir, resolved), composed once without the
    swept values; None where it is not fixed (a ``${now:}`` name: every launch is a new sweep) or cannot be told.
    Needs the schema registered (main does)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        fixed = [a for o, a in zip(parsed, overrides, strict=True) if not o.is_sweep_override()]
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name="config", overrides=fixed, return_hydra_config=True)
        if "${now:" in str(cfg.hydra.sweep._get_node("dir")._value()):
            return None
        return Path(str(cfg.hydra.sweep.dir))
    except Exception:  # the usual path composes it again and says what is wrong
        return None


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


def _parses(parser: Any, override: str) -> bool:
    try:
        parser.parse_overrides([override])
    except Exception:
        return False
    return True


def _one_line(exc: BaseException) -> str:
    """Hydra's first line plus the first line of its cause (which names the key and the type)."""
    parts = [str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__]
    if exc.__cause__ is not None and str(exc.__cause__).strip():
        parts.append(str(exc.__cause__).strip().splitlines()[0])
    return ": ".join(p.rstrip(".") for p in parts)
