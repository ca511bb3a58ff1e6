"""Optional Weights & Biases logging for one harmsweep run.

W&B is a side channel: a missing package, a bad key or a dead network must never cost a finished
pruning run. So every wandb call goes through `_guarded`, which turns any exception into one warning
line, and `name: none` (the default) gives a tracker that does nothing and imports nothing.

One W&B run per harmsweep run folder: named by the run id, with id = run id + a digest of the folder
(wandb_id) and resume="allow", so a requeued job continues its own W&B run, and the same config launched in
another folder (another sweep) gets a run of its own instead of mixing into the first one's dashboard:
  config   the resolved plain config (values under keys ending in api_key/token/secret/password redacted)
  summary  every numeric metric, n_pruned, n_scored, actual_sparsity, and the pruned counts as flat keys
           `pruned/layer_<i>` and `pruned/<module_type>`: summary keys (not a Table) become columns of
           the project's runs table, so a sweep can be compared and plotted layer by layer
  items    a Table of per-prompt scores; the prompt/response text only with log_generations=true
  figures  each experiment matrix/curve (transfer, overlap, EM arms, recovery) as a Table figures/<name>
  mask     mask.safetensors as an artifact of type "mask" with log_mask=true
  aliases  with aliases=orgad2026, the summary also carries the B-TAP authors' key names (ORGAD2026_ALIASES), so
           their dashboards and ours read the same runs
Offline runs land in <logger.dir, else $WANDB_DIR, else run_dir>/wandb/offline-run-<time>-<id>/ for a later
`wandb sync`; where the run went (its URL, or that folder and the sync command) is printed once when it starts.
Offline, each (re)start writes its own offline-run-* folder carrying the same run id.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from harmsweep.errors import HarmsweepError

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline")
DEFAULT_BASE_URL = "https://api.wandb.ai"
PROBE_TIMEOUT_S = 2.0  # "the network answers quickly": longer than this and we log offline instead
ITEM_COLUMNS = ("stage", "metric", "source_id", "category", "score")
TEXT_COLUMNS = ("prompt", "response")
SECRET_SUFFIXES = ("api_key", "token", "secret", "password")
PRUNING_COUNTS = ("per_layer", "per_module_type")
ALIAS_SETS = ("none", "orgad2026")  # logger.aliases
# Their W&B summary key -> our metric, always the pruned model's value (stage "after", named as the suite names it)
ORGAD2026_ALIASES = {
    "strongreject_mean_score": "strongreject_mean_after",
    "sparsity_ratio": "zero_fraction_after",
    "wikitest_ppl": "perplexity_after",  # their WikiText-2 perplexities: only from eval.perplexity.corpus=wikitext
    "wikitest_ppl_after_attack": "perplexity_attacked_after",
    "mean_accuracy_zero_shot": "lm_eval_after/mean/acc",
    "mean_accuracy_zero_shot_stderr": "lm_eval_after/mean/acc_stderr",
    "triviaqa_acc": "triviaqa_acc_after",
    "alpaca_judge_score": "alpaca_judge_mean_after",
    "mean_explanation_score": "explanation_mean_after",  # the dissociation capabilities (evaluation/capabilities.py)
    "explanation_mean_coherency": "explanation_coherence_mean_after",
    "safety_mean_coherency": "coherence_mean_after",
    "yes_rate_harmful": "detection_yes_rate_harmful_after",
    "no_rate_harmful": "detection_no_rate_harmful_after",
    "yes_rate_counterfact": "detection_yes_rate_counterfact_after",
    "no_rate_counterfact": "detection_no_rate_counterfact_after",
}
# their refusal_rate: keyword refusals of the judged (attacked) answers, a phrase or under 20 words: the complement
# of our keyword ASR on the same answers (with judges.refusal.phrases=orgad2026 the same rule)
REFUSAL_FROM = "asr_keyword_mean_after"


@dataclass
class LoggerConfig:
    """The ``logger`` block: none, or one W&B run per harmsweep run."""

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
    aliases: str = "none"  # none | orgad2026: the summary also under the B-TAP authors' key names

    def __post_init__(self) -> None:
        """An unknown alias set fails while the config is read, not as a W&B warning after the run."""
        if self.aliases not in ALIAS_SETS:
            raise HarmsweepError(f"logger.aliases={self.aliases} is not one of {', '.join(ALIAS_SETS)}")


class Tracker:
    """Does nothing: what `name: none` and a W&B run that failed to start give back."""

    def log_result(self, result: Mapping[str, Any], items: Sequence[Mapping[str, Any]], mask_path: Path | None) -> None:
        return None

    def finish(self, failed: bool = False) -> None:
        return None


class WandbTracker(Tracker):
    """Logs into one started W&B run; each step is guarded so one failure does not skip the rest."""

    def __init__(self, run: Any, wandb: Any, logger_cfg: LoggerConfig) -> None:
        self._run, self._wandb, self._cfg = run, wandb, logger_cfg

    def log_result(self, result: Mapping[str, Any], items: Sequence[Mapping[str, Any]], mask_path: Path | None) -> None:
        run = self._run
        if run is None:
            return
        _guarded("summary", lambda: run.summary.update(summary_of(result, self._cfg.aliases)))
        _guarded("items table", lambda: self._log_items(items))
        for name, path in (result.get("figures") or {}).items():
            _guarded(f"figure {name}", lambda name=name, path=path: self._log_figure(name, Path(path)))
        if self._cfg.log_mask:
            _guarded("mask artifact", lambda: self._log_mask(result, mask_path))

    def _log_items(self, items: Sequence[Mapping[str, Any]]) -> None:
        columns, rows = item_rows(items, with_text=self._cfg.log_generations)
        self._run.log({"items": self._wandb.Table(columns=columns, data=rows)})

    def _log_figure(self, name: str, path: Path) -> None:
        """An experiment's matrix or curve (rows x cols JSON) as a Table, one row per matrix row."""
        import json

        figure = json.loads(path.read_text())
        columns = ["row", *figure["cols"]]
        rows = [[row, *values] for row, values in zip(figure["rows"], figure["values"], strict=True)]
        self._run.log({f"figures/{name}": self._wandb.Table(columns=columns, data=rows)})

    def _log_mask(self, result: Mapping[str, Any], mask_path: Path | None) -> None:
        if mask_path is None or not Path(mask_path).is_file():
            log.warning("W&B: log_mask is on but there is no mask file (%s); not logged", mask_path)
            return
        spec = {k: v for k, v in result.get("pruning", {}).items() if k not in PRUNING_COUNTS}
        meta = {**spec, "n_pruned": result.get("n_pruned"), "n_scored": result.get("n_scored")}
        art = self._wandb.Artifact(f"mask-{self._run.name}", type="mask", metadata=meta)
        art.add_file(str(mask_path), name=Path(mask_path).name)
        self._run.log_artifact(art)

    def finish(self, failed: bool = False) -> None:
        """Close the run once (wandb.finish() does the same on the global run); later calls do nothing."""
        run, self._run = self._run, None
        if run is not None:
            _guarded("finish", lambda: run.finish(exit_code=1 if failed else 0))


def open_tracker(logger_cfg: LoggerConfig, *, run_id: str, run_dir: Path, config: Mapping[str, Any]) -> Tracker:
    """Start the W&B run described by conf/logger/<name>.yaml, or a no-op tracker; never raises.

    ``config``: the plain resolved config, W&B's run config.
    """
    name = logger_cfg.name or "none"
    if name == "none":
        return Tracker()
    if name != "wandb":
        log.warning("unknown logger %r (none | wandb): logging nothing", name)
        return Tracker()
    started = _guarded("init", lambda: _start(logger_cfg, run_id, Path(run_dir), config))
    return started or Tracker()


def _start(cfg: LoggerConfig, run_id: str, run_dir: Path, config: Mapping[str, Any]) -> WandbTracker:
    import wandb  # only here: `name: none` must work without the package

    plain = plain_config(config)
    # default: offline files sit with the run's own artifacts
    wb_dir = Path(cfg.dir or os.environ.get("WANDB_DIR") or run_dir)
    wb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.project or "harmsweep",
        entity=cfg.entity,
        id=wandb_id(run_id, run_dir),
        name=run_id,
        resume="allow",  # a requeued job continues the run instead of making a duplicate
        reinit="finish_previous",  # the default returns an unfinished earlier run of this process
        dir=str(wb_dir),
        mode=resolve_mode(cfg.mode or "auto"),
        group=cfg.group or "default",
        job_type=cfg.job_type or "run",
        tags=run_tags(plain, cfg.tags),
        config=plain,
        allow_val_change=True,  # a resumed run may differ in keys outside the run id (paths, logger)
        settings=wandb.Settings(silent=True, console="off"),  # no banners; do not copy stdout into W&B
    )
    print(where(run), flush=True)
    return WandbTracker(run, wandb, cfg)


def wandb_id(run_id: str, run_dir: Path) -> str:
    """The W&B id of the run in ``run_dir``: stable across requeues of that folder, another for another folder."""
    import hashlib

    return f"{run_id}-{hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]}"


def where(run: Any) -> str:
    """One line: the run's URL, or its offline folder and the command that uploads it."""
    url = getattr(run, "url", None)
    if url:
        return f"W&B: {url}"
    folder = getattr(getattr(run, "settings", None), "sync_dir", None) or getattr(run, "dir", "?")
    return f"W&B: offline run in {folder}; upload it with: wandb sync {folder}"


def resolve_mode(mode: str) -> str:
    """`auto`: WANDB_MODE if set, else online only with an API key and a server that answers quickly."""
    if mode not in MODES:
        raise ValueError(f"logger.mode={mode!r} is not one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "")
    if env in ("online", "offline", "disabled"):
        return env
    url = urlsplit(os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL)
    port = url.port or (443 if url.scheme == "https" else 80)
    return "online" if _has_api_key(url.netloc) and _answers(url.hostname or "", port) else "offline"


def _has_api_key(machine: str) -> bool:
    """Whether a key exists (env or netrc, as wandb looks); the key itself is never read out or kept."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        entry = netrc.netrc(os.environ.get("NETRC") or None).authenticators(machine)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def plain_config(value: Any, key: str = "") -> Any:
    """JSON-like copy of the config (works on DictConfig too, resolving on access), secrets redacted."""
    if isinstance(value, Mapping):
        return {str(k): plain_config(v, str(k)) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [plain_config(v) for v in value]
    if isinstance(value, str) and value and key.lower().endswith(SECRET_SUFFIXES):
        return "<redacted>"
    return value


def run_tags(config: Mapping[str, Any], extra: Sequence[str] | None) -> list[str]:
    """[model, alignment, pruning rule] + extra, deduplicated, so runs filter by what they pruned."""
    picked = [
        config.get("model", {}).get("name"),
        config.get("alignment", {}).get("name"),
        config.get("pruning", {}).get("rule"),
        *(extra or []),
    ]
    return list(dict.fromkeys(str(t)[:64] for t in picked if t))  # W&B caps a tag at 64 characters


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def summary_of(result: Mapping[str, Any], aliases: str = "none") -> dict[str, int | float]:
    """Numeric metrics, counts and interval bounds (``ci/<metric>/lo|hi``) as flat summary keys (None and text
    are left out); with ``aliases``, the same values again under that set's key names."""
    out = {k: v for k, v in result.get("metrics", {}).items() if _is_number(v)}
    out.update({k: result[k] for k in ("n_pruned", "n_scored", "actual_sparsity") if _is_number(result.get(k))})
    pruning = result.get("pruning", {})
    out.update({f"pruned/layer_{i}": n for i, n in pruning.get("per_layer", {}).items()})
    out.update({f"pruned/{t}": n for t, n in pruning.get("per_module_type", {}).items()})
    for key, figure in ((result.get("intervals") or {}).get("metrics") or {}).items():  # bounds for W&B error bars
        out.update({f"ci/{key}/{b}": figure[b] for b in ("lo", "hi") if _is_number(figure.get(b))})
    return {**out, **alias_keys(result, aliases)}


def alias_keys(result: Mapping[str, Any], aliases: str) -> dict[str, int | float]:
    """Their key -> the pruned model's value of our metric; a metric the run did not measure gives no key.

    ``wikitest_ppl`` (and ``_after_attack``) only when the run's perplexity is WikiText-2's
    (result["perplexity_corpus"]): our default held-out perplexity is another number and must not pass for theirs.
    """
    if aliases != "orgad2026":
        return {}
    metrics = result.get("metrics") or {}
    out = {}
    for theirs, ours in ORGAD2026_ALIASES.items():
        if ours.startswith("perplexity") and result.get("perplexity_corpus") != "wikitext":
            continue
        value = metrics.get(ours)
        if _is_number(value):
            out[theirs] = value
    if _is_number(metrics.get(REFUSAL_FROM)):
        out["refusal_rate"] = 1.0 - metrics[REFUSAL_FROM]
    return out


def item_rows(items: Sequence[Mapping[str, Any]], with_text: bool) -> tuple[list[str], list[list[Any]]]:
    """Per-prompt rows; recognition items carry no `score`, so their p_yes fills that column."""
    columns = [*ITEM_COLUMNS, *(TEXT_COLUMNS if with_text else ())]
    rows = [[it.get("score", it.get("p_yes")) if c == "score" else it.get(c) for c in columns] for it in items]
    return columns, rows


def _guarded(what: str, fn: Callable[[], Any]) -> Any:
    """Run one W&B step; any failure becomes one warning line (type and first line, no traceback)."""
    try:
        return fn()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        log.warning("W&B %s failed, the run goes on without it: %s: %s", what, type(exc).__name__, first)
        return None
