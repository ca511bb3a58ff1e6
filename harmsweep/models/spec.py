"""Which model, as configured: the ``model`` block. No torch here (the command line reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    name: str = "?"
    path: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    variants: dict[str, Any] = field(default_factory=dict)  # alignment name -> checkpoint spec
    device_map: Any = None  # null: one device (``device``); auto: accelerate's placement over the job's GPUs
    max_memory: dict[str, Any] | None = None  # per-device budgets for device_map=auto; null: room left for scores
