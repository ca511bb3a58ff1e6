"""Sizing a job before it is submitted: GPU memory by part, disk per artifact, passes, tokens, GPU-hours.

Everything comes from the model's config alone: its shape (models/memory.py, measured on the ``meta``
device) and the job's workload. Time is an estimate from FLOPs and memory bandwidth under stated
assumptions, not a measurement. No torch here: the arithmetic needs none.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from harmsweep.devices import GIB, SCORE_BYTES

if TYPE_CHECKING:
    from harmsweep.models.memory import ModelShape
# The StrongREJECT judge's base model (gemma-2b), so the judge can be sized offline.
GEMMA_2B = dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=256000)  # fmt: skip


@dataclass(frozen=True)
class Throughput:
    """What one GPU is assumed to sustain (A100/H100-class defaults); printed with every estimate."""

    tflops: float = 150.0  # bf16 dense matmul, effective (about 40-50% of an A100's peak)
    bandwidth_gbs: float = 1500.0  # HBM bytes/s while decoding (weights read once per step)
    load_gbs: float = 1.0  # checkpoint read from shared storage


@dataclass(frozen=True)
class JobSize:
    """One job's needs; memory in bytes per GPU, the peak being the largest of its phases."""

    n_scored: int
    weights: float
    score_buffer: float
    activations: float
    kv_cache: float
    judge: float
    peak: float
    phase: str  # which phase sets the peak: scoring, generation or judging
    passes: int  # forward+backward passes of scoring this job computes
    generated_tokens: int
    gpu_hours: float
    disk: dict[str, float] = field(default_factory=dict)  # artifact -> bytes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Workload:
    """What a job runs, in counts: taken from its config by sweep/plan.py."""

    score_sets: int  # score sets this job computes (0 when another job of the sweep made them)
    unsigned: bool  # unsigned SNIP: one backward per sample
    cal_n: int
    cal_batch: int
    cal_length: int
    cal_gen_tokens: int  # calibration responses generated (prefill/on-policy), when computed
    eval_prompts: int
    eval_batch: int
    prompt_length: int
    max_new_tokens: int
    generations: int  # answer sets this job generates, over both stages (attacked and plain; before and after)
    judge_batch: int  # 0: no judge model
    judge_tokens: int
    checkpointing: bool
    gpus: int = 1
    eval_forward_tokens: int = 0  # likelihood, perplexity, recognition: forward passes


def size_job(shape: ModelShape, work: Workload, judge: ModelShape | None, speed: Throughput) -> JobSize:
    """Peak GPU memory by phase, passes, tokens and an estimate of GPU-hours for one job."""
    gpus = max(1, work.gpus)
    weights = shape.weight_bytes / gpus
    score = shape.n_scored * SCORE_BYTES / gpus if work.score_sets else 0.0
    grad = shape.largest_matrix * (shape.dtype_bytes + SCORE_BYTES)  # one weight's gradient and its product
    tokens = work.cal_batch * work.cal_length if not work.unsigned else work.cal_length
    acts = (shape.activation_bytes(tokens, work.checkpointing) + grad) / gpus if work.score_sets else 0.0
    context = work.prompt_length + work.max_new_tokens
    kv = shape.kv_bytes_per_token * work.eval_batch * context / gpus if work.generations else 0.0
    judge_bytes = 0.0
    if judge is not None and work.judge_batch:
        # inference only (no saved activations): a block's hidden states and MLP intermediates at a time
        transient = (
            work.judge_batch * work.judge_tokens * (4 * judge.hidden + 2 * judge.intermediate) * judge.dtype_bytes
        )
        judge_bytes = judge.weight_bytes + transient
    phases = {"scoring": weights + score + acts, "generation": weights + kv, "judging": weights + judge_bytes}
    phase = (
        max(phases, key=phases.__getitem__)
        if phases["scoring"] + phases["generation"] + phases["judging"] > 3 * weights
        else "weights"
    )
    per_set = work.cal_n if work.unsigned else math.ceil(work.cal_n / work.cal_batch)
    passes = work.score_sets * per_set
    gen_tokens = work.generations * work.eval_prompts * work.max_new_tokens + work.cal_gen_tokens
    flops = 6 * shape.n_params * work.score_sets * work.cal_n * work.cal_length
    flops += 2 * shape.n_params * (work.eval_forward_tokens + work.generations * work.eval_prompts * work.prompt_length)
    decode_steps = (work.generations * math.ceil(work.eval_prompts / work.eval_batch) * work.max_new_tokens
                    + math.ceil(work.cal_gen_tokens / max(1, work.eval_batch)))  # fmt: skip
    seconds = flops / (speed.tflops * 1e12 * gpus) + decode_steps * shape.weight_bytes / (
        speed.bandwidth_gbs * 1e9 * gpus
    )
    seconds += shape.weight_bytes / (speed.load_gbs * 1e9)
    if judge is not None and work.judge_batch:
        seconds += 2 * judge.n_params * work.generations * work.eval_prompts * work.judge_tokens / (speed.tflops * 1e12)
    return JobSize(
        n_scored=shape.n_scored,
        weights=weights,
        score_buffer=score,
        activations=acts,
        kv_cache=kv,
        judge=judge_bytes,
        peak=phases.get(phase, weights),
        phase=phase,
        passes=passes,
        generated_tokens=gen_tokens,
        gpu_hours=seconds * gpus / 3600,
    )


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"
