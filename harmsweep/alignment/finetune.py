"""Fine-tuning on (prompt, response) pairs: LoRA (peft) or full, optionally with a fixed pruning mask.

Three experiments train: the safety fine-tune that derives an aligned variant, the emergent-misalignment
fine-tune, and recovery of a pruned model. The loss is the scoring loss (response tokens only), so what
is trained and what is scored mean the same thing. With ``frozen`` (a pruning mask), the pruned weights
stay exactly zero *during* training, not only after it: for LoRA a forward hook removes the adapter's
contribution at the pruned positions (the effective weight W + BA is zero there), and the merge zeroes
them again; for full fine-tuning their gradients are zeroed and the weights re-zeroed after each step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from harmsweep.alignment.spec import FinetuneSpec
from harmsweep.devices import input_device
from harmsweep.errors import HarmsweepError
from harmsweep.losses import per_sample_nll
from harmsweep.models.parts import scored_parameters
from harmsweep.pruning.masks import apply_mask

log = logging.getLogger(__name__)
ADAPTER = "default"
Tensors = Mapping[str, torch.Tensor]


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
    """Subtract the adapter's output at the pruned positions: y_i -= (s * B A)_ij x_j for each pruned (i, j)."""
    shape = layer.get_base_layer().weight.shape
    a, b = flat.long() // shape[1], flat.long() % shape[1]
    out_idx, in_idx = (b, a) if getattr(layer, "fan_in_fan_out", False) else (a, b)

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        lora_a = module.lora_A[ADAPTER].weight  # (r, in)
        lora_b = module.lora_B[ADAPTER].weight  # (out, r)
        o, i = out_idx.to(output.device), in_idx.to(output.device)
        delta = (lora_b[o] * lora_a[:, i].T).sum(-1) * module.scaling[ADAPTER]
        x = args[0].to(output.dtype)
        return output.index_add(-1, o, x[..., i] * delta.to(output.dtype), alpha=-1)

    return layer.register_forward_hook(hook)


def _train_full(model: nn.Module, tensors: Tensors, spec: FinetuneSpec, frozen, on_step) -> list[float]:
    named = dict(model.named_parameters())
    handles = []
    for name, flat in frozen.items():
        idx = flat.long().to(named[name].device)

        def zero_grad_at(grad: torch.Tensor, idx: torch.Tensor = idx) -> torch.Tensor:
            grad = grad.clone()
            grad.view(-1)[idx] = 0
            return grad

        handles.append(named[name].register_hook(zero_grad_at))
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        return _loop(model, trainable, tensors, spec, on_step, after_step=lambda: apply_mask(model, frozen))
    finally:
        for handle in handles:
            handle.remove()


def _loop(model, trainable, tensors: Tensors, spec: FinetuneSpec, on_step, after_step) -> list[float]:
    """AdamW with linear warmup/decay; each optimizer step averages grad_accum micro-batches."""
    n = tensors["input_ids"].size(0)
    total = spec.steps(n)
    device = input_device(model)
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=spec.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, spec.warmup_steps, total)
    generator = torch.Generator().manual_seed(spec.seed)
    perms = [torch.randperm(n, generator=generator) for _ in range(spec.epochs)]  # one shuffle per epoch
    batches = iter([perm[start : start + spec.batch_size] for perm in perms for start in range(0, n, spec.batch_size)])
    model.train()
    losses: list[float] = []
    try:
        for step in range(total):
            step_loss = 0.0
            for _ in range(spec.grad_accum):
                order = next(batches, None)
                if order is None:
                    break
                batch = {k: v[order].to(device) for k, v in tensors.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = per_sample_nll(logits, batch["labels"]).mean() / spec.grad_accum
                loss.backward()
                step_loss += float(loss.detach())
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            losses.append(step_loss)
            log.info("fine-tune step %d/%d: loss %.4f", step + 1, total, step_loss)
            if on_step is not None:
                model.eval()
                with torch.no_grad():
                    on_step(step + 1, step_loss)
                model.train()
    finally:
        model.eval()
    return losses
