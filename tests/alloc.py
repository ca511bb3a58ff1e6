"""Peak live tensor bytes of a call on the CPU, to hold memory formulas (``harmsweep plan``, Wanda, low-rank,
perplexity chunks) against what the code really allocates.

Usage::

    from alloc import peak_bytes, Tracker

    extra = peak_bytes(lambda: model(ids))          # bytes above what was live when the call started
    with Tracker() as t:                            # or around a block, with the live count readable inside
        out = fn()
    t.peak, t.live                                  # peak above the start, bytes still held at exit

How: a TorchDispatchMode sees every op's outputs; each new tensor storage (the one Python object torch keeps per live storage) is
counted once with its ``nbytes``, and a ``weakref.finalize`` on the storage subtracts it when freed. Views
share their base's storage, so they cost nothing; in-place ops return an existing storage, counted already.
Storages that existed before the call (weights, inputs) are never counted. Works on CPU and on ``meta``
(where ``nbytes`` is what the storage would take). Autograd's backward on CPU runs on the calling thread, so
it is counted too;
the caching of allocators is not modelled (live bytes, not reserved bytes).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter

__all__ = ["Tracker", "peak_bytes"]


class Tracker(TorchDispatchMode):
    """Counts the bytes of tensor storages created inside the ``with`` block that are still alive.

    ``live``: bytes of storages created in the block and not yet freed; ``peak``: the largest ``live`` seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}  # id(storage) -> nbytes of storages this tracker counts

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def _count(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse / opaque tensors have no plain storage
            return
        nbytes, key = storage.nbytes(), id(storage)  # one Python object per live storage, views included
        if nbytes == 0 or key in self._seen:
            return
        self._seen[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(a.untyped_storage()) for a in tree_iter((args, kwargs or {})) if isinstance(a, torch.Tensor)}
        for t in tree_iter(out):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in inputs:
                self._count(t)  # a view or an in-place result shares an input's storage: no new bytes
        return out


def peak_bytes(fn: Callable[[], Any]) -> int:
    """The peak of live tensor bytes allocated by ``fn()`` above what was live when it started.

    The result of ``fn`` is dropped before returning, so what it returns counts in the peak only.
    """
    with Tracker() as tracker:
        fn()
    return tracker.peak
