"""The batch cache: a dict shared by the attention calls on one batch (every layer of a forward and its
recomputation under activation checkpointing), in which what depends only on the batch is built once
(see :func:`sinklora.attention.sparse_attention` and :class:`sinklora.hf.attention.BatchMask`)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")


def per_batch(batch_cache: dict | None, key: Hashable, build: Callable[[], T]) -> T:
    """``build()`` once per batch when there is a batch cache, else on every call."""
    if batch_cache is None:
        return build()
    if key not in batch_cache:
        batch_cache[key] = build()
    return batch_cache[key]
