"""Training attention: ``full``, ``s2``, ``s2_roll`` and ``sf`` (SinkLoRA) patterns.

- :func:`build_mask` is the executable definition of each pattern (dense, for tests).
- :func:`sparse_attention` computes the softmax over exactly the keys ``build_mask`` allows, with one
  backend chosen explicitly per device: ``"grouped"`` (CPU, O(N x G) memory; also CUDA batches with
  padding or packed documents), ``"flex"`` (CUDA, FlexAttention), or ``"reference"`` (the dense
  oracle). ``full`` without padding or packing goes straight to PyTorch's causal SDPA on every device.
- Hugging Face models: :mod:`sinklora.hf.attention`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from sinklora.attention.patterns import (
    PATTERNS,
    PatternSpec,
    build_mask,
    resolve_pattern,
    resolve_pattern_like,
    spec_mask,
)

__all__ = ["PATTERNS", "PatternSpec", "build_mask", "resolve_pattern", "sparse_attention", "BACKENDS"]

BACKENDS = ("grouped", "flex", "reference")
BACKEND_ENV = "SINKLORA_ATTENTION_BACKEND"


def default_backend(device: torch.device) -> str:
    """``flex`` on CUDA, ``grouped`` elsewhere; ``$SINKLORA_ATTENTION_BACKEND`` overrides (tests)."""
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r} is unknown: choose one of {', '.join(BACKENDS)}")
        return forced
    return "flex" if device.type == "cuda" else "grouped"


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D (B, H, N, D); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"shapes do not match: q {tuple(q.shape)} must be (B, Hq, N, D) and k, v (B, Hkv, N, D); "
            f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"num_heads={q.shape[1]} is not a multiple of num_kv_heads={k.shape[1]}: "
            "grouped-query attention needs Hq % Hkv == 0"
        )


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: str = "sf",
    *,
    scale: float | None = None,
    backend: str | None = None,
    key_padding_mask: torch.Tensor | None = None,
    doc_lengths: tuple[int, ...] | list[int] | None = None,
    **params,
) -> torch.Tensor:
    """Attention restricted to ``pattern``; q ``(B, Hq, N, D)``, k/v ``(B, Hkv, N, D)`` -> ``(B, Hq, N, D)``.

    ``params`` are the pattern's (``group_size`` or ``group_ratio``, ``sink_tokens``,
    ``shifted_head_fraction``; see :func:`resolve_pattern`). ``scale`` defaults to ``1/sqrt(D)``.
    ``key_padding_mask`` ``(B, N)`` bool, True = real token. ``doc_lengths`` describes packed documents
    in one row (patterns restart in each; no attention across documents). Differentiable.
    """
    _check_shapes(q, k, v)
    B, Hq, N, D = q.shape
    spec = resolve_pattern(pattern, N, Hq, **params)
    scale = D**-0.5 if scale is None else float(scale)
    if doc_lengths is not None:
        doc_lengths = tuple(int(n) for n in doc_lengths)
        if sum(doc_lengths) != N or min(doc_lengths) < 1:
            raise ValueError(f"doc_lengths={doc_lengths} must be positive and sum to the sequence length {N}")
        if len(doc_lengths) == 1:
            doc_lengths = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, N):
            raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected (B, N) = {(B, N)}")
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
        if bool(key_padding_mask.all()):
            key_padding_mask = None
    if spec.is_full and key_padding_mask is None and doc_lengths is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != Hq)

    if backend is None:
        backend = default_backend(q.device)
        if backend == "flex" and (key_padding_mask is not None or doc_lengths is not None):
            # Flex with padding or packing disagreed with the oracle on an H100 (BENCHMARKS.md, known
            # issue): such batches take the exact grouped path, which runs on CUDA too.
            backend = "grouped"
    if backend == "grouped":
        from sinklora.attention.grouped import grouped_attention

        return grouped_attention(q, k, v, spec, scale, key_padding_mask, doc_lengths)
    if backend == "flex":
        if q.device.type != "cuda":
            raise ValueError(f"backend='flex' needs a CUDA tensor (got {q.device}); use backend='grouped' on CPU")
        from sinklora.attention.flex import flex_sparse_attention

        return flex_sparse_attention(q, k, v, spec, scale, key_padding_mask, doc_lengths)
    if backend == "reference":
        from sinklora.attention.reference import dense_attention

        return dense_attention(q, k, v, reference_mask(spec, key_padding_mask, doc_lengths, q.device), scale)
    raise ValueError(f"backend={backend!r} is unknown: choose one of {', '.join(BACKENDS)}")


def reference_mask(
    spec: PatternSpec,
    key_padding_mask: torch.Tensor | None = None,
    doc_lengths: tuple[int, ...] | None = None,
    device=None,
) -> torch.Tensor:
    """Dense mask ``(H, N, N)`` or ``(B, H, N, N)`` for a spec with packing and padding applied."""
    if doc_lengths is None:
        mask = spec_mask(spec, device)
    else:
        mask = torch.zeros(spec.num_heads, spec.seq_len, spec.seq_len, dtype=torch.bool, device=device)
        start = 0
        for n in doc_lengths:
            sub = resolve_pattern_like(spec, n)
            mask[:, start : start + n, start : start + n] = spec_mask(sub, device)
            start += n
    if key_padding_mask is not None:
        mask = mask[None] & key_padding_mask[:, None, None, :]
    return mask
