"""Fine-tuning on (prompt, response) pairs: LoRA (peft) or full, optionally with a fixed pruning mask.

Three experiments train: the safety fine-tune that derives an aligned variant, the emergent-misalignment
fine-tune, and recovery of a pruned model. The loss is the scoring loss (response tokens only), so what
is trained and what is scored mean the same thing. With ``frozen`` (a pruning mask), the pruned weights
stay exactly zero *during* training, not only after it: for LoRA a forward hook removes the adapter's
contribution at the pruned positions (the effective weight W + BA is zero there), and the merge zeroes
them again; for full fine-tuning their gradients are zeroed and the weights re-zeroed after each step.

Low-precision (bf16/fp16) trainable weights are stepped through fp32 master copies: an AdamW update of
~lr is below bf16's spacing for most weights and would round away. Full fine-tuning then holds
``full_state_bytes`` (18 bytes per bf16 parameter: the weights, fp32 masters, fp32 gradients, AdamW's
two fp32 moments) beside the activations: 144 GB at 8B, more than one 80 GB card, so it is refused in
one line where the model's GPUs cannot hold it; LoRA trains the adapters only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from harmsweep.alignment.spec import FinetuneSpec
from harmsweep.devices import input_device
from harmsweep.errors import HarmsweepError
from harmsweep.losses import response_nll
from harmsweep.models.parts import scored_parameters
from harmsweep.pruning.masks import apply_mask

log = logging.getLogger(__name__)
ADAPTER = "default"
Tensors = Mapping[str, torch.Tensor]
CHUNK = 1 << 24  # elements of a (tokens, masked entries) block the LoRA mask correction holds at once
LOW_PRECISION = (torch.float16, torch.bfloat16)


StepHook = Callable[[int, float], None]  # (optimizer step just finished, its mean loss)


def finetune(
    model: nn.Module,
    tensors: Tensors,
    spec: FinetuneSpec,
    *,
    frozen: Mapping[str, torch.Tensor] | None = None,
    on_step: StepHook | None = None,
) -> list[float]:
    """Train ``model`` in place on the labelled pairs; returns the loss of every optimizer step.

    LoRA adapters are merged back, so the caller gets a plain model of the same class to score, prune,
    evaluate or save. ``on_step`` sees the model mid-training (adapters active), e.g. for recovery curves.
    """
    spec.validate()
    frozen = {k: v for k, v in (frozen or {}).items() if v.numel()}
    if frozen and spec.method == "lora" and spec.dropout > 0:
        raise HarmsweepError(
            "a fixed mask with LoRA needs finetune.dropout=0 (the masked delta must see the same input)"
        )
    named = dict(model.named_parameters())
    # on each weight's device once: hooks and the per-step re-zeroing never copy indices from the host again
    frozen = {k: v.to(named[k].device) if k in named else v for k, v in frozen.items()}
    if frozen:  # training starts from the pruned model, whatever the caller passed
        apply_mask(model, frozen)
    if spec.steps(tensors["input_ids"].size(0)) == 0:
        return []
    if spec.method == "lora":
        return _train_lora(model, tensors, spec, frozen, on_step)
    return _train_full(model, tensors, spec, frozen, on_step)


def _targets(model: nn.Module, spec: FinetuneSpec) -> list[str]:
    """Module names to adapt: the scored linear layers, optionally only some module types."""
    params = scored_parameters(model)
    wanted = set(spec.targets)
    names = [n.removesuffix(".weight") for n, p in params.items() if not wanted or p.module_type in wanted]
    if not names:
        raise HarmsweepError(f"finetune.targets={spec.targets} matches no linear layer of the model")
    return names


def _train_lora(model: nn.Module, tensors: Tensors, spec: FinetuneSpec, frozen, on_step) -> list[float]:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        use_rslora=spec.rslora,
        target_modules=_targets(model, spec),
        bias="none",
    )
    torch.manual_seed(spec.seed)  # adapter initialisation
    peft_model = get_peft_model(model, config)
    hooks = [_mask_hook(module, frozen[name]) for name, module in _lora_layers(peft_model, frozen)]
    try:
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        losses = _loop(peft_model, trainable, tensors, spec, on_step, after_step=None)
    finally:
        for hook in hooks:
            hook.remove()
    merged = peft_model.merge_and_unload()
    if merged is not model:
        raise RuntimeError("peft returned a new model object; the in-place contract is broken")
    for p in model.parameters():
        p.requires_grad_(True)
    apply_mask(model, frozen)  # the merge added BA at the pruned positions; the trained model had zeros there
    return losses


def _lora_layers(peft_model: nn.Module, frozen: Mapping[str, torch.Tensor]):
    """(weight name as in the plain model, LoRA layer) for every adapted layer holding pruned weights."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.base_model.model.named_modules():
        weight = f"{name}.weight"
        if isinstance(module, LoraLayer) and weight in frozen:
            yield weight, module
    missing = set(frozen) - {f"{n}.weight" for n, m in peft_model.base_model.model.named_modules()}
    if missing:
        raise HarmsweepError(f"mask names weights the model does not have (first: {sorted(missing)[0]})")


def _mask_hook(layer: nn.Module, flat: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
    """Subtract the adapter's output at the pruned positions: y_i -= (s * B A)_ij x_j for each pruned (i, j).

    The indices move to the layer's device once, here; the correction keeps nothing per masked entry
    for backward (``_MaskedDelta``).
    """
    weight = layer.get_base_layer().weight
    flat = flat.to(weight.device, torch.int64)
    a, b = flat // weight.shape[1], flat % weight.shape[1]
    out_idx, in_idx = (b, a) if getattr(layer, "fan_in_fan_out", False) else (a, b)
    out_features = int(weight.shape[1] if getattr(layer, "fan_in_fan_out", False) else weight.shape[0])

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0].to(output.dtype)
        correction = _MaskedDelta.apply(
            x.reshape(-1, x.shape[-1]), module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight,
            out_idx, in_idx, float(module.scaling[ADAPTER]), out_features,
        )  # fmt: skip
        return output - correction.view(output.shape)

    return layer.register_forward_hook(hook)


def _entries(lora_a: torch.Tensor, lora_b: torch.Tensor, o: torch.Tensor, i: torch.Tensor, scale: float):
    """(s * B A)[o, i] for the given entries only, in fp32: (K,) from K x r gathers."""
    return (lora_b[o].float() * lora_a[:, i].T.float()).sum(-1) * scale


def _chunks(out_idx: torch.Tensor, in_idx: torch.Tensor, rows: int, rank: int):
    """Slices of the masked entries sized so a (rows, entries) block holds about CHUNK elements."""
    step = max(1, CHUNK // max(rows, rank, 1))
    for start in range(0, out_idx.numel(), step):
        yield out_idx[start : start + step], in_idx[start : start + step]


class _MaskedDelta(torch.autograd.Function):
    """x @ D^T with D = s * B A at the K masked entries and zero elsewhere, a chunk of entries at a time.

    Neither the dense (out, in) delta nor a (tokens, K) gather is kept: backward keeps only x (the layer's
    own input), A, B and the indices, and recomputes D's entries. On a GPU nothing here leaves the device.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, out_idx, in_idx, scale: float, out_features: int):  # type: ignore[override]
        out = x.new_zeros(x.shape[0], out_features)
        for o, i in _chunks(out_idx, in_idx, x.shape[0], lora_a.shape[0]):
            out.index_add_(1, o, x[:, i] * _entries(lora_a, lora_b, o, i, scale).to(x.dtype))
        ctx.save_for_backward(x, lora_a, lora_b, out_idx, in_idx)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, lora_a, lora_b, out_idx, in_idx = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_a = torch.zeros_like(lora_a, dtype=torch.float32) if need_a else None
        grad_b = torch.zeros_like(lora_b, dtype=torch.float32) if need_b else None
        for o, i in _chunks(out_idx, in_idx, x.shape[0], lora_a.shape[0]):
            g = grad[:, o]
            if grad_x is not None:
                grad_x.index_add_(1, i, g * _entries(lora_a, lora_b, o, i, ctx.scale).to(g.dtype))
            if grad_a is None and grad_b is None:
                continue
            d = (g.float() * x[:, i].float()).sum(0) * ctx.scale  # dL/d(BA)[o, i], times s
            if grad_b is not None:
                grad_b.index_add_(0, o, d[:, None] * lora_a[:, i].T.float())
            if grad_a is not None:
                grad_a.index_add_(1, i, (d[:, None] * lora_b[o].float()).T)
        grad_a = None if grad_a is None else grad_a.to(lora_a.dtype)
        grad_b = None if grad_b is None else grad_b.to(lora_b.dtype)
        return grad_x, grad_a, grad_b, None, None, None, None


def full_state_bytes(n_params: int, param_bytes: int) -> int:
    """Bytes full fine-tuning holds per run beside activations: weights, fp32 gradients, AdamW's two fp32
    moments, and fp32 master weights where the weights are bf16/fp16 (18 bytes per bf16 parameter)."""
    master = 4 if param_bytes < 4 else 0
    return n_params * (param_bytes + master + 4 + 8)


def check_full_fits(n_params: int, param_bytes: int, capacity: int) -> None:
    """Refuse full fine-tuning in one line where the model's GPUs (``capacity`` bytes) cannot hold its state."""
    need = full_state_bytes(n_params, param_bytes)
    if need > capacity:
        raise HarmsweepError(
            f"finetune.method=full needs ~{need / 1e9:.0f} GB for {n_params / 1e9:.1f}B parameters (weights, fp32 "
            f"master weights, gradients and AdamW states: {need // n_params} bytes each) beside activations, and "
            f"the model's GPUs have {capacity / 1e9:.0f} GB: use finetune.method=lora, or spread the model over "
            "more GPUs (model.device_map=auto)"
        )


def _train_full(model: nn.Module, tensors: Tensors, spec: FinetuneSpec, frozen, on_step) -> list[float]:
    named = dict(model.named_parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    gpus = {p.device for p in trainable if p.device.type == "cuda"}
    if gpus:  # before any state is allocated
        capacity = sum(torch.cuda.get_device_properties(d).total_memory for d in gpus)
        check_full_fits(sum(p.numel() for p in trainable), max(p.element_size() for p in trainable), capacity)
    handles = []
    for name, flat in frozen.items():
        idx = flat.long().to(named[name].device)

        def zero_grad_at(grad: torch.Tensor, idx: torch.Tensor = idx) -> torch.Tensor:
            grad = grad.clone()
            grad.view(-1)[idx] = 0
            return grad

        handles.append(named[name].register_hook(zero_grad_at))
    try:
        return _loop(model, trainable, tensors, spec, on_step, after_step=lambda: apply_mask(model, frozen))
    finally:
        for handle in handles:
            handle.remove()


def _masters(trainable: list[nn.Parameter]) -> tuple[dict[nn.Parameter, torch.Tensor], list[Any]]:
    """fp32 master copies of the bf16/fp16 weights (on their devices) that AdamW steps, and the hooks that move
    each gradient into its master as soon as it is accumulated (so no low-precision gradient is summed)."""
    masters = {p: p.detach().float().requires_grad_(True) for p in trainable if p.dtype in LOW_PRECISION}

    def move(p: nn.Parameter) -> None:
        master = masters[p]
        grad = p.grad.float()
        master.grad = grad if master.grad is None else master.grad.add_(grad)
        p.grad = None

    return masters, [p.register_post_accumulate_grad_hook(move) for p in masters]


def _trimmed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without the trailing columns that are padding in every row: the pairs are padded to the longest
    of the whole set, and a batch of short pairs (refusals) need not pay for the longest benign answer."""
    used = batch["attention_mask"].any(dim=0).nonzero()
    width = int(used[-1]) + 1 if used.numel() else 1
    return {k: v[:, :width] for k, v in batch.items()}


def _loop(model, trainable, tensors: Tensors, spec: FinetuneSpec, on_step, after_step) -> list[float]:
    """AdamW with linear warmup/decay; each optimizer step averages grad_accum micro-batches."""
    n = tensors["input_ids"].size(0)
    total = spec.steps(n)
    device = input_device(model)
    masters, hooks = _masters(trainable)
    stepped = [masters.get(p, p) for p in trainable]
    optimizer = torch.optim.AdamW(stepped, lr=spec.lr, weight_decay=spec.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, spec.warmup_steps, total)
    generator = torch.Generator().manual_seed(spec.seed)
    perms = [torch.randperm(n, generator=generator) for _ in range(spec.epochs)]  # one shuffle per epoch
    batches = iter([perm[start : start + spec.batch_size] for perm in perms for start in range(0, n, spec.batch_size)])
    model.train()
    losses: list[float] = []
    try:
        for step in range(total):
            summed: Any = 0.0  # on the loss's device: one host read per step, after the step
            for _ in range(spec.grad_accum):
                order = next(batches, None)
                if order is None:
                    break
                batch = _trimmed({k: v[order] for k, v in tensors.items()})  # labels stay on the host: no sync
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                loss = response_nll(model, ids, mask, batch["labels"]).mean() / spec.grad_accum
                loss.backward()
                summed = loss.detach() + summed
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, master in masters.items():
                    p.copy_(master)
            if after_step is not None:
                after_step()
            step_loss = float(summed)
            losses.append(step_loss)
            log.info("fine-tune step %d/%d: loss %.4f", step + 1, total, step_loss)
            if on_step is not None:
                model.eval()
                with torch.no_grad():
                    on_step(step + 1, step_loss)
                model.train()
    finally:
        for hook in hooks:
            hook.remove()
        model.eval()
    return losses
