"""What a model needs in memory, from its config alone: built on the ``meta`` device (shapes, no storage, no
weights read), which gives N and the weight bytes exactly.

Activation memory is measured the same way: one forward on meta of a 1- and a 2-layer copy of the model,
counting the bytes autograd saves for backward (parameters excluded), with attention standing in for a fused
(flash / memory-efficient) kernel as used on GPUs, which saves q, k, v, the output and a log-sum-exp. The
difference is one block's cost; the rest (embedding, final norm, logits, the fp32 loss) is the head.
Peaks are measured on meta too (``peak_bytes``: live storages created during a call, as a CUDA allocator
would hold them): a scoring step (forward, the fp32 loss, backward with each weight's gradient folded and
freed as it lands, as SNIP does) and a no-grad forward (Wanda, low-rank, evaluation). Which scored weights
read the same input (q/k/v, gate/up: one Gram each for low-rank) is seen from the hooks of that forward.
``harmsweep plan`` (sweep/sizing.py) turns these into the GPU memory, time and disk of a job.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter
from transformers import AutoModelForCausalLM, PretrainedConfig

from harmsweep.models.parts import scored_parameters

_ATTENTION = "harmsweep_plan"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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
    vocab: int = 0
    step_block_bytes_per_token: float = 0.0  # peak of a scoring step (fwd + loss + bwd), per block and token
    step_head_bytes_per_token: float = 0.0  # ... what does not grow with depth, bar the logits (per token)
    step_logit_bytes_per_position: float = 0.0  # ... one chunk's logits, fp32 copy and gradient (per position)
    eval_bytes_per_token: float = 0.0  # peak of a no-grad loss forward in tiny chunks: the blocks' (per token)
    eval_logit_bytes_per_position: float = 0.0  # one chunk's fp32 logits and log-softmax (per position)
    forward_bytes_per_token: float = 0.0  # peak of a plain no-grad forward, full logits in the model's dtype
    block_matrices: tuple[tuple[int, int], ...] = ()  # (d_out, d_in) of one block's scored weights
    block_inputs: tuple[int, ...] = ()  # d_in of each distinct input those weights read (one Gram each)

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

    def step_bytes(self, tokens: int, checkpointing: bool, logits_chunk: int, layers: int | None = None) -> float:
        """Peak of one scoring step over ``tokens`` tokens above the weights (score buffers not included).

        ``layers``: blocks whose activations are kept (sequential SNIP at layer l keeps those from l up);
        checkpointing keeps each block's input and one block's activations while it is recomputed.
        """
        kept = self.n_layers if layers is None else layers
        logits = self.step_logit_bytes_per_position * min(tokens, logits_chunk)
        head = self.step_head_bytes_per_token * tokens + self.largest_matrix * self.dtype_bytes  # one gradient
        if checkpointing:  # the loss's chunk, then one block at a time, beside the kept block inputs
            inputs = kept * self.layer_input_bytes_per_token * tokens
            return head + inputs + max(logits, self.step_block_bytes_per_token * tokens)
        return head + kept * self.step_block_bytes_per_token * tokens + logits

    def eval_bytes(self, tokens: int, logits_chunk: int) -> float:
        """Peak of an evaluation forward (perplexity, likelihood, recognition) above the weights: a block's
        temporaries, or the final states (and their gathered copy) beside one chunk's fp32 logits and
        log-softmax, whichever is larger."""
        chunk = self.eval_logit_bytes_per_position * min(tokens, logits_chunk)
        return max(self.eval_bytes_per_token * tokens, 2 * self.hidden * self.dtype_bytes * tokens + chunk)

    def forward_bytes(self, tokens: int) -> float:
        """Peak of a plain no-grad forward (Wanda, low-rank, a prefill) above the weights, no KV cache kept."""
        return self.forward_bytes_per_token * tokens


class _Peak(TorchDispatchMode):
    """Live bytes of the storages created inside the block, and their peak (``meta`` storages included)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(a.untyped_storage()) for a in tree_iter((args, kwargs or {})) if isinstance(a, torch.Tensor)}
        for t in tree_iter(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._seen or storage.nbytes() == 0:
                continue  # a view or an in-place result: no new bytes
            self._seen[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of the storages ``fn()`` creates and holds at once (on meta: those a GPU would allocate)."""
    with _Peak() as mode:
        fn()
    return mode.peak


def _ids(model: torch.nn.Module, batch: int, length: int) -> torch.Tensor:
    return torch.zeros(batch, length, dtype=torch.long, device=next(model.parameters()).device)


def step_peak(model: torch.nn.Module, batch: int, length: int, logits_chunk: int) -> int:
    """Peak bytes of SNIP's step bar the weights' gradients: forward with the scored weights requiring grad (so
    autograd saves what scoring saves), the chunked fp32 response loss (every position labelled, the most a
    batch can have; labels on the host, as in scoring), and the backward of the activations. The gradient of
    one weight at a time comes on top (``ModelShape.step_bytes``): measured here it would pass for activations."""
    from harmsweep.losses import response_nll

    scored = scored_parameters(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in scored)
    first: list[torch.Tensor] = []

    def mark(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        first.append(out.detach().requires_grad_(True))
        return first[-1]

    handle = model.get_input_embeddings().register_forward_hook(mark)
    ids = _ids(model, batch, length)
    labels = torch.zeros(batch, length, dtype=torch.long)

    def step() -> None:
        loss = response_nll(model, ids, torch.ones_like(ids), labels, logits_chunk=logits_chunk).sum()
        torch.autograd.grad(loss, first.pop())

    try:
        return peak_bytes(step)
    finally:
        handle.remove()


def eval_peak(model: torch.nn.Module, batch: int, length: int, logits_chunk: int) -> int:
    """Peak bytes of an evaluation forward (perplexity, likelihood): no grad, the chunked fp32 loss."""
    from harmsweep.losses import nll_sums

    ids = _ids(model, batch, length)
    labels = torch.zeros(batch, length, dtype=torch.long)
    with torch.no_grad():
        return peak_bytes(lambda: nll_sums(model, ids, torch.ones_like(ids), labels, logits_chunk=logits_chunk))


def forward_peak(
    model: torch.nn.Module, batch: int, length: int
) -> tuple[int, tuple[tuple[int, int], ...], tuple[int, ...]]:
    """Peak bytes of a no-grad forward; also the first block's scored (d_out, d_in) and its distinct inputs."""
    from harmsweep.models.activations import linear_modules

    scored = scored_parameters(model)
    first = [n for n, p in scored.items() if p.layer == min(q.layer for q in scored.values())]
    modules = linear_modules(model, first)
    named = dict(model.named_parameters())
    inputs: dict[int, int] = {}
    shapes = []
    for n in first:
        w = named[n] if scored[n].rows_dim == 0 else named[n].T
        shapes.append((int(w.size(0)), int(w.size(1))))
    seen: dict[int, torch.Tensor] = {}  # kept alive in a pass of its own, so no id is reused by a later input

    def record(module: torch.nn.Module, args: tuple) -> None:
        seen.setdefault(id(args[0]), args[0])

    hooks = [m.register_forward_pre_hook(record) for m in modules.values()]
    ids = _ids(model, batch, length)

    def forward() -> None:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)

    try:
        with torch.no_grad():
            forward()
    finally:
        for h in hooks:
            h.remove()
    inputs = {k: int(t.size(-1)) for k, t in seen.items()}
    seen.clear()
    with torch.no_grad():
        peak = peak_bytes(forward)
    return peak, tuple(shapes), tuple(int(d) for d in inputs.values())


class _FusedAttention(torch.autograd.Function):
    """Saves what a fused attention kernel saves: q, k, v, the output and the fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        # causal attention's real output (so a CPU check of the plan runs on real numbers); free on meta
        if q.device.type == "meta":  # a fused kernel's output only (no T x T scores)
            out = torch.empty_like(q)
            ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
            return out
        gqa = q.size(1) // k.size(1)
        k_all, v_all = (t.repeat_interleave(gqa, dim=1) if gqa > 1 else t for t in (k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k_all, v_all, is_causal=True)
        del k_all, v_all
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        # memory only: what a fused kernel's backward returns (its values are not needed by any plan)
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


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
    # every position gets logits in one chunk (all), or in chunks of ``small``: the difference is the logits'
    positions, small = batch * (length - 1), 8
    step_one, step_two = (step_peak(meta_model(config, torch_dtype, k), batch, length, tokens) for k in (1, 2))
    step_small = step_peak(meta_model(config, torch_dtype, 1), batch, length, small)
    step_logit = (step_one - step_small) / (positions - small)
    ev_small = eval_peak(meta_model(config, torch_dtype, 1), batch, length, small)
    fwd, matrices, inputs = forward_peak(meta_model(config, torch_dtype, 1), batch, length)
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
        vocab=int(config.vocab_size),
        step_block_bytes_per_token=(step_two - step_one) / tokens,
        step_head_bytes_per_token=(2 * step_one - step_two - step_logit * positions) / tokens,
        step_logit_bytes_per_position=step_logit,
        eval_bytes_per_token=ev_small / tokens,
        eval_logit_bytes_per_position=8 * int(config.vocab_size),  # fp32 logits, then their log-softmax beside
        forward_bytes_per_token=fwd / tokens,
        block_matrices=matrices,
        block_inputs=inputs,
    )
