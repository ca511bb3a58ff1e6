"""Which data, as configured: the ``data`` block. No torch here (the command line reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DatasetRef:
    name: str = "advbench"
    file: str | None = None
    categories: list[str] | None = None


@dataclass
class DataConfig:
    root: str | None = None
    download: bool = False
    harmful: DatasetRef = field(default_factory=DatasetRef)
    benign: DatasetRef = field(default_factory=lambda: DatasetRef(name="alpaca"))
