"""Sizing a job before it is submitted: GPU memory by part, disk per artifact, passes, tokens, GPU-hours.

Everything comes from the model's config alone. The model is built on the ``meta`` device (shapes,
no storage, no weights read), which gives N and the weight bytes exactly. Activation memory is
measured the same way: one forward on meta of a 1- and a 2-layer copy of the model, counting the
bytes autograd saves for backward (parameters excluded), with attention standing in for a fused
(flash / memory-efficient) kernel as used on GPUs, which saves q, k, v, the output and a log-sum-exp.
The difference is one block's cost; the rest (embedding, final norm, logits, the fp32 loss) is the head.
Time is an estimate from FLOPs and memory bandwidth under stated assumptions, not a measurement.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from harmsweep.devices import GIB, SCORE_BYTES
from harmsweep.models.parts import scored_parameters

_ATTENTION = "harmsweep_plan"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
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
class ModelShape:
    """What sizing needs of a model: counts from the meta-built model, activations per token."""

    n_scored: int
    n_params: int
    n_layers: int
    hidden: int
    intermediate: int
    largest_matrix: int
    dtype_bytes: int
    kv_bytes_per_token: int  # K and V of every layer, model dtype
    layer_input_bytes_per_token: int  # what a checkpointed block keeps
    block_act_bytes_per_token: float  # saved for backward by one block, per token
    head_act_bytes_per_token: float  # embedding, norm, logits and the fp32 loss, per token

    @property
    def weight_bytes(self) -> int:
        return self.n_params * self.dtype_bytes

    def activation_bytes(self, tokens: int, checkpointing: bool) -> float:
        """Peak activation memory of one fwd+bwd over ``tokens`` tokens (batch x length).

        The backward of the loss briefly holds the logits' fp32 gradient beside what was saved,
        counted here as a third of the head's saved bytes (its fp32 log-softmax is two thirds).
        """
        head = self.head_act_bytes_per_token * tokens * (4 / 3)
        if checkpointing:
            blocks = self.n_layers * self.layer_input_bytes_per_token * tokens + self.block_act_bytes_per_token * tokens
        else:
            blocks = self.n_layers * self.block_act_bytes_per_token * tokens
        return head + blocks


class _FusedAttention(torch.autograd.Function):
    """Saves what a fused attention kernel saves: q, k, v, the output and the fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_attention(module, q, k, v, attention_mask, **kwargs):
    return _FusedAttention.apply(q, k, v).transpose(1, 2), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_ATTENTION, _fused_attention)
    AttentionMaskInterface.register(_ATTENTION, lambda *args, **kwargs: None)


def meta_model(config: PretrainedConfig, dtype: torch.dtype, layers: int | None = None) -> torch.nn.Module:
    """The model of ``config`` on the meta device (optionally cut to ``layers`` blocks): no storage."""
    config = copy.deepcopy(config)
    if layers is not None:
        config.num_hidden_layers = layers
        for key in ("layer_types",):  # per-layer lists must match the new depth
            if isinstance(getattr(config, key, None), list):
                setattr(config, key, getattr(config, key)[:layers])
    config._attn_implementation = _ATTENTION
    _register_attention()
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def saved_bytes(model: torch.nn.Module, batch: int, length: int) -> int:
    """Bytes autograd saves for one forward + loss with the scored weights requiring grad.

    Works on any device: on meta for planning, on a real device to check the plan against.
    """
    scored = scored_parameters(model)
    weights = {id(p) for p in model.parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(name in scored)
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        base = t._base if t._base is not None else t
        if id(t) not in weights and id(base) not in weights:
            total += t.numel() * t.element_size()
        return t

    ids = torch.zeros(batch, length, dtype=torch.long, device=next(model.parameters()).device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        # the loss of losses.per_sample_nll (its token counts need data; what it saves is the cross-entropy's)
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1))
    return total


def model_shape(config: PretrainedConfig, dtype: str) -> ModelShape:
    """Counts and per-token activation costs of ``config`` in ``dtype``, all on the meta device."""
    torch_dtype = getattr(torch, dtype)
    full = meta_model(config, torch_dtype)
    params = scored_parameters(full)
    named = dict(full.named_parameters())
    sizes = [named[n].numel() for n in params]
    n_layers = int(config.num_hidden_layers)
    batch, length = 2, 64
    one, two = (saved_bytes(meta_model(config, torch_dtype, k), batch, length) for k in (1, 2))
    tokens = batch * length
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    elt = DTYPE_BYTES[dtype]
    return ModelShape(
        n_scored=sum(sizes),
        n_params=sum(p.numel() for p in full.parameters()),
        n_layers=n_layers,
        hidden=int(config.hidden_size),
        intermediate=int(getattr(config, "intermediate_size", None) or 4 * config.hidden_size),
        largest_matrix=max(sizes),
        dtype_bytes=elt,
        kv_bytes_per_token=2 * n_layers * kv_heads * head_dim * elt,
        layer_input_bytes_per_token=config.hidden_size * elt,
        block_act_bytes_per_token=(two - one) / tokens,
        head_act_bytes_per_token=(2 * one - two) / tokens,
    )


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
    """What a job runs, in counts: taken from its config by plan_cli."""

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
