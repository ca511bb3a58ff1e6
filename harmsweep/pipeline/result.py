"""result.json: one header and one footer for every run and experiment, written last so its presence means done."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import transformers

import harmsweep
from harmsweep.alignment.derive import derivation
from harmsweep.artifacts import write_json
from harmsweep.pipeline.context import RunContext


def record(ctx: RunContext, body: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``<run_dir>/result.json``: what ran (model, variant, where its weights came from), ``body``, then
    the timings, code versions and the plain config; returns the result."""
    cfg = ctx.cfg
    result = {
        "run_id": ctx.run_id,
        "model": cfg.model.name,
        "alignment": cfg.alignment.name,
        "model_source": ctx.lm.source,
        "model_fingerprint": ctx.lm.fingerprint,
        "derivation": derivation(ctx.lm.source, cfg.paths.cache_dir),
        **body,
        "timings_s": {k: round(v, 3) for k, v in ctx.timings.items()},
        "versions": versions(),
        "config": dict(ctx.plain),
    }
    write_json(result, ctx.run_dir / "result.json")
    return result


def versions() -> dict[str, str]:
    return {"harmsweep": harmsweep.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
