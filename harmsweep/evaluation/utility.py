"""Utility after pruning: perplexity on plain text and lm-eval benchmarks on the in-memory model.

Pruning harmful weights is only useful if general ability survives; these two measurements are the
"what did it cost" side of every sweep point.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from harmsweep.batches import padded
from harmsweep.devices import input_device
from harmsweep.errors import DataError, HarmsweepError
from harmsweep.losses import DEFAULT_LOGITS_CHUNK, IGNORE, nll_sums

DEFAULT_TASKS_DIR = Path(__file__).resolve().parents[2] / "conf" / "lm_eval_tasks"
WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")  # the authors' perplexity corpus: id, config, split
WIKITEXT_TOKENS = 290_000  # WikiText-2 raw test in Llama-3-style tokens, for planning when the file is not local
CHARS_PER_TOKEN = 4.4  # WikiText-2 raw test: ~1.29M characters over ~290k tokens (planning only)


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int,
    max_length: int,
    logits_chunk: int = DEFAULT_LOGITS_CHUNK,
) -> dict[str, float]:
    """Token-weighted perplexity exp(sum NLL / predicted tokens) over all texts."""
    per_text = text_nlls(model, tokenizer, texts, batch_size, max_length, logits_chunk=logits_chunk)
    per_text = [t for t in per_text if t is not None]
    total, count = math.fsum(t[0] for t in per_text), sum(t[1] for t in per_text)
    mean = total / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": float(count)}


def text_nlls(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int,
    max_length: int,
    logits_chunk: int = DEFAULT_LOGITS_CHUNK,
) -> list[tuple[float, int] | None]:
    """Per text: (summed NLL, predicted tokens), None for a text too short to predict anything.

    Each text is tokenised on its own (with BOS when the tokenizer adds one) so batching never
    changes what a token is conditioned on; padding is right-side and never counted (it gets no
    logits). The per-text sums are perplexity's bootstrap items, summed in fp64. At most
    ``logits_chunk`` positions' fp32 logits exist at once (``model.logits_chunk``).
    """
    rows = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_length] for t in texts]
    kept = [i for i, r in enumerate(rows) if len(r) >= 2]  # a single token predicts nothing
    if not kept:
        raise HarmsweepError("perplexity needs at least one text of two or more tokens")
    device = input_device(model)
    out: list[tuple[float, int] | None] = [None] * len(rows)
    with torch.no_grad():
        for start in range(0, len(kept), batch_size):
            chunk = kept[start : start + batch_size]
            ids, mask = padded([rows[i] for i in chunk], tokenizer.pad_token_id)
            labels = ids.masked_fill(mask == 0, IGNORE)  # on the host: padding is found there, never scored
            sums = nll_sums(model, ids.to(device), mask.to(device), labels, logits_chunk=logits_chunk,
                            dtype=torch.float64).tolist()  # fmt: skip
            for j, i in enumerate(chunk):
                out[i] = (float(sums[j]), len(rows[i]) - 1)
    return out


def wikitext_rows(file: str | Path | None, download: bool) -> list[str]:
    """The corpus rows: a local .txt such as wiki.test.raw (its lines with their newline, blank ones empty, as the
    hub builds its rows) or a table's ``text`` column;
    without a file the hub's WikiText-2 raw test, only with ``data.download=true`` or a filled offline cache."""
    from harmsweep.data.files import quiet_datasets, read_file, read_text  # imports datasets: only when asked

    if file is not None:
        path = Path(file).expanduser()
        if not path.is_file():
            raise DataError(f"{path}: eval.perplexity.file not found")
        if path.suffix.lower() == ".txt":
            return [r if r.strip() else "" for r in read_text(path).splitlines(keepends=True)]  # as the hub's rows
        return [str(t or "") for t in read_file(path, required=["text"])["text"]]
    import datasets

    from harmsweep.data.hub import offline

    repo, config, split = WIKITEXT
    if not (download or offline()):
        raise DataError(
            f"{repo} ({config}) is not local: set eval.perplexity.file=PATH (wiki.test.raw) or data.download=true"
        )
    try:
        with quiet_datasets():
            return list(datasets.load_dataset(repo, config, split=split)["text"])
    except Exception as exc:  # offline and not cached, HTTP, auth: one line either way
        reason = (str(exc).splitlines() or [""])[0]
        raise DataError(
            f"{repo} ({config}): could not load ({type(exc).__name__}: {reason}); set eval.perplexity.file=PATH"
        ) from exc


def corpus_windows(tokenizer: PreTrainedTokenizerBase, rows: Sequence[str], chunk: int) -> list[list[int]]:
    """The authors' windows: rows joined by a blank line, tokenised once with special tokens (one BOS, at the very
    start), cut into non-overlapping ``chunk``-token windows; the remainder is dropped."""
    if int(chunk) < 2:
        raise HarmsweepError(f"eval.perplexity.chunk={chunk} must be at least 2 (a window predicts chunk-1 tokens)")
    ids = tokenizer("\n\n".join(rows), add_special_tokens=True)["input_ids"]
    n = len(ids) // int(chunk)
    if n == 0:
        raise HarmsweepError(
            f"eval.perplexity.chunk={chunk} is longer than the whole corpus ({len(ids)} tokens): lower it"
        )
    return [ids[i * chunk : (i + 1) * chunk] for i in range(n)]


def window_nlls(
    model: PreTrainedModel, windows: Sequence[Sequence[int]], logits_chunk: int = DEFAULT_LOGITS_CHUNK
) -> list[tuple[float, int]]:
    """Per window (batch 1, no padding): (summed NLL of every position after the first, chunk-1), summed in fp64;
    the windows are perplexity's bootstrap items. At most ``logits_chunk`` positions' fp32 logits exist at once."""
    device = input_device(model)
    out = []
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([list(window)])
            total = nll_sums(model, ids.to(device), None, ids, logits_chunk=logits_chunk, dtype=torch.float64)
            out.append((float(total[0]), len(window) - 1))
    return out


def lm_eval_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    *,
    limit: int | None,
    batch_size: int | str,
    num_fewshot: int | None = 0,
    include_path: str | Path | None = None,
    seed: int = 0,
    apply_chat_template: bool = False,
    stderr: bool = False,
) -> dict[str, float]:
    """lm-eval scores (``num_fewshot`` None: each task's standard setting; batch_size "auto" probes memory) of the in-memory model as flat ``lm_eval/<task>/<metric>`` floats.

    ``apply_chat_template``: every request is rendered as a user turn with the tokenizer's chat template (the
    authors' setting for chat models); few-shot examples then become earlier turns (``fewshot_as_multiturn``, lm-eval's
    CLI default with a template), a no-op at 0 shots. ``stderr``: keep ``<metric>_stderr`` too (for lm_eval_mean).
    Local tasks may name their data files relative to their YAML (see conf/lm_eval_tasks); those
    paths are made absolute here because ``datasets`` resolves them against the current directory.
    Global RNG states are restored afterwards so evaluation does not shift later random baselines.
    """
    if apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise HarmsweepError(
            "eval.lm_eval.chat_template=true but the tokenizer has no chat template: use false or auto for base models"
        )
    import lm_eval  # slow import: only when lm-eval is actually asked for
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = _task_manager(TaskManager, tasks, str(include_path or DEFAULT_TASKS_DIR))
    specs = [_task_spec(manager, name) for name in tasks]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with _restored_rng():
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=specs,
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            task_manager=manager,
            apply_chat_template=bool(apply_chat_template),
            fewshot_as_multiturn=bool(apply_chat_template),
        )
    if out is None:
        raise HarmsweepError("lm-eval returned no results (is this a non-zero distributed rank?)")
    return flatten_results(out["results"], stderr=stderr)


def lm_eval_choice(
    chat_template_setting: Any, template: str, num_fewshot: int | None, num_fewshot_base: int | None
) -> tuple[bool, int | None]:
    """(apply_chat_template, shots) for this run: eval.lm_eval.chat_template true | false | auto (auto: with the
    template when the run's prompts use one, "chat"); base models ("plain") take ``num_fewshot_base`` when set (the
    authors: chat models 0-shot with the template, base models 3-shot without)."""
    setting = str(chat_template_setting).lower()
    if setting not in ("true", "false", "auto"):
        raise HarmsweepError(f"eval.lm_eval.chat_template={chat_template_setting} is not one of true, false, auto")
    apply = template == "chat" if setting == "auto" else setting == "true"
    shots = num_fewshot_base if template == "plain" and num_fewshot_base is not None else num_fewshot
    return apply, shots


def lm_eval_mean(flat: Mapping[str, float], tasks: Sequence[str], metric: str = "acc") -> dict[str, float]:
    """The authors' summary: the plain mean of ``metric`` over the tasks, and the pooled stderr sqrt(sum se^2) / k.

    Needs ``lm_eval_tasks(..., stderr=True)``. Empty when a task lacks the metric (a mean over only some tasks would
    not be the same number); the stderr is NaN when a task has no stderr (lm-eval's "N/A").
    ``metric`` names a filter as flatten_results does ("exact_match/strict-match").
    """
    if not tasks:
        raise HarmsweepError("lm_eval_mean needs at least one task")
    name, _, filt = metric.partition("/")
    stderr_name = f"{name}_stderr" + (f"/{filt}" if filt else "")
    values = [flat.get(f"lm_eval/{task}/{metric}") for task in tasks]
    if any(v is None for v in values):
        return {}
    errors = [flat.get(f"lm_eval/{task}/{stderr_name}") for task in tasks]
    k = len(tasks)
    pooled = math.nan if any(e is None for e in errors) else math.sqrt(math.fsum(e * e for e in errors)) / k
    return {f"lm_eval/mean/{metric}": math.fsum(values) / k, f"lm_eval/mean/{stderr_name}": pooled}


def flatten_results(results: Mapping[str, Mapping[str, Any]], stderr: bool = False) -> dict[str, float]:
    """``{"task": {"acc,none": x}}`` -> ``{"lm_eval/task/acc": x}``; non-numbers dropped, and stderrs unless asked
    (``acc_stderr,none`` -> ``lm_eval/task/acc_stderr``)."""
    flat: dict[str, float] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or (metric.endswith("_stderr") and not stderr) or isinstance(value, bool):
                continue
            if not isinstance(value, int | float):
                continue
            name = metric if filt == "none" else f"{metric}/{filt}"
            flat[f"lm_eval/{task}/{name}"] = float(value)
    return flat


def _task_manager(task_manager: Any, tasks: Sequence[str], include_path: str) -> Any:
    """lm-eval's task index: of the local folder alone when it holds every task asked for (0.01 s), else with lm-eval's
    own ~15,000 tasks (indexing them takes 10-30 s, every run)."""
    local = task_manager(include_path=include_path, include_defaults=False)
    if all(name in local.task_index for name in tasks):
        return local
    return task_manager(include_path=include_path)


def _task_spec(manager: Any, name: str) -> str | dict[str, Any]:
    """The task name, or its loaded config with data files rebased onto the YAML's folder."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `lm-eval ls tasks`"
        raise HarmsweepError(f"unknown lm-eval task {name!r}{hint}")
    if entry.yaml_path is None:
        return name
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if cfg.get("task") != name or "group" in cfg or not files:
        return name
    rebased = _rebase(files, Path(entry.yaml_path).parent)
    if rebased == files:
        return name
    cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": rebased}
    return cfg


def _rebase(files: Any, base: Path) -> Any:
    """Relative paths that exist next to the YAML become absolute; anything else is left alone."""
    if isinstance(files, Mapping):
        return {k: _rebase(v, base) for k, v in files.items()}
    if isinstance(files, list | tuple):
        return [_rebase(v, base) for v in files]
    if isinstance(files, str) and "://" not in files and not Path(files).is_absolute() and (base / files).exists():
        return str((base / files).resolve())
    return files


@contextlib.contextmanager
def _restored_rng() -> Iterator[None]:
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
