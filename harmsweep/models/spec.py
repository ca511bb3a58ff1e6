"""Which model, as configured: the ``model`` block. No torch here (the command line reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field
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
