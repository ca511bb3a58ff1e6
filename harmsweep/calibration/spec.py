"""Which pairs are scored, as configured: the ``calibration`` block. No torch here (the command line reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field

RESPONSE_MODES = ("prefill", "on_policy", "file")


@dataclass
class HarmfulCalibration:
    responses: str = "prefill"
    file: str | None = None
    prefill_tokens: int = 8
    max_new_tokens: int = 48


@dataclass
class BenignCalibration:
    file: str | None = None


@dataclass
class CalibrationConfig:
    n: int = 32
    batch_size: int = 8
    gen_batch_size: int = 16
    max_length: int = 256
    harmful: HarmfulCalibration = field(default_factory=HarmfulCalibration)
    benign: BenignCalibration = field(default_factory=BenignCalibration)
