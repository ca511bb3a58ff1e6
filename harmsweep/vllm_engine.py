"""vLLM generation: one engine per job, sized from free GPU memory, with the run's mask applied inside it.

The engine reads the model's own checkpoint (a local folder or a hub id), so pruned weights never
travel as a full-size copy; only a model without a checkpoint (random-init, changed in memory) is
written once to node-local scratch. The mask (K flat indices per HF weight) is applied in every
tensor-parallel worker to the engine's own parameters. vLLM fuses q/k/v into ``qkv_proj`` and
gate/up into ``gate_up_proj`` and shards them over ranks; rather than re-deriving that layout,
each HF matrix's keep-pattern (ones, zeros at masked entries) is put through the parameter's own
``weight_loader``, the code vLLM loads checkpoints with, into a ones-filled staging buffer. The zeros
that land there are the engine's masked positions. Their values are kept so the next mask (or
none) restores them first: the same engine serves the unpruned and the pruned model.
"""

from __future__ import annotations

import atexit
import functools
import gc
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harmsweep.devices import GIB
from harmsweep.errors import HarmsweepError

# vLLM's stacked_params_mapping for Llama-style models: HF suffix -> (fused suffix, shard id)
STACKED = {
    ".q_proj": (".qkv_proj", "q"),
    ".k_proj": (".qkv_proj", "k"),
    ".v_proj": (".qkv_proj", "v"),
    ".gate_proj": (".gate_up_proj", 0),
    ".up_proj": (".gate_up_proj", 1),
}
_SAVED = "_harmsweep_masked"  # per worker, on the engine's model: [(param name, flat positions, values)]


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is built with; a job reuses its engine while these match."""

    model: str  # checkpoint folder or hub id
    dtype: str
    tensor_parallel_size: int
    max_model_len: int
    gpu_memory_utilization: float
    seed: int = 0


def engine_spec(
    model: str,
    dtype: str,
    max_model_len: int,
    free_bytes: int,
    total_bytes: int,
    n_gpus: int,
    seed: int = 0,
    headroom_bytes: int = 2 * GIB,
) -> EngineSpec:
    """Size the engine from the memory that is free now (vLLM's fraction is of the card's total)."""
    usable = free_bytes - headroom_bytes
    if n_gpus < 1 or usable < 0.05 * total_bytes:
        raise HarmsweepError(
            f"vLLM needs GPU memory: {free_bytes / GIB:.1f} of {total_bytes / GIB:.1f} GiB free on {n_gpus} GPU(s); "
            "free the GPU or use eval.generation.backend=hf"
        )
    return EngineSpec(
        model=model,
        dtype=dtype,
        tensor_parallel_size=n_gpus,
        max_model_len=256 * math.ceil(max_model_len / 256),
        gpu_memory_utilization=round(min(0.95, usable / total_bytes), 3),
        seed=seed,
    )


def fused_layout(hf_name: str) -> tuple[str, str | int | None]:
    """The engine's parameter that holds an HF weight, and its shard id there (None: not fused)."""
    stem = hf_name.removesuffix(".weight")
    for suffix, (fused, shard) in STACKED.items():
        if stem.endswith(suffix):
            return stem.removesuffix(suffix) + fused + ".weight", shard
    return hf_name, None


def keep_matrix(shape: Sequence[int], flat_idx: torch.Tensor, dtype: torch.dtype, device: Any) -> torch.Tensor:
    keep = torch.ones(tuple(shape), dtype=dtype, device=device)
    keep.view(-1)[flat_idx.to(device)] = 0
    return keep


def apply_mask_in_model(model: torch.nn.Module, payload: Mapping[str, tuple[Sequence[int], torch.Tensor]]) -> int:
    """Restore the previous mask's values, then zero ``payload``'s entries; returns how many were zeroed.

    Runs inside each vLLM worker (``LLM.apply_model``), on that rank's shard of every parameter.
    """
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, positions, values in reversed(getattr(model, _SAVED, [])):
            params[name].data.view(-1)[positions] = values
        saved = []
        for hf_name, (shape, idx) in payload.items():
            name, shard = fused_layout(hf_name)
            if name not in params:  # a model that keeps the projection unfused
                name, shard = hf_name, None
            p = params[name]
            original = p.data
            p.data = torch.ones_like(original)  # staging: the loader writes the keep-pattern here
            try:
                loader = p.weight_loader
                keep = keep_matrix(shape, idx, original.dtype, original.device)
                loader(p, keep) if shard is None else loader(p, keep, shard)
                positions = torch.nonzero(p.data.view(-1) == 0).view(-1)
            finally:
                p.data = original
            saved.append((name, positions, original.view(-1)[positions].clone()))
            original.view(-1)[positions] = 0
    setattr(model, _SAVED, saved)
    return sum(int(s[1].numel()) for s in saved)


# ---------------------------------------------------------------- the job's one engine

_engine: dict[str, Any] = {}  # "spec", "llm", "asleep"


def get_engine(spec: EngineSpec) -> Any:
    """The job's engine: reused (woken if asleep) while its spec fits, else replaced."""
    current = _engine.get("spec")
    if current is not None and (current.model, current.dtype, current.tensor_parallel_size) == (
        spec.model, spec.dtype, spec.tensor_parallel_size) and current.max_model_len >= spec.max_model_len:  # fmt: skip
        if _engine.get("asleep"):
            _engine["llm"].wake_up()
            _engine["asleep"] = False
        return _engine["llm"]
    release_engine()
    # apply_model sends our own function (apply_mask_in_model) to the workers; vLLM's V1 engine pickles
    # callables for its worker processes only with this switch on
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    try:
        from vllm import LLM
    except ImportError:
        raise HarmsweepError(
            "eval.generation.backend=vllm needs vLLM: pip install 'harmsweep[vllm]' on a GPU machine"
        ) from None
    llm = LLM(model=spec.model, dtype=spec.dtype, tensor_parallel_size=spec.tensor_parallel_size,
              max_model_len=spec.max_model_len, gpu_memory_utilization=spec.gpu_memory_utilization,
              seed=spec.seed, enable_sleep_mode=True)  # fmt: skip
    _engine.update(spec=spec, llm=llm, asleep=False)
    return llm


def sleep_engine() -> None:
    """Before a judge loads: weights to host memory, KV cache dropped (level 1); the engine stays."""
    if _engine.get("llm") is not None and not _engine.get("asleep"):
        _engine["llm"].sleep(level=1)
        _engine["asleep"] = True


def release_engine() -> None:
    llm = _engine.pop("llm", None)
    _engine.clear()
    if llm is None:
        return
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


atexit.register(release_engine)


def scratch_dir() -> Path:
    """Node-local scratch: never the run folder on shared storage."""
    for var in ("SLURM_TMPDIR", "TMPDIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(tempfile.gettempdir())


_saved_models: dict[str, Path] = {}


def checkpoint_for(model: Any, tokenizer: Any, source: str, fingerprint: str) -> str:
    """What the engine loads: the model's own checkpoint, or (no checkpoint) one copy in node-local scratch."""
    if source.startswith("dir:"):
        return source.removeprefix("dir:")
    if source.startswith("hub:"):
        return source.removeprefix("hub:")
    if fingerprint not in _saved_models:
        folder = Path(tempfile.mkdtemp(prefix=f"harmsweep-vllm-{fingerprint[:12]}-", dir=scratch_dir()))
        atexit.register(shutil.rmtree, folder, True)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        _saved_models[fingerprint] = folder
    return str(_saved_models[fingerprint])


def generate_vllm(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    sampling: Any,
    source: str,
    fingerprint: str,
    mask: Mapping[str, torch.Tensor] | None,
) -> list[list[int]]:
    """Greedy or seeded sampling with the job's engine, the mask applied inside it; raw continuations."""
    try:
        from vllm import SamplingParams
    except ImportError:
        raise HarmsweepError(
            "eval.generation.backend=vllm needs vLLM: pip install 'harmsweep[vllm]' on a GPU machine"
        ) from None
    if not torch.cuda.is_available():
        raise HarmsweepError("eval.generation.backend=vllm needs a GPU; use eval.generation.backend=hf")
    free, total = torch.cuda.mem_get_info()
    longest = max((len(p) for p in prompts), default=1)
    spec = engine_spec(checkpoint_for(model, tokenizer, source, fingerprint), str(model.dtype).removeprefix("torch."),
                       longest + sampling.max_new_tokens, free, total, torch.cuda.device_count(), sampling.seed)  # fmt: skip
    llm = get_engine(spec)
    named = dict(model.named_parameters())
    payload = {n: (tuple(named[n].shape), idx.cpu()) for n, idx in (mask or {}).items() if idx.numel()}
    llm.apply_model(functools.partial(apply_mask_in_model, payload=payload))
    params = SamplingParams(
        max_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature if sampling.do_sample else 0.0,
        top_p=sampling.top_p if sampling.do_sample else 1.0,
        seed=sampling.seed,
    )
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]
