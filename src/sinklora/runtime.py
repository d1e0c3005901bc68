"""Where a run executes: dtype names, devices, and the distributed world (rank, world size).

The one place that reads ``RANK`` / ``WORLD_SIZE`` and turns ``"auto"``/``"bf16"``/``"cuda:1"`` into
torch objects. torch is imported on use, so configs can import this module cheaply.
"""

from __future__ import annotations

import os
from typing import Any

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def world_size() -> int:
    """Processes in this job (``WORLD_SIZE`` set by torchrun / accelerate; 1 when not distributed)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def as_dtype(dtype: Any) -> Any:
    """None/'auto' -> 'auto' (as stored); a torch.dtype or its name ('bfloat16', 'bf16', ...) -> torch.dtype."""
    import torch

    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _ALIASES.get(str(dtype), str(dtype))
    if name in DTYPE_NAMES[1:]:
        return getattr(torch, name)
    raise ValueError(f"dtype={dtype!r}: must be 'auto', a torch.dtype or one of "
                     f"{', '.join(DTYPE_NAMES[1:] + tuple(_ALIASES))}")


def resolve_device(device: Any = "auto") -> Any:
    """None/'auto' -> 'cuda' when a GPU is there, else None (leave the model where it loads); else as given."""
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else None
    return device


def use_bf16(precision: str) -> bool:
    """Training precision: 'bf16', 'fp32', or 'auto' = bf16 on a GPU that supports it."""
    import torch

    if precision == "bf16":
        return True
    return precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
