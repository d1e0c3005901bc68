"""Hot-path counters: dispatched operations and device-to-host reads, a deterministic proxy for speed.

On a GPU every read of a tensor's value by the host (``.item()``, ``bool(t)``, ``.tolist()``,
``.cpu()``, ``nonzero``, ``repeat_interleave`` without ``output_size``, ...) waits for all queued
kernels: the device idles while Python catches up. Every dispatched operation costs a kernel launch
and Python work. Both can be counted on CPU, where they are deterministic, with PyTorch's mode hooks::

    with OpCounter() as c:
        model(ids, labels=ids).loss.backward()
    c.ops, c.kernels, c.host_reads, c.reads   # operators, those not views, host reads and which ones
    c.by_name()                               # calls per overload, e.g. {"aten.cat.default": 60, ...}

``host_reads`` counts what would synchronise on CUDA: ``aten._local_scalar_dense`` (behind ``item``,
``bool``, ``int``), the ops whose output size depends on values (``nonzero``, ``masked_select``,
``unique``), ``repeat_interleave`` with a tensor of repeats and no ``output_size`` (it reads the size
inside its kernel), and the tensor methods that copy to the host (``tolist``, ``cpu``, ``numpy``),
whose CPU versions dispatch nothing. Those methods are seen through a profile hook
(``sys.setprofile``) because torch-function modes are not active in the recomputation that activation
checkpointing runs inside backward (dispatch modes are); ``repeat_interleave`` is seen by a function
mode, so not there. Used for training steps (``bench/bench_train.py --count``, ``tests/test_hf_attention.py``)
and KV-cache decode steps (``bench/bench_cache.py``, ``tests/test_cache_slack.py``).
"""

from __future__ import annotations

import sys
import threading
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that read values on the host (their CUDA versions synchronise)
_SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
             "unique_consecutive")
# tensor methods that copy to the host; on CPU tensors they dispatch nothing
_HOST_COPIES = ("tolist", "cpu", "numpy")
_REPEAT_INTERLEAVE = (torch.repeat_interleave, torch.Tensor.repeat_interleave)
# ops that only make a new view of existing memory (not tagged as views in their schema)
_NO_KERNEL = ("_unsafe_view", "detach", "alias", "lift_fresh")


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: OpCounter):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.owner.overloads[func] += 1
        if not func.is_view and name not in _NO_KERNEL:
            self.owner.kernels += 1
        if name in _SYNC_OPS:
            self.owner.reads[name] += 1
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, owner: OpCounter):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if func in _REPEAT_INTERLEAVE and kwargs.get("output_size") is None and isinstance(repeats, torch.Tensor):
            self.owner.reads["repeat_interleave"] += 1  # the output size is read inside the kernel
        return func(*args, **kwargs)


class OpCounter:
    """Counts dispatched operators and host reads inside a ``with`` block (this thread; on CPU the
    autograd engine runs backward on the calling thread, so backward is counted too)."""

    def __init__(self) -> None:
        self.overloads: Counter = Counter()  # OpOverload -> calls
        self.reads: Counter[str] = Counter()
        self.kernels = 0  # operators that are not views: on a GPU each launches work
        self._modes = (_Function(self), _Dispatch(self))

    @property
    def ops(self) -> int:
        return sum(self.overloads.values())

    @property
    def op_names(self) -> Counter[str]:
        """Calls per operator name (``add``), overloads together."""
        names: Counter[str] = Counter()
        for func, n in self.overloads.items():
            names[func.overloadpacket.__name__] += n
        return names

    def by_name(self) -> Counter[str]:
        """Calls per overload (``aten.add.Tensor``)."""
        return Counter({str(func): n for func, n in self.overloads.items()})

    @property
    def host_reads(self) -> int:
        return sum(self.reads.values())

    def _profile(self, frame, event, arg) -> None:
        if event == "c_call" and getattr(arg, "__name__", None) in _HOST_COPIES \
                and isinstance(getattr(arg, "__self__", None), torch.Tensor) \
                and frame.f_code is not _Function.__torch_function__.__code__:  # the mode calling it on: once
            self.reads[arg.__name__] += 1

    def __enter__(self) -> OpCounter:
        self._previous = sys.getprofile(), threading.getprofile()
        sys.setprofile(self._profile)
        threading.setprofile(self._profile)
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        sys.setprofile(self._previous[0])
        threading.setprofile(self._previous[1])
