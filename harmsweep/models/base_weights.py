"""The base variant's values of the masked weights (``pruning.replace=base``, Wei et al.'s --recover_from_base).

A mask selects K entries per parameter, and only those K values of the base checkpoint are needed. Loading the
base as a second full model would double the memory of a run on a large model, so a folder of (possibly
sharded) safetensors is read tensor by tensor: only the tensors the mask touches, one at a time, and of each only
the rows that hold selected entries. Only a ``tiny`` base (a test model of a few hundred KB) is built in full.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from harmsweep.errors import HarmsweepError
from harmsweep.models.checkpoints import locate
from harmsweep.models.loading import _dtype, build_tiny, gguf_to_safetensors
from harmsweep.models.spec import ModelConfig

INDEX = "model.safetensors.index.json"


def base_values(
    model: ModelConfig,
    variant: str,
    cache_dir: str | Path,
    mask: Mapping[str, Tensor],
    like: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """Per masked parameter (non-empty index), the ``variant`` checkpoint's values at the mask's flat indices.

    Each result is 1-D, in the dtype and on the device of ``like[name]`` (the run's parameter), ready for
    ``masks.apply_mask(..., values=...)``. ``model.path`` is not consulted: it names the run's model, not its base.
    """
    spec = _variant_spec(model, variant)  # a config without the variant fails even when the mask is empty
    needed = {name: idx for name, idx in mask.items() if idx.numel()}
    if not needed:
        return {}
    where = f"model.variants.{variant}"
    if spec.get("tiny"):
        state = build_tiny(dict(spec["tiny"]), _dtype(model.dtype)).model.state_dict()
        return {n: _take(n, state[_key(n, state, "tiny " + where)], idx, like[n]) for n, idx in needed.items()}
    folder = checkpoint_folder(spec, f"model={model.name} {variant}", where, Path(cache_dir).expanduser())
    files = checkpoint_tensors(folder)
    by_file: dict[str, dict[str, str]] = {}  # shard file -> {param name: checkpoint key}
    for name in needed:
        key = _key(name, files, str(folder))
        by_file.setdefault(files[key], {})[name] = key
    out: dict[str, Tensor] = {}
    for file, keys in sorted(by_file.items()):
        with safe_open(str(folder / file), framework="pt", device="cpu") as f:
            for name, key in keys.items():
                out[name] = _read(f, key, needed[name], like[name], folder / file)
    return {name: out[name] for name in needed}


def _variant_spec(model: ModelConfig, variant: str) -> Mapping[str, Any]:
    variants = model.variants or {}
    if variant not in variants:
        hint = " (model.path names the pruned model only)" if model.path else ""
        raise HarmsweepError(
            f"model={model.name} has no {variant} checkpoint to take replaced weights from (it has: "
            f"{', '.join(sorted(variants)) or 'none'}); set model.variants.{variant}.path=DIR{hint} or pruning.replace=zero"
        )
    return variants[variant]


def checkpoint_folder(spec: Mapping[str, Any], what: str, where: str, cache_dir: Path) -> Path:
    """The local folder of safetensors the checkpoint of ``spec`` lives in (converted or downloaded once)."""
    found = locate(spec, what, where, cache_dir)
    if found.kind == "gguf":
        return gguf_to_safetensors(found.path, cache_dir)
    if found.kind == "dir":
        return found.path
    if found.kind == "tiny":
        raise HarmsweepError(f"{where} is a tiny random-init model: it has no checkpoint folder")
    try:
        return _download(str(found.hub_id), spec.get("revision"), where)
    except HarmsweepError:
        if found.not_installed is None:
            raise
        raise HarmsweepError(f"{found.not_installed} (and {found.hub_id} is not reachable on the hub)") from None


def _download(hub_id: str, revision: str | None, where: str) -> Path:
    """The hub snapshot's weights and configs only (no .bin, no tokenizer blobs beyond json)."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(hub_id, revision=revision, allow_patterns=["*.safetensors", "*.json"])
    except (OSError, ValueError) as exc:  # hub errors (offline, not found, HTTP) are OSErrors
        raise HarmsweepError(
            f"base checkpoint {hub_id} could not be fetched ({type(exc).__name__}): download it "
            f"(hf download {hub_id} --local-dir DIR) and set {where}.path=DIR"
        ) from None
    return Path(path)


def checkpoint_tensors(folder: str | Path) -> dict[str, str]:
    """Tensor name -> safetensors file (relative to ``folder``): the index's weight_map, else every file's keys.

    Reading the keys opens only each file's header, not its tensors.
    """
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        raise HarmsweepError(f"{folder} is a PEFT adapter: replace=base needs the full base model (merge it first)")
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise HarmsweepError(f"{index} is not a safetensors index ({type(exc).__name__})") from None
        return {str(k): str(v) for k, v in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in folder.glob("*.bin"))) or "no weight files"
        raise HarmsweepError(
            f"{folder} holds no safetensors ({found}): replace=base reads the base tensor by tensor from safetensors; "
            "convert it (save_pretrained(DIR, safe_serialization=True)) and point model.variants.<variant>.path at DIR"
        )
    out: dict[str, str] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            out.update(dict.fromkeys(f.keys(), file.name))
    return out


def _key(name: str, keys: Mapping[str, Any], where: str) -> str:
    """The checkpoint key of parameter ``name``: the same, or with a leading ``model.`` removed or added."""
    bare = name.removeprefix("model.")
    for key in (name, bare, f"model.{name}"):
        if key in keys:
            return key
    raise HarmsweepError(
        f"tensor {name} is not in the base checkpoint {where} ({len(keys)} tensors, e.g. "
        f"{', '.join(sorted(keys)[:3])}): is it the same architecture as the pruned model?"
    )


def _check_shape(name: str, shape: tuple[int, ...], like: Tensor, where: Any) -> None:
    if tuple(shape) != tuple(like.shape):
        raise HarmsweepError(
            f"tensor {name} of the base checkpoint {where} has shape {list(shape)}, the pruned model's "
            f"{list(like.shape)}: the base must be the same architecture"
        )


def _take(name: str, tensor: Tensor, idx: Tensor, like: Tensor) -> Tensor:
    """A state_dict tensor's values at ``idx``, cast and moved like ``like``."""
    _check_shape(name, tuple(tensor.shape), like, "(tiny)")
    return tensor.detach().reshape(-1)[idx.to(tensor.device)].to(like.device, like.dtype)


def _read(f: Any, key: str, idx: Tensor, like: Tensor, file: Path) -> Tensor:
    """Only the rows of ``key`` between the first and last selected entry: a mask confined to a few rows of a
    large embedding reads those, not the whole matrix."""
    part = f.get_slice(key)
    shape = tuple(part.get_shape())
    _check_shape(key, shape, like, file)
    idx = idx.to("cpu", torch.int64)
    if len(shape) < 2:
        values = (part[:] if shape else f.get_tensor(key)).reshape(-1)[idx]
    else:
        row = int(torch.tensor(shape[1:]).prod())
        first, last = int(idx.min()) // row, int(idx.max()) // row
        values = part[first : last + 1].reshape(-1)[idx - first * row]
    return values.to(like.device, like.dtype)
