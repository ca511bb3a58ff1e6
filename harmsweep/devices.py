"""Where tensors live: the model's devices, its placement over a job's GPUs, and a judge's visit.

Every stage sends inputs to ``input_device`` (the embedding's device) rather than "the" device,
so a model spread over several GPUs by ``model.device_map=auto`` runs unchanged. ``auto_max_memory``
leaves room on each GPU for the fp32 score buffer that will sit beside the weights during scoring.
A judge model rests in host memory and visits the GPU only while it judges (``visiting``).
torch is imported by the functions that use it: the sweep side sizes jobs with these constants alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from harmsweep.errors import HarmsweepError

if TYPE_CHECKING:
    import torch
    from torch import nn

GIB = 1 << 30
SCORE_BYTES = 4  # fp32 score buffer per scored weight


def resolve_device(device: str | None) -> str:
    """``auto``: the GPU when there is one."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the embedding's device (with a device map, parameters span several GPUs)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.device if weight is not None else next(model.parameters()).device


def auto_max_memory(
    free_bytes: Mapping[int | str, int], weight_bytes: int, reserve_bytes: int = 4 * GIB, cpu_bytes: int | None = None
) -> dict[int | str, int]:
    """Per-GPU weight budgets for accelerate's placement, leaving each GPU room for its score buffer.

    A scored bf16 weight takes 2 bytes and its buffer 4 more, so weights may fill only
    ``weight_bytes / (weight_bytes + 4)`` of what is free after ``reserve_bytes`` (activations).
    """
    if weight_bytes < 1:
        raise HarmsweepError(f"weight_bytes must be >= 1 (got {weight_bytes})")
    share = weight_bytes / (weight_bytes + SCORE_BYTES)
    out: dict[int | str, int] = {gpu: max(0, int((free - reserve_bytes) * share)) for gpu, free in free_bytes.items()}
    if cpu_bytes is not None:
        out["cpu"] = cpu_bytes
    return out


def free_gpu_memory() -> dict[int, int]:
    """Free bytes on each visible GPU (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}


def place_model(
    model: nn.Module, device: str, device_map: str | Mapping[str, Any] | None = None, max_memory: Mapping | None = None
) -> nn.Module:
    """Put the model on ``device``, or spread it by ``device_map`` (``auto``: accelerate's placement).

    A model that from_pretrained already placed (``hf_device_map``) stays where it is.
    """
    if getattr(model, "hf_device_map", None):
        return model
    if not device_map:
        return model.to(resolve_device(device))
    from accelerate import dispatch_model, infer_auto_device_map

    if device_map == "auto":
        dtype_bytes = next(model.parameters()).element_size()
        budget = dict(max_memory or auto_max_memory(free_gpu_memory(), dtype_bytes)) or None
        device_map = infer_auto_device_map(
            model, max_memory=budget, no_split_module_classes=getattr(model, "_no_split_modules", None)
        )
    return dispatch_model(model, device_map=dict(device_map))


@contextmanager
def visiting(model: nn.Module, device: str) -> Iterator[nn.Module]:
    """Move ``model`` to ``device`` for the block, then back to host memory and empty the CUDA cache,
    so GPU memory after a judge's visit is what it was before it."""
    import torch

    target = resolve_device(device)
    resting = next(model.parameters()).device
    moved = torch.device(target) != resting
    if moved:
        model.to(target)
    try:
        yield model
    finally:
        if moved:
            model.to(resting)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
