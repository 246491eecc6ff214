"""Counting the large tensors an operation allocates (a plain helper module; no tests).

``with large_allocations(numel) as found: ...`` records every tensor of at least
``numel`` elements that a torch operator creates inside the block with new memory
(views, and operators that return their input, are not allocations), as
``(operator name, shape)``. The fused backends may allocate one N x C tensor, the
gradient, and nothing else of that size (the issues' memory rule): a copy of an input,
a float copy of the targets or a gradient made where none is needed shows up here.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LargeAllocations(TorchDispatchMode):
    def __init__(self, numel: int):
        super().__init__()
        self.numel = numel
        self.found: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.numel() > 0}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel \
                    and t.untyped_storage().data_ptr() not in inputs:
                self.found.append((str(func.overloadpacket.__name__), tuple(t.shape)))
        return out


@contextlib.contextmanager
def large_allocations(numel: int):
    mode = _LargeAllocations(numel)
    with mode:
        yield mode.found
