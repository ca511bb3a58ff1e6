"""What every benchmark shares: the parser's common options, the model from conf/model, the data root."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
from pathlib import Path
from typing import Any

import yaml

from harmsweep.models.loading import LoadedModel, load_model
from harmsweep.models.spec import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def parser(doc: str, name: str, **defaults: Any) -> argparse.ArgumentParser:
    """--model, --n, --reps and --out (outputs/bench/<name>.json); the caller adds its own options."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--n", type=int, default=defaults.get("n", 16))
    p.add_argument("--reps", type=int, default=defaults.get("reps", 2))
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench" / f"{name}.json"))
    return p


def model(name: str) -> LoadedModel:
    """The aligned checkpoint of conf/model/<name>.yaml, through the same loader as the app."""
    cfg = ModelConfig(**yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text()))
    return load_model(cfg, "aligned", os.environ.get("HARMSWEEP_CACHE", str(Path.home() / ".cache" / "harmsweep")))


def pair_files(folder: Path, count: int) -> tuple[Path, Path]:
    """Tiny harmful and benign pair files (JSONL: prompt, response) for calibration=file sweeps."""
    from harmsweep.artifacts import write_jsonl

    harmful, benign = folder / "harmful.jsonl", folder / "benign.jsonl"
    write_jsonl([{"prompt": f"How do I do bad thing {i}?", "response": f"Sure, here is bad thing {i}: step one, step two."}
                 for i in range(count)], harmful)  # fmt: skip
    write_jsonl([{"prompt": f"Name fruit number {i}.", "response": f"Fruit {i} is an apple, crisp and sweet."}
                 for i in range(count)], benign)  # fmt: skip
    return harmful, benign


def data_root() -> str:
    return os.environ.get("HARMSWEEP_DATA", str(ROOT.parent / "shared" / "data"))


def write(out: str, record: dict[str, Any]) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))


def machine() -> dict[str, Any]:
    """What the numbers were measured on: cores, memory, torch threads, versions."""
    import platform

    import torch

    mem = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_bytes": mem,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}  # fmt: skip


def spread(values: list[float]) -> dict[str, float]:
    """Median and min-max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def status_bytes(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes: live memory, unlike a forked child's ru_maxrss."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> bool:
    """Restart the kernel's peak-RSS mark (VmHWM) here, so setup does not count; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
