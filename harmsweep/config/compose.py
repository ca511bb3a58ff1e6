"""Composition at the command line: the conf/ folder, and checks that make a bad override fail in one line.

Hydra would reject an unknown group option, a typo'd key or a wrong type too, but over several lines and, in a
multirun, only when the job with the bad value starts. These checks compose every value first. No torch here:
the command line and the sweep side import this module on every start.
"""

from __future__ import annotations

from pathlib import Path

from harmsweep.errors import exit_usage as _fail

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


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


INFO_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--info", "-i", "--shell-completion", "-sc")


def check_composition(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Compose every value of every override once, so a typo'd key or a wrong type fails in one line.

    Needs the run-id resolver and the schema registered (main does both).
    The schema (harmsweep/config/schema.py) makes Hydra reject them too, but over several lines and, in a
    multirun, only when the job with the bad value starts.
    """
    if any(a.split("=")[0] in INFO_FLAGS for a in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

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
                cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
                # a bad interpolation (capabilities.prune=typo) fails here, not in a traceback from the run folder name
                OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
            except Exception as exc:
                _fail(_one_line(exc))


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


def _one_line(exc: BaseException) -> str:
    """Hydra's first line plus the first line of its cause (which names the key and the type)."""
    parts = [str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__]
    if exc.__cause__ is not None and str(exc.__cause__).strip():
        parts.append(str(exc.__cause__).strip().splitlines()[0])
    return ": ".join(p.rstrip(".") for p in parts)
