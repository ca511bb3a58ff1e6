"""Which model, as configured: the ``model`` block. No torch here (the command line reads it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from harmsweep.errors import HarmsweepError


@dataclass
class ModelConfig:
    name: str = "?"
    path: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    variants: dict[str, Any] = field(default_factory=dict)  # alignment name -> checkpoint spec
    device_map: Any = None  # null: one device (``device``); auto: accelerate's placement over the job's GPUs
    max_memory: dict[str, Any] | None = None  # per-device budgets for device_map=auto; null: room left for scores
    # token positions whose fp32 logits exist at once in every full-vocabulary loss (scoring, likelihood,
    # perplexity): 2048 x 128,256 fp32 is 1 GiB; changes no result beyond float rounding (not in the run id)
    logits_chunk: int = 2048
    # the checkpoint's transformers config (model_type and sizes): what `harmsweep plan` sizes when no
    # config.json is at hand (offline); never used to build a model. null: read the checkpoint's config
    architecture: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. Qwen3: {enable_thinking: false}

    def validate(self) -> None:
        if int(self.logits_chunk) < 1:
            raise HarmsweepError(f"model.logits_chunk={self.logits_chunk} must be at least 1 (token positions)")
        arch = self.architecture
        if arch is not None and not (isinstance(arch, Mapping) and isinstance(arch.get("model_type"), str)):
            raise HarmsweepError(
                f"model.architecture of model={self.name} must be the checkpoint's config (a mapping with its "
                "model_type, as in its config.json), or null"
            )
        if not isinstance(self.chat_template_kwargs, Mapping):
            raise HarmsweepError(
                f"model.chat_template_kwargs={self.chat_template_kwargs!r} must be a mapping of keyword arguments "
                "for apply_chat_template (e.g. {enable_thinking: false})"
            )


def model_basename(model: ModelConfig, variant: str) -> str:
    """The ``{basename}`` of their file names: the last segment of the variant's hub_id, else of model.path (or the
    variant's path); a model with neither (a tiny test model) is named by ``model.name``."""
    spec = (model.variants or {}).get(variant) or {}
    for value in (spec.get("hub_id"), model.path, spec.get("path")):
        if value:
            return PurePosixPath(str(value).rstrip("/")).name
    return str(model.name)
