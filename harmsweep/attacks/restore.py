"""Exact undo of a weight-changing attack: the values it will overwrite, kept in host memory and put back.

The attacks (refusal ablation, a merged LoRA fine-tune) change the model in place right before generation, and
the evaluation measures the model before and after pruning with and without them, so each attack must be undone
bit for bit afterwards. A snapshot of a mask holds only the selected entries (a refusal mask: about q of the
weights); a snapshot of whole parameters holds them entirely (a merged adapter touches every entry). Values are
copied in their own dtype (bits, -0.0 and NaN payloads included) to CPU memory, pinned when CUDA is there so the
copies run asynchronously, and written back into the parameters of the same names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType

import torch
from torch import nn

INDEX_BYTES = 8  # a mask's flat indices are int64


class WeightSnapshot:
    """The exact values of chosen weights of ``model``: flat ``indices`` per parameter name, or whole ``names``.

    Use as a context manager (restored on exit, also after an exception) or call ``restore()`` yourself; a snapshot
    restores once. Parameters are found by name at restore time, so an attack that wraps and unwraps modules (a
    PEFT merge) is undone as long as the names and shapes are the same again.
    """

    def __init__(
        self,
        model: nn.Module,
        indices: Mapping[str, torch.Tensor] | None = None,
        names: Iterable[str] | None = None,
    ) -> None:
        if (indices is None) == (names is None):
            raise ValueError("a WeightSnapshot takes either indices (a mask) or names (whole parameters)")
        self.model = model
        named = dict(model.named_parameters())
        chosen = dict(indices) if indices is not None else dict.fromkeys(names or ())
        missing = sorted(set(chosen) - set(named))
        if missing:
            raise KeyError(f"the model has no parameter {missing[0]}")
        self._indices: dict[str, torch.Tensor | None] = {}
        self._values: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, torch.Size] = {}
        pin = torch.cuda.is_available()
        with torch.no_grad():
            for name, idx in chosen.items():
                p = named[name]
                self._shapes[name] = p.shape
                if idx is None:
                    values = p.detach()
                else:
                    idx = idx.detach().to("cpu", torch.long).reshape(-1)
                    values = p.detach().reshape(-1)[idx.to(p.device)]
                self._indices[name] = idx
                self._values[name] = _host_copy(values, pin)
        if pin:
            torch.cuda.synchronize()  # the asynchronous device-to-host copies have landed before anything changes
        self.restored = False

    @classmethod
    def of_mask(cls, model: nn.Module, mask: Mapping[str, torch.Tensor]) -> WeightSnapshot:
        """The entries a mask selects (flat indices per parameter, as ``pruning.masks.apply_mask`` takes)."""
        return cls(model, indices=mask)

    @classmethod
    def of_parameters(cls, model: nn.Module, names: Iterable[str]) -> WeightSnapshot:
        """Whole parameters (what a merged LoRA adapter rewrites)."""
        return cls(model, names=names)

    @property
    def bytes(self) -> int:
        """Host memory this snapshot holds: the saved values and, for a mask, its int64 indices."""
        held = sum(v.numel() * v.element_size() for v in self._values.values())
        return held + sum(i.numel() * i.element_size() for i in self._indices.values() if i is not None)

    def restore(self) -> None:
        """Write every saved value back into the parameter of its name, bit for bit."""
        if self.restored:
            raise RuntimeError("this WeightSnapshot was already restored")
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, values in self._values.items():
                p = named.get(name)
                if p is None or p.shape != self._shapes[name] or p.dtype != values.dtype:
                    raise RuntimeError(f"cannot restore {name}: the model's parameter is gone or changed shape/dtype")
                idx = self._indices[name]
                if idx is None:
                    p.copy_(values.to(p.device, non_blocking=True))
                else:
                    flat = p.view(-1)
                    flat[idx.to(p.device, non_blocking=True)] = values.to(p.device, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the host buffers may be freed once this returns
        self.restored = True

    def __enter__(self) -> WeightSnapshot:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if not self.restored:
            self.restore()


def snapshot_bytes(
    params: Mapping[str, torch.Tensor], fraction: float | None = None, element_size: int | None = None
) -> int:
    """What a snapshot of ``params`` will hold, before it is made (for planning host memory).

    ``fraction`` None: whole parameters; else a mask of at most ``int(fraction * cols * rows)`` entries per matrix
    (the refusal attack's q), each entry its value plus an int64 index. ``element_size``: the dtype's bytes if the
    values are not the parameters' own (default: each parameter's).
    """
    total = 0
    for p in params.values():
        size = element_size or p.element_size()
        if fraction is None:
            total += p.numel() * size
        else:
            entries = int(fraction * p.shape[-1] * p.shape[0]) if p.dim() == 2 else int(fraction * p.numel())
            total += entries * (size + INDEX_BYTES)
    return total


def _host_copy(values: torch.Tensor, pin: bool) -> torch.Tensor:
    """A CPU copy in the same dtype; pinned (asynchronous copy) when CUDA is available and pinning succeeds."""
    if values.device.type == "cpu":
        return values.clone()
    try:
        out = torch.empty(values.shape, dtype=values.dtype, pin_memory=pin)
    except RuntimeError:  # pinned memory exhausted: a pageable copy is slower but as exact
        out = torch.empty(values.shape, dtype=values.dtype)
    return out.copy_(values, non_blocking=out.is_pinned())
