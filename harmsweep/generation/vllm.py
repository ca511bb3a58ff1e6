"""vLLM generation: one engine per job, sized from free GPU memory, with the run's mask applied inside it.

The engine reads the model's own checkpoint, so pruned weights never travel as a full-size copy; only
a model without one (random-init) is written once to node-local scratch. vLLM fuses q/k/v into
``qkv_proj`` and gate/up into ``gate_up_proj`` and shards them over ranks; rather than re-deriving
that layout, each HF matrix's keep-pattern (ones, zeros at masked entries) goes through the engine
parameter's own ``weight_loader`` into a ones-filled staging buffer, in every worker. The zeros that
land there are the engine's masked positions; their values are kept, so the next mask (or none)
restores them first and one engine serves the unpruned and the pruned model. The engine takes the
in-memory model's values at the masked entries (zeros, or the base variant's under pruning.replace=base),
routed through the same loader; a change beyond the mask (method=lowrank) is refused by check_config.

The mask reaches the workers by ``collective_rpc`` to a method that ``worker_extension_cls`` mixes
into each worker, as plain ints and bytes: ``apply_model`` pickles a callable, which vLLM's V1 engine
does only with VLLM_ALLOW_INSECURE_SERIALIZATION=1, and V1 turns tensors in untyped arguments into tuples.
"""

from __future__ import annotations

import atexit
import gc
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harmsweep.cache import mask_key
from harmsweep.devices import GIB
from harmsweep.errors import HarmsweepError

if TYPE_CHECKING:
    from harmsweep.generation.sampling import Sampling

# vLLM's stacked_params_mapping for Llama-style models: HF suffix -> (fused suffix, shard id)
STACKED = {
    ".q_proj": (".qkv_proj", "q"),
    ".k_proj": (".qkv_proj", "k"),
    ".v_proj": (".qkv_proj", "v"),
    ".gate_proj": (".gate_up_proj", 0),
    ".up_proj": (".gate_up_proj", 1),
}
HEADROOM = 2 * GIB  # left free beside the engine: CUDA contexts, the sampler, a judge's first batch
_SAVED = "_harmsweep_masked"  # per worker, on the engine's model: [(param name, flat positions, values)]
_NO_VLLM = "eval.generation.backend=vllm needs vLLM: pip install 'harmsweep[vllm]' on a GPU machine"
ADAPTER = (  # the run's mask names the adapter's factors; vLLM serves neither them nor an unmerged adapter's masks
    "a PEFT adapter model cannot be served by vLLM with the run's weights (its mask names the adapter's own "
    "matrices): use eval.generation.backend=hf, or merge the adapter into a full checkpoint and load that"
)
# HF name -> (engine-side HF shape, flat indices, the values there: None for zeros)
Payload = Mapping[str, tuple[Sequence[int], torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is built with; a job reuses its engine while checkpoint, dtype, tp and length fit."""

    model: str  # checkpoint folder or hub id
    dtype: str
    tensor_parallel_size: int
    max_model_len: int
    gpu_memory_utilization: float
    seed: int = 0
    revision: str | None = None  # a hub checkpoint's commit: the one HF loaded


def engine_spec(model: str, dtype: str, max_model_len: int, free_bytes: int, total_bytes: int, n_gpus: int,
                seed: int = 0, headroom_bytes: int = HEADROOM, weight_bytes: int = 0,
                max_positions: int | None = None, revision: str | None = None) -> EngineSpec:  # fmt: skip
    """Size the engine from the memory free now: vLLM's fraction is of the card's total, and must be free."""
    usable = free_bytes - headroom_bytes
    if n_gpus < 1 or usable < weight_bytes // max(n_gpus, 1) + GIB:  # this GPU's weights and some KV cache
        raise HarmsweepError(
            f"vLLM needs GPU memory: {free_bytes / GIB:.1f} of {total_bytes / GIB:.1f} GiB free on {n_gpus} GPU(s) "
            f"for {weight_bytes / GIB:.1f} GiB of weights; free the GPU or use eval.generation.backend=hf"
        )
    length = 256 * math.ceil(max(max_model_len, 2048) / 256)  # room to spare: a longer prompt rebuilds the engine
    if max_positions:
        length = max(min(length, max_positions), max_model_len)
    return EngineSpec(
        model=model,
        dtype=dtype,
        tensor_parallel_size=n_gpus,
        max_model_len=length,
        gpu_memory_utilization=math.floor(1000 * min(0.95, usable / total_bytes)) / 1000,
        seed=seed,
        revision=revision,
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


def _through_loader(p: torch.nn.Parameter, shard: str | int | None, matrix: torch.Tensor, fill: float) -> torch.Tensor:
    """``matrix`` (HF layout) as this rank's (fused, sharded) ``p`` loads it, into a ``fill``-filled staging copy."""
    original = p.data
    p.data = torch.full_like(original, fill)  # staging: the loader writes here, p's own values stay untouched
    try:
        loader = getattr(p, "weight_loader", None) or (lambda param, w: param.data.copy_(w))  # vLLM's default
        loader(p, matrix) if shard is None else loader(p, matrix, shard)
        return p.data
    finally:
        p.data = original


def _engine_positions(p: torch.nn.Parameter, shard: str | int | None, shape: Sequence[int], idx: torch.Tensor):
    """Where this rank's (fused, sharded) ``p`` holds the HF entries ``idx``: their keep-pattern through p's loader."""
    keep = keep_matrix(shape, idx, p.dtype, p.device)
    return torch.nonzero(_through_loader(p, shard, keep, 1.0).view(-1) == 0).view(-1)


def _engine_values(p: torch.nn.Parameter, shard: str | int | None, shape: Sequence[int], idx: torch.Tensor,
                   values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The HF ``values`` at ``idx``, as they land at this rank's ``positions`` (same loader, same layout)."""
    matrix = torch.zeros(tuple(shape), dtype=p.dtype, device=p.device)
    matrix.view(-1)[idx.to(p.device)] = values.to(p.device, p.dtype)
    return _through_loader(p, shard, matrix, 0.0).view(-1)[positions]


def apply_mask_in_model(model: torch.nn.Module, payload: Payload) -> int:
    """Restore the previous mask's values, then set ``payload``'s entries (zeros, or the values it carries);
    returns how many were set.

    Runs inside each vLLM worker, on that rank's shard of every parameter.
    """
    params = dict(model.named_parameters())
    targets = {}
    for hf_name in payload:
        name, shard = fused_layout(hf_name)
        targets[hf_name] = (name, shard) if name in params else (hf_name, None)  # a model that keeps it unfused
    missing = sorted(n for n, (name, _) in targets.items() if name not in params)
    if missing:  # checked before anything changes
        raise HarmsweepError(f"the vLLM engine has no parameter for {len(missing)} masked weight(s), e.g. "
                             f"{missing[0]}; use eval.generation.backend=hf for this model")  # fmt: skip
    with torch.no_grad():
        for name, positions, values in reversed(getattr(model, _SAVED, [])):
            params[name].data.view(-1)[positions] = values
        saved = []
        for hf_name, (shape, idx, values) in payload.items():
            name, shard = targets[hf_name]
            positions = _engine_positions(params[name], shard, shape, idx)
            flat = params[name].data.view(-1)
            saved.append((name, positions, flat[positions].clone()))
            flat[positions] = (
                0 if values is None else _engine_values(params[name], shard, shape, idx, values, positions)
            )
    setattr(model, _SAVED, saved)
    return sum(int(s[1].numel()) for s in saved)


def mask_payload(model: torch.nn.Module, mask: Mapping[str, torch.Tensor] | None) -> dict[str, tuple]:
    """The mask in the layout vLLM loads each HF weight in (GPT-2's Conv1D weights are loaded transposed), with
    the in-memory model's values there: the run's weights (None where all are zero, the usual pruning)."""
    params = dict(model.named_parameters())
    conv1d = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    out = {}
    for name, idx in (mask or {}).items():
        if not idx.numel():
            continue
        weight = params[name].detach()
        values = weight.view(-1)[idx.to(weight.device)].to("cpu", torch.float32)  # one copy per matrix and mask
        shape, idx = tuple(weight.shape), idx.detach().to("cpu", torch.int64)
        if name in conv1d:
            rows, cols = shape
            idx, order = ((idx % cols) * rows + idx // cols).sort()
            shape, values = (cols, rows), values[order]
        out[name] = (shape, idx, values if bool(values.any()) else None)
    return out


def encode_payload(payload: Payload) -> dict[str, list]:
    """Plain ints and bytes: what vLLM's RPC carries without pickling (no value bytes for zeros)."""
    return {n: [list(s), i.to(torch.int64).contiguous().numpy().tobytes(),
                b"" if v is None else v.to(torch.float32).contiguous().numpy().tobytes()]
            for n, (s, i, v) in payload.items()}  # fmt: skip


def decode_payload(wire: Mapping[str, Sequence[Any]]) -> dict[str, tuple[tuple[int, ...], torch.Tensor, Any]]:
    def floats(raw: bytes) -> torch.Tensor | None:
        return torch.frombuffer(bytearray(raw), dtype=torch.float32) if raw else None

    return {n: (tuple(s), torch.frombuffer(bytearray(raw), dtype=torch.int64), floats(vals))
            for n, (s, raw, vals) in wire.items() if raw}  # fmt: skip


class MaskWorkerExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``); ``self`` is the worker."""

    def harmsweep_set_mask(self, wire: dict[str, list]) -> int | str:
        try:
            return apply_mask_in_model(self.get_model(), decode_payload(wire))  # type: ignore[attr-defined]
        except HarmsweepError as exc:  # back to the driver as a value: it raises it as one line
            return str(exc)


def set_mask(llm: Any, model: torch.nn.Module, mask: Mapping[str, torch.Tensor] | None) -> int:
    """Make the engine's weights the unpruned ones with ``mask`` zeroed, in every worker; returns the count."""
    results = llm.collective_rpc("harmsweep_set_mask", args=(encode_payload(mask_payload(model, mask)),))
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        raise HarmsweepError(errors[0])
    llm.reset_prefix_cache()  # cached prompt KV was computed with the previous weights
    return sum(results)


# ---------------------------------------------------------------- the job's one engine

_engine: dict[str, Any] = {}  # spec, llm, asleep, freed (bytes its sleep gave back), mask (applied now)


def gpu_memory() -> tuple[int, int]:
    """(free, total) bytes of the visible GPU with the least free; (0, 0) without CUDA."""
    if not torch.cuda.is_available():
        return 0, 0
    return min(torch.cuda.mem_get_info(i) for i in range(torch.cuda.device_count()))


def reuse_engine(model: str, dtype: str, tp: int, length: int, revision: str | None = None) -> Any | None:
    """The job's engine if it fits (woken if asleep and its memory is still free), else None."""
    spec = _engine.get("spec")
    if spec is None or (spec.model, spec.dtype, spec.tensor_parallel_size, spec.revision) != (
        model, dtype, tp, revision) or spec.max_model_len < length:  # fmt: skip
        return None
    if _engine["asleep"]:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what HF forwards left in PyTorch's cache is the engine's to take back
        if _engine["freed"] and gpu_memory()[0] - _engine["freed"] < GIB // 2:
            return None  # something else holds what it gave up: waking would fail, a new one is sized to fit
        _engine["llm"].wake_up()
        _engine["asleep"] = False
    return _engine["llm"]


def get_engine(spec: EngineSpec) -> Any:
    """The job's engine: reused while ``spec`` fits it, else the old one is released and a new one built."""
    llm = reuse_engine(spec.model, spec.dtype, spec.tensor_parallel_size, spec.max_model_len, spec.revision)
    if llm is not None:
        return llm
    release_engine()
    try:
        from vllm import LLM
    except ImportError:
        raise HarmsweepError(_NO_VLLM) from None
    llm = LLM(model=spec.model, dtype=spec.dtype, tensor_parallel_size=spec.tensor_parallel_size,
              max_model_len=spec.max_model_len, gpu_memory_utilization=spec.gpu_memory_utilization,
              seed=spec.seed, enable_sleep_mode=True, revision=spec.revision, tokenizer_revision=spec.revision,
              worker_extension_cls=f"{__name__}.{MaskWorkerExtension.__name__}")  # fmt: skip
    _engine.update(spec=spec, llm=llm, asleep=False, freed=0, mask=None)
    return llm


def sleep_engine() -> None:
    """Before any HF forward (likelihood, judges, perplexity, ...): weights to host memory, KV cache dropped
    (level 1); the engine and the weights it serves stay."""
    if _engine.get("llm") is None or _engine["asleep"]:
        return
    before = gpu_memory()[0]
    _engine["llm"].sleep(level=1)
    _engine.update(asleep=True, freed=max(0, gpu_memory()[0] - before))


def release_engine() -> None:
    """End the engine and its worker processes so that their GPU memory is free now (also at exit)."""
    llm = _engine.pop("llm", None)
    _engine.clear()
    if llm is None:
        return
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if hasattr(core, "shutdown"):  # V1: the engine-core process holds the GPU memory, not this one
        core.shutdown()
    del llm, core
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    except ImportError:
        gc.collect()
    else:
        cleanup_dist_env_and_memory()  # in-process engines: their parallel groups, so a new engine can start
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


atexit.register(release_engine)


# ---------------------------------------------------------------- where the engine's weights come from


def scratch_dir() -> Path:
    """Node-local scratch: never the run folder on shared storage."""
    for var in ("SLURM_TMPDIR", "TMPDIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path("/tmp")


_saved_models: dict[tuple[str, str], Path] = {}  # (fingerprint, mask key when saved) -> scratch copy


def checkpoint_for(model: Any, tokenizer: Any, source: str, fingerprint: str, mask: Any = None) -> str:
    """What the engine loads: the checkpoint the model came from, else one copy of it in node-local scratch.

    The in-memory model must differ from its checkpoint by the mask only. A copy saved while pruned
    holds the mask's zeros for good, so it serves that mask alone; one saved unpruned serves every mask.
    """
    kind, _, where = source.partition(":")
    if kind in ("dir", "hub"):
        return where
    loaded_from = Path(str(getattr(model, "name_or_path", "") or "-"))
    if kind in ("gguf", "derived") and (loaded_from / "config.json").is_file():
        return str(loaded_from)  # the converted or derived checkpoint in the cache, read where it is
    if not fingerprint:
        raise HarmsweepError(f"the vLLM backend needs a checkpoint or a fingerprint for model source {source!r}; "
                             "use eval.generation.backend=hf")  # fmt: skip
    for key in ((fingerprint, ""), (fingerprint, mask_key(mask))):
        if key in _saved_models:
            return str(_saved_models[key])
    folder = Path(tempfile.mkdtemp(prefix=f"harmsweep-vllm-{fingerprint[:12]}-", dir=scratch_dir()))
    atexit.register(shutil.rmtree, folder, True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _saved_models[(fingerprint, mask_key(mask))] = folder
    return str(folder)


def generate_vllm(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], sampling: Sampling, source: str,
                  fingerprint: str, mask: Mapping[str, torch.Tensor] | None) -> list[list[int]]:  # fmt: skip
    """Greedy, or sampling seeded per prompt (each request its own seed), with the job's engine and the mask applied
    inside it; raw continuations. vLLM's sampler is not HF's: the same key gives the same answer within a backend."""
    try:
        from vllm import SamplingParams
    except ImportError:
        raise HarmsweepError(_NO_VLLM) from None
    if not torch.cuda.is_available():
        raise HarmsweepError("eval.generation.backend=vllm needs a GPU; use eval.generation.backend=hf")
    from harmsweep.generation.sampling import _stop_ids

    if getattr(model, "_hf_peft_config_loaded", False):
        raise HarmsweepError(ADAPTER)
    n_gpus, dtype = torch.cuda.device_count(), str(model.dtype).removeprefix("torch.")
    checkpoint = checkpoint_for(model, tokenizer, source, fingerprint, mask)
    # a hub model at the commit HF loaded, not at whatever the branch points to when the engine starts
    revision = getattr(model.config, "_commit_hash", None) if source.startswith("hub:") else None
    length = max((len(p) for p in prompts), default=1) + sampling.max_new_tokens
    llm = reuse_engine(checkpoint, dtype, n_gpus, length, revision)
    if llm is None:  # sized only now: an engine that is awake holds most of the memory
        free, total = gpu_memory()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        positions = getattr(model.config, "max_position_embeddings", None)
        llm = get_engine(engine_spec(checkpoint, dtype, length, free, total, n_gpus, sampling.seed,
                                     weight_bytes=weights, max_positions=positions, revision=revision))  # fmt: skip
    if _engine.get("mask") is not mask:  # the same mask object is applied already
        set_mask(llm, model, mask)
        _engine["mask"] = mask
    stops = sorted(_stop_ids(model, tokenizer))  # the HF backend's stops
    params: Any = SamplingParams(max_tokens=sampling.max_new_tokens, temperature=0.0, top_p=1.0, seed=sampling.seed,
                                 stop_token_ids=stops)  # fmt: skip
    if sampling.do_sample:  # one request, one seed: (run seed, the prompt's key), as the HF backend's rows
        from harmsweep.generation.seeded import prompt_seeds

        params = [
            SamplingParams(max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                           top_p=sampling.top_p, top_k=sampling.top_k or -1,
                           repetition_penalty=sampling.repetition_penalty or 1.0, seed=seed, stop_token_ids=stops)
            for seed in prompt_seeds(prompts, sampling)
        ]  # fmt: skip
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]
