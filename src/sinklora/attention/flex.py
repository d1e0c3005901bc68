"""GPU path: FlexAttention with a head-dependent block mask built from the pattern's predicate.

``create_block_mask`` and ``flex_attention`` are compiled once per process with static shapes (one
graph per pattern, length and head layout; automatic dynamic shapes would silently recompile them
with symbolic lengths). Block masks are built once per shape: plain batches share one per (pattern,
length) for the whole run; a padded or packed batch builds its own once and shares it across layers
through the batch cache (:func:`sinklora.attention.sparse_attention`). On CUDA this path never falls
back to an unfused implementation: compilation problems raise (``fail_on_recompile_limit_hit``).

Index range: the kernels evaluate a ``mask_mod`` on whole blocks of :data:`BLOCK_SIZE` tokens, so with a
length that is not a multiple of it they pass query and key indices up to the next multiple (PyTorch
issue 137801; torch 2.13's Triton templates wrap them modulo the length only in boundary blocks). Every
tensor a ``mask_mod`` captures (key padding, per-token document tables) is therefore padded to
:func:`padded_length`, so no index can read outside it; ``tests/test_attention_kernels.py`` evaluates each
``mask_mod`` eagerly over that whole range.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from sinklora.attention import masks
from sinklora.attention.batch import per_batch
from sinklora.attention.pattern import PatternSpec

_RECOMPILE_LIMIT = 64
BLOCK_SIZE = 128  # FlexAttention's sparse block (PyTorch's default), passed explicitly


def padded_length(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`BLOCK_SIZE`: the index range a ``mask_mod`` must accept."""
    return -(-n // BLOCK_SIZE) * BLOCK_SIZE


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
    return torch.compile(flex_attention, dynamic=False), torch.compile(create_block_mask, dynamic=False)


def document_tensors(doc_lengths: tuple[int, ...], length: int, device=None) -> tuple[torch.Tensor, ...]:
    """Per-token ``(document, first token, document length)``, each ``(length,)``; the tokens past the
    documents (padding up to ``length``) form one more document of their own."""
    total = sum(doc_lengths)
    lens = list(doc_lengths) + ([length - total] if length > total else [])
    lens_t = torch.tensor(lens, device=device)
    ids = torch.arange(len(lens), device=device)

    def per_token(x: torch.Tensor) -> torch.Tensor:  # output_size given: no read of the size on the host
        return torch.repeat_interleave(x, lens_t, output_size=length)

    return per_token(ids), per_token(torch.cumsum(lens_t, 0) - lens_t), per_token(lens_t)


def mask_mod(spec: PatternSpec, key_padding_mask: torch.Tensor | None = None,
             doc_lengths: tuple[int, ...] | None = None, device=None, length: int | None = None) -> masks.MaskMod:
    """The spec's ``mask_mod``: the predicate on the whole row, or per packed document; padded keys dropped.

    Captured tensors cover ``length`` indices (default :func:`padded_length` of the sequence); indices
    past the sequence read padding (no key there), never past a tensor."""
    length = padded_length(spec.seq_len) if length is None else length
    pred = spec.predicate()
    if doc_lengths is None:
        mod = masks.at_length(pred, spec.seq_len)
    else:
        mod = masks.per_document(pred, *document_tensors(doc_lengths, length, device))
    if key_padding_mask is None:
        return mod
    real = F.pad(key_padding_mask.to(device=device, dtype=torch.bool), (0, length - spec.seq_len), value=False)
    return masks.with_key_padding(mod, real)  # (B, length)


@functools.lru_cache(maxsize=32)
def _plain_block_mask(spec: PatternSpec, device: str):
    _, create_block_mask = _compiled()
    return create_block_mask(mask_mod(spec), None, spec.num_heads, spec.seq_len, spec.seq_len, device=device,
                             BLOCK_SIZE=BLOCK_SIZE)


def block_mask(spec: PatternSpec, key_padding_mask: torch.Tensor | None, doc_lengths: tuple[int, ...] | None,
               device: torch.device, batch_cache: dict | None = None):
    """The block mask of this batch: one per (pattern, length) without padding or packing (kept for the
    run), else one per batch (kept in ``batch_cache``, shared by every layer)."""
    if key_padding_mask is None and doc_lengths is None:
        return _plain_block_mask(spec, str(device))

    def build():
        _, create_block_mask = _compiled()
        batch = None if key_padding_mask is None else key_padding_mask.shape[0]
        mod = mask_mod(spec, key_padding_mask, doc_lengths, device)
        return create_block_mask(mod, batch, spec.num_heads, spec.seq_len, spec.seq_len, device=device,
                                 BLOCK_SIZE=BLOCK_SIZE)

    return per_batch(batch_cache, ("flex", spec, doc_lengths, str(device)), build)


def flex_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: PatternSpec,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
    doc_lengths: tuple[int, ...] | None = None,
    batch_cache: dict | None = None,
) -> torch.Tensor:
    """Same contract as :func:`sinklora.attention.grouped.grouped_attention`, on CUDA."""
    flex_attention, _ = _compiled()
    mask = block_mask(spec, key_padding_mask, doc_lengths, q.device, batch_cache)
    return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
