"""The inputs of the scored linear layers, recorded by forward pre-hooks and folded as they come.

Wanda's norms and ActSVD's Grams are sums over calibration tokens of functions of a layer's input rows,
so no activation is ever kept: each batch's rows go to ``fold`` and are dropped. The rows are picked by
indices found on the host once per batch, so no hook waits for the device. ``upto_layer`` stops the
forward after that decoder block, so the inputs of block l cost a partial pass (layer-by-layer methods).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterable, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from harmsweep.batches import trim_padding
from harmsweep.devices import input_device
from harmsweep.losses import IGNORE
from harmsweep.models.parts import LINEAR_TYPES, decoder_blocks

TOKENS = ("response", "all")  # response: labels != -100 (Wei et al.'s disentangle mode); all: attention_mask == 1


class _StopForwardError(Exception):
    """Raised after block ``upto_layer`` to end the forward early; never leaves fold_inputs."""


def linear_modules(model: nn.Module, names: Collection[str]) -> dict[str, nn.Module]:
    """The linear module of each weight in ``names`` (names as in model.named_parameters())."""
    param_names = {id(p): n for n, p in model.named_parameters()}
    wanted = set(names)
    found = {param_names[id(m.weight)]: m for m in model.modules()
             if isinstance(m, LINEAR_TYPES) and param_names.get(id(m.weight)) in wanted}  # fmt: skip
    missing = wanted - found.keys()
    if missing:
        raise ValueError(f"not the weight of a linear layer: {sorted(missing)[:3]}")
    return found


def fold_inputs(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    names: Collection[str],
    fold: Callable[[str, Tensor], None],
    tokens: str = "response",
    upto_layer: int | None = None,
    desc: str = "activations",
) -> None:
    """Call ``fold(name, x)`` with x (n_tokens, d_in), fp32 on the module's device: its input rows at ``tokens``.

    One no-grad forward per batch; hooks are removed whatever happens, and nothing else of the model changes.
    """
    if tokens not in TOKENS:
        raise ValueError(f"tokens={tokens} is not one of {', '.join(TOKENS)}")
    modules = linear_modules(model, names)
    device = input_device(model)
    # the current batch's (sample, position) pairs at ``tokens``, per device they are needed on: found on the
    # host once per batch, so the hooks gather a known number of rows (a boolean mask on the device would
    # cost a host sync per layer to learn the count)
    picks: dict[torch.device, Tensor] = {}

    def hook(name: str, args: tuple) -> None:
        x = args[0]
        if x.device not in picks:
            picks[x.device] = picks[device].to(x.device)  # device to device, once per batch
        at = picks[x.device]
        fold(name, x[at[0], at[1]].float())

    def stop(*_: object) -> None:
        raise _StopForwardError

    handles = [m.register_forward_pre_hook(lambda m, args, name=n: hook(name, args)) for n, m in modules.items()]
    try:
        if upto_layer is not None:
            _, blocks = decoder_blocks(model)
            if not 0 <= upto_layer < len(blocks):
                raise ValueError(f"upto_layer={upto_layer} is not a block index (0..{len(blocks) - 1})")
            handles.append(blocks[upto_layer].register_forward_hook(stop))
        with torch.no_grad():
            for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
                batch = trim_padding(batch)
                selected = batch["labels"] != IGNORE if tokens == "response" else batch["attention_mask"] == 1
                picks.clear()
                picks[device] = torch.stack(torch.nonzero(selected.cpu(), as_tuple=True)).to(device)
                with contextlib.suppress(_StopForwardError):
                    model(input_ids=batch["input_ids"].to(device),
                          attention_mask=batch["attention_mask"].to(device), use_cache=False)  # fmt: skip
    finally:
        for h in handles:
            h.remove()
