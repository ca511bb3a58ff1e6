"""The device audit: run a call under a dispatch mode that fails on any op mixing devices.

There is no GPU here. Tensors that would sit on a GPU are put on ``meta`` instead, and every aten op is
watched: an op whose tensor arguments sit on two devices is the device error a GPU job would hit.
0-dim CPU tensors pass as plain scalars (CUDA accepts them as values), except where CUDA rejects them:
as a boolean mask, or as an index. PyTorch's FakeTensorMode is no substitute: on this CPU build it
accepts a 0-dim CPU mask on a fake ``cuda`` tensor that real CUDA rejects.

Meta tensors hold no data, so an audited call stops at the first op that must read values (``.item()``,
``nonzero`` sizes, ``bool(...)``); ``audit`` treats that stop as the end of the run. Where values matter,
tests keep the values on the CPU and audit a twin of the call on ``meta``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

AUDIT_DEVICE = "meta"
# ops whose integer tensor arguments are indices: CUDA wants them on the data's device even when 0-dim
_INDEXING = ("index", "index_put", "index_select", "gather", "scatter", "take", "index_add", "index_fill", "put")


class DeviceAudit(TorchDispatchMode):
    """Records aten ops whose tensor arguments span more than one device (CPU scalars excepted where CUDA allows)."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[str] = []
        self.devices: set[str] = set()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.ops += 1
        devices = {t.device.type for t in tensors if not _cpu_scalar_allowed(t, func)}
        self.devices |= devices
        if len(devices) > 1:
            self.mixed.append(f"{func}: {sorted(devices)}")
        return func(*args, **kwargs)


def _cpu_scalar_allowed(t: torch.Tensor, func: Any) -> bool:
    """A 0-dim CPU tensor is a scalar CUDA takes as a value, but never as a mask or an index."""
    if t.device.type != "cpu" or t.dim() != 0:
        return False
    if t.dtype == torch.bool:
        return False
    op = str(func).split(".")[1] if "." in str(func) else str(func)
    return not (op.rstrip("_") in _INDEXING and not t.is_floating_point())


_bincount = torch.bincount


def _meta_bincount(values: torch.Tensor, weights=None, minlength: int = 0) -> torch.Tensor:
    """torch.bincount has no meta kernel; on meta, an op of the same shape and device stands in."""
    if values.device.type != "meta":
        return _bincount(values, weights, minlength)
    return torch.zeros(minlength, dtype=torch.int64, device=values.device).index_add_(
        0, values, torch.ones_like(values)
    )


@contextmanager
def meta_capable(monkeypatch) -> Any:
    """Let meta tensors go through bincount and boolean indexing (shapes only)."""
    import torch.fx.experimental._config as fx_config

    monkeypatch.setattr(torch, "bincount", _meta_bincount)
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


def audit(fn: Callable[[], object]) -> DeviceAudit:
    """Run ``fn`` under the audit; a stop because meta holds no values ends the run, a device error is recorded."""
    watch = DeviceAudit()
    with watch:
        try:
            fn()
        except (RuntimeError, NotImplementedError) as exc:
            message = str(exc)
            if "same device" in message or ("device" in message and "expected" in message.lower()):
                watch.mixed.append(message.splitlines()[0])
            elif "meta" not in message and "data-dependent" not in message:
                raise
    return watch


def assert_one_device(watch: DeviceAudit, device: str = AUDIT_DEVICE) -> None:
    """The audited call ran on ``device`` and mixed no devices."""
    assert device in watch.devices, f"nothing ran on {device}"
    assert watch.mixed == [], "\n".join(watch.mixed[:5])
