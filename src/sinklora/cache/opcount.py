"""Counting the ATen operations a block of code dispatches: the decode-cost proxy of BENCHMARKS.md.

A small model decoding on a GPU is bound by kernel launches and the Python around them, not by FLOPs,
so what a KV-cache policy adds to a decoding step is best seen as operations. The count is exact and
deterministic (it does not depend on the machine's load), unlike a time::

    with OpCounter() as ops:
        model(input_ids=token, **cache_kw)
    ops.total, ops.kernels, ops.by_name()    # every op; ops that are not views; per op name

Views (slice, view, transpose, expand, ...) are dispatched too but launch no kernel: ``kernels``
leaves them out.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts every ATen operation dispatched inside the ``with`` block (nesting counts once)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()  # OpOverload -> calls

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        """Operations that are not views (each may launch a kernel on a GPU)."""
        return sum(n for func, n in self.ops.items() if not func.is_view)

    def by_name(self) -> Counter:
        """Calls per op name, e.g. ``{"aten.cat.default": 60, ...}``."""
        return Counter({str(func): n for func, n in self.ops.items()})
