"""GPU path: FlexAttention with a head-dependent block mask built from the pattern's predicate.

``create_block_mask`` and ``flex_attention`` are compiled once per process; block masks are cached per
(pattern, length) when there is no padding and no packing. On CUDA this path never falls back to an
unfused implementation: compilation problems raise (``fail_on_recompile_limit_hit``).
"""

from __future__ import annotations

import functools

import torch

from sinklora.attention import masks
from sinklora.attention.pattern import PatternSpec

_RECOMPILE_LIMIT = 64


@functools.cache
def _compiled():
    """(compiled flex_attention, compiled create_block_mask), built on first GPU use only."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # Each (pattern, length, dtype) is one compiled graph; training uses one or two of them. Hitting the
    # limit must fail loudly: the silent eager fallback materialises N x N scores and runs out of memory.
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(getattr(cfg, "recompile_limit", 8), _RECOMPILE_LIMIT)
    cfg.cache_size_limit = max(getattr(cfg, "cache_size_limit", 8), _RECOMPILE_LIMIT)
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True
    return torch.compile(flex_attention, dynamic=False), torch.compile(create_block_mask)


def mask_mod(spec: PatternSpec, key_padding_mask=None, doc_lengths: tuple[int, ...] | None = None, device=None):
    """The spec's ``mask_mod``: the predicate on the whole row, or per packed document; padded keys dropped."""
    pred = spec.predicate()
    if doc_lengths is None:
        mod = masks.at_length(pred, spec.seq_len)
    else:
        lens = torch.tensor(doc_lengths, device=device)
        doc_id = torch.repeat_interleave(torch.arange(len(doc_lengths), device=device), lens)
        mod = masks.per_document(pred, doc_id, torch.cumsum(lens, 0) - lens, lens)
    return mod if key_padding_mask is None else masks.with_key_padding(mod, key_padding_mask)


@functools.lru_cache(maxsize=32)
def _cached_block_mask(spec: PatternSpec, device: str):
    _, create_block_mask = _compiled()
    return create_block_mask(mask_mod(spec), None, spec.num_heads, spec.seq_len, spec.seq_len, device=device)


def flex_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: PatternSpec,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
    doc_lengths: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Same contract as :func:`sinklora.attention.grouped.grouped_attention`, on CUDA."""
    flex_attention, create_block_mask = _compiled()
    B, Hq, N, _ = q.shape
    if key_padding_mask is None and doc_lengths is None:
        block_mask = _cached_block_mask(spec, str(q.device))
    else:
        mod = mask_mod(spec, key_padding_mask, doc_lengths, q.device)
        batch = B if key_padding_mask is not None else None
        block_mask = create_block_mask(mod, batch, Hq, N, N, device=q.device)
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != Hq)
