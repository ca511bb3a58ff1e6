"""Signed SNIP scores: S(w) = w * dL/dw for the linear weights inside the decoder blocks.

Zeroing w changes the loss by about -S(w) (first-order Taylor), so S < 0 marks weights that
support the calibration responses. S is linear in the gradient, so one backward pass of the mean
loss over a batch gives the sum of per-sample scores: one forward+backward per batch scores every
layer at once. Gradients are folded into fp32 score buffers by a post-accumulate hook and freed at
once, so memory stays at weights + one score buffer + activations. fp16 weights get a scaled loss
(``_LossScale``): the gradient of loss/n underflows in fp16, and is unscaled only in the fp32 fold.

``scoring.accumulate=bf16`` instead reproduces the B-TAP authors' arithmetic bit for bit (``bf16_snip``): one
example per pass, each example's gradient rounded to bf16 and summed in a bf16 buffer, W * G formed in bf16.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from harmsweep.batches import trim_padding
from harmsweep.devices import input_device
from harmsweep.errors import HarmsweepError
from harmsweep.losses import DEFAULT_LOGITS_CHUNK, IGNORE, response_nll
from harmsweep.models.parts import decoder_blocks, scored_parameters
from harmsweep.scoring.spec import ScoringOptions

Batch = Mapping[str, torch.Tensor]


def signed_snip(
    model: nn.Module,
    batches: Iterable[Batch],
    n_samples: int,
    desc: str = "signed SNIP",
    options: ScoringOptions | None = None,
    names: Collection[str] | None = None,
    logits_chunk: int = DEFAULT_LOGITS_CHUNK,
) -> dict[str, torch.Tensor]:
    """S = w * dL/dw with L the mean over all samples of their token-mean response NLL (fp32).

    Each buffer sits beside its weight (so a model spread over GPUs scores in place) until the set
    is complete, then leaves the GPU (``options.offload``). ``names``: score only these weights (the
    backward then stops at the lowest of them: sequential pruning's partial passes).
    """
    options = options or ScoringOptions()
    if options.accumulate == "bf16":
        return bf16_snip(model, batches, False, desc, options, names)
    params = _params(model, names)
    scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}

    def fold(name: str, p: nn.Parameter, grad: torch.Tensor, unscale: float) -> None:
        scores[name].addcmul_(p.detach(), grad, value=unscale)  # in fp32: the product is exact

    def loss_of(batch: Batch) -> torch.Tensor:
        return _batch_nll(model, batch, logits_chunk).sum() / n_samples

    _backward_each(model, params, batches, loss_of, fold, desc, options.gradient_checkpointing)
    return _offloaded(scores) if options.offload else scores


def unsigned_snip(
    model: nn.Module,
    batches: Iterable[Batch],
    desc: str = "unsigned SNIP",
    options: ScoringOptions | None = None,
    names: Collection[str] | None = None,
    logits_chunk: int = DEFAULT_LOGITS_CHUNK,
) -> dict[str, torch.Tensor]:
    """Wei et al.'s score |w| * sum_i |dL_i/dw|: needs one backward per sample, so batches are split."""
    options = options or ScoringOptions()
    if options.accumulate == "bf16":
        return bf16_snip(model, batches, True, desc, options, names)
    params = _params(model, names)
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}

    def fold(name: str, p: nn.Parameter, grad: torch.Tensor, unscale: float) -> None:
        sums[name].add_(grad.abs(), alpha=unscale)

    _backward_each(model, params, _samples(batches), lambda b: _batch_nll(model, b, logits_chunk).sum(), fold, desc,
                   options.gradient_checkpointing)  # fmt: skip
    scores = {n: s.mul_(params[n].detach().abs()) for n, s in sums.items()}
    return _offloaded(scores) if options.offload else scores


def bf16_snip(
    model: nn.Module,
    batches: Iterable[Batch],
    unsigned: bool,
    desc: str = "bf16 SNIP",
    options: ScoringOptions | None = None,
    names: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The authors' scores (scoring.accumulate=bf16): S = W * sum_i g_i, or unsigned |W| * sum_i |g_i|, in bf16.

    Batch of one, in the order given (a bf16 sum depends on it): each example's loss is transformers' own
    causal-LM loss (mean over its response tokens; summed over examples, not averaged), with no attention mask,
    as theirs. Each g_i is rounded to bf16 (the model's dtype for them), added into a bf16 buffer (every addition
    rounded), and the product is taken in bf16; the scores come back as fp32, which holds bf16 values exactly.
    An fp16 model's loss scale is undone exactly (a power of two, in fp32) before the rounding to bf16.
    """
    options = options or ScoringOptions()
    params = _params(model, names)
    sums = {n: torch.zeros_like(p, dtype=torch.bfloat16) for n, p in params.items()}

    def fold(name: str, p: nn.Parameter, grad: torch.Tensor, unscale: float) -> None:
        g = grad.to(torch.bfloat16) if unscale == 1.0 else grad.float().mul_(unscale).to(torch.bfloat16)
        sums[name].add_(g.abs() if unsigned else g)

    _backward_each(model, params, _samples(batches), lambda b: _example_loss(model, b), fold, desc,
                   options.gradient_checkpointing)  # fmt: skip
    scores = {}
    for n in params:
        w = params[n].detach().to(torch.bfloat16)
        product = sums.pop(n).mul_(w.abs() if unsigned else w)  # bf16 * bf16, rounded to bf16
        scores[n] = product.float()
        del product, w
    return _offloaded(scores) if options.offload else scores


def _samples(batches: Iterable[Batch]) -> Iterator[Batch]:
    """Each sample of each batch as a batch of one, in order (_backward_each trims the padding)."""
    for batch in batches:
        for i in range(batch["input_ids"].size(0)):
            yield {k: v[i : i + 1] for k, v in batch.items()}


def _example_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """One unpadded example's loss as the authors take it: ``model(input_ids, labels=...).loss``, no mask."""
    labels = batch["labels"]
    if bool((labels[:, 1:] == IGNORE).all()):
        raise ValueError("a sample has no response tokens to score")
    device = input_device(model)
    return model(input_ids=batch["input_ids"].to(device), labels=labels.to(device), use_cache=False).loss


def wanda(
    model: nn.Module,
    batches: Iterable[Batch],
    desc: str = "Wanda",
    options: ScoringOptions | None = None,
    names: Collection[str] | None = None,
    upto_layer: int | None = None,
) -> Mapping[str, torch.Tensor]:
    """Wanda's score |W_ij| * ||x_j||, with ||x_j||^2 the mean over calibration response tokens of input j squared.

    One forward pass per batch and no backward (hooks on the linear inputs, fp32 sums), so it costs about a
    third of a SNIP pass. Only the scale differs from Wanda's per-sample mean, and no ranking depends on it.
    ``upto_layer``: the forward stops after that block (sequential pruning scores one layer per pass).
    With ``options.offload`` each fp32 score leaves the device before the next is made; without it the
    scores are made on demand on the weight's device (``WandaScores``). Either way one fp32 matrix at a
    time is on the GPU, not the whole set (42 GiB at 8B).
    """
    options = options or ScoringOptions()
    if options.accumulate == "bf16":
        raise HarmsweepError("scoring.accumulate=bf16 emulates SNIP's gradient sums: Wanda has none (use fp32)")
    from harmsweep.models.activations import fold_inputs

    params = _params(model, names)
    rows = scored_parameters(model)
    squares = {n: torch.zeros(_in_features(p, rows[n].rows_dim), dtype=torch.float32, device=p.device)
               for n, p in params.items()}  # fmt: skip
    tokens = dict.fromkeys(params, 0)

    def fold(name: str, x: torch.Tensor) -> None:
        squares[name].add_(x.pow(2).sum(0))
        tokens[name] += x.size(0)

    fold_inputs(model, batches, params, fold, upto_layer=upto_layer, desc=desc)
    norms = {}
    for n in params:
        norm = squares.pop(n).div_(max(tokens[n], 1)).sqrt_()
        norms[n] = norm.unsqueeze(0) if rows[n].rows_dim == 0 else norm.unsqueeze(1)  # Conv1D stores (in, out)
    lazy = WandaScores(params, norms)
    if not options.offload:
        return lazy
    scores = {}
    for n in params:
        score = lazy[n]
        scores[n] = score.to("cpu")
        del score  # before the next matrix is made
    _empty_cache()
    return scores


class WandaScores(Mapping[str, torch.Tensor]):
    """Wanda scores made on demand, |W| * ||x|| on the weight's device: a reader that takes one matrix at a
    time (the score writer) never holds more than one fp32 matrix. Valid while the weights are unchanged."""

    def __init__(self, params: Mapping[str, nn.Parameter], norms: Mapping[str, torch.Tensor]) -> None:
        self.params, self.norms = params, norms

    def __getitem__(self, name: str) -> torch.Tensor:
        p = self.params[name]
        return torch.empty_like(p, dtype=torch.float32).copy_(p.detach()).abs_().mul_(self.norms[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


def score_kind(
    model: nn.Module,
    kind: str,
    batches: list[Batch],
    n_samples: int,
    options: ScoringOptions | None = None,
    names: Collection[str] | None = None,
    upto_layer: int | None = None,
    logits_chunk: int = DEFAULT_LOGITS_CHUNK,
) -> Mapping[str, torch.Tensor]:
    """The scores of a set of ``kind`` (harm_* or benign_*: signed SNIP, ``*_unsigned``, ``*_wanda``).

    ``names``/``upto_layer`` restrict it to one layer's weights (sequential pruning); a SNIP backward stops
    at the lowest scored weight by itself, a Wanda forward stops after ``upto_layer``. ``logits_chunk``
    (``model.logits_chunk``): positions whose fp32 logits a SNIP loss holds at once.
    """
    options = options or ScoringOptions()
    desc = f"scoring {kind}"
    if kind.endswith("wanda"):
        return wanda(model, batches, desc, options, names, upto_layer)
    if kind.endswith("unsigned"):
        return unsigned_snip(model, batches, desc, options, names, logits_chunk)
    return signed_snip(model, batches, n_samples, desc, options, names, logits_chunk)


def _in_features(p: torch.Tensor, rows_dim: int) -> int:
    return p.size(1) if rows_dim == 0 else p.size(0)


def _offloaded(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move the buffers to host memory one at a time, so GPU memory falls as the host copy grows."""
    for name, t in scores.items():
        if t.device.type != "cpu":
            scores[name] = t.to("cpu")
            del t
    _empty_cache()
    return scores


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def checkpointed(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Recompute each decoder block in backward instead of keeping its activations.

    Wraps the blocks' forward with non-reentrant torch checkpointing rather than transformers'
    switch, which only acts in train mode (and so would turn dropout on). What is wrapped is the
    forward the instance has now: with ``device_map=auto`` that is accelerate's hooked forward, so its
    device moves run inside the checkpointed region and again in recomputation; afterwards that same
    object is put back (deleting it would drop the hooks and send tensors to the wrong GPU).
    """
    if not enabled:
        yield
        return
    _, blocks = decoder_blocks(model)
    own = [block.__dict__.get("forward") for block in blocks]  # an instance forward (accelerate's) or None
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block, forward in zip(blocks, own, strict=True):
            if forward is None:
                del block.forward  # the class's forward shows through again
            else:
                block.forward = forward


def _params(model: nn.Module, names: Collection[str] | None = None) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters())
    return {n: named[n] for n in scored_parameters(model) if names is None or n in names}


def _batch_nll(model: nn.Module, batch: Batch, logits_chunk: int = DEFAULT_LOGITS_CHUNK) -> torch.Tensor:
    """Each sample's response NLL; forward and backward hold one chunk of ``logits_chunk`` positions' fp32 logits.

    Labels stay where the batch has them (the host): the loss finds the labelled positions there, without a sync.
    """
    device = input_device(model)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    return response_nll(model, ids, mask, batch["labels"], logits_chunk=logits_chunk)


class _LossScale:
    """Dynamic loss scale for fp16 gradients: start high, halve on any inf/nan and redo that batch.

    The gradient of loss/n underflows to exact zeros in fp16; scaling the loss by a power of two keeps it
    representable, and the fp32 fold divides it back out exactly. A weight whose gradient overflowed folds
    nothing in that pass; the batch is redone at half the scale for those weights only, so every batch
    counts once. Other dtypes get scale 1 and no checks.
    """

    START = 2.0**16
    FLOOR = 1.0  # overflow even unscaled: fp16 cannot score this model

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.scale = self.START if enabled else 1.0

    def guard(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``grad`` or zeros where it is not all finite, and the device flag saying which (no host read)."""
        if not self.enabled:
            return grad, None
        ok = torch.isfinite(grad).all()
        return torch.where(ok, grad, 0), ok

    def overflowed(self, flags: Mapping[str, torch.Tensor]) -> list[str]:
        """The names whose gradients were not finite (one host read per pass); backs off if any."""
        if not flags:
            return []
        first = next(iter(flags.values())).device
        ok = torch.stack([f.to(first) for f in flags.values()]).tolist()
        bad = [n for n, good in zip(flags, ok, strict=True) if not good]
        if bad:
            self.scale /= 2
            if self.scale < self.FLOOR:
                raise HarmsweepError(f"fp16 gradients of {bad[0]} are not finite even unscaled: score in bfloat16")
        return bad


def _backward_each(model, params, batches, loss_of, fold, desc: str, checkpointing: bool = False) -> None:
    """Run loss_of(batch).backward() per batch with only ``params`` requiring grad; fold grads as they land.

    ``fold(name, p, grad, unscale)`` adds ``grad * unscale`` (times what it needs of p) to its fp32 buffer.
    """
    previous = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    scaler = _LossScale(any(p.dtype == torch.float16 for p in params.values()))
    pending: set[str] = set(params)  # the weights this pass folds (all but in a redo after an overflow)
    flags: dict[str, torch.Tensor] = {}

    def landed(name: str, p: nn.Parameter) -> None:
        if name in pending:
            grad, ok = scaler.guard(p.grad)
            if ok is not None:
                flags[name] = ok
            fold(name, p, grad, 1.0 / scaler.scale)
        p.grad = None

    handles = []
    for name, p in params.items():
        p.requires_grad_(True)
        p.grad = None
        handles.append(p.register_post_accumulate_grad_hook(lambda p, name=name: landed(name, p)))
    try:
        with checkpointed(model, checkpointing):
            for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
                batch = trim_padding(batch)
                pending.clear()
                pending.update(params)
                while pending:
                    flags.clear()
                    (loss_of(batch) * scaler.scale).backward()
                    pending.intersection_update(scaler.overflowed(flags))
    finally:
        for h in handles:
            h.remove()
        for p, flag in previous.items():
            p.requires_grad_(flag)
            p.grad = None
