"""Which kernel computes a pattern: backends chosen by capability (docs/method.md §2).

| backend | runs | where |
|---|---|---|
| ``reference`` | any predicate (dense O(N^2) oracle) | any device; tests |
| ``grouped`` | patterns with a group structure (:attr:`PatternSpec.has_groups`) | any device |
| ``fused`` | group structures made of contiguous runs (not ``s2_roll``): fused SDPA per run of groups | any device |
| ``flex`` | any predicate (FlexAttention block masks) | CUDA |

Plain causal attention without padding or packing goes straight to PyTorch's causal SDPA.
``$SINKLORA_ATTENTION_BACKEND`` or ``backend=`` forces one (tests, benchmarks).

The rule (:func:`preference`), by measurement (BENCHMARKS.md). CPU: ``fused`` wherever it runs
(forward + backward 1.3-2.9x faster than ``grouped`` at 2k-8k tokens, plain, padded and packed, with
less memory), else ``grouped``. CUDA: padded or packed batches take ``grouped`` (Flex with padding or
packing failed on an H100 and its fix has not been run on a GPU yet; ``grouped`` passed there); plain
batches take ``flex``, unless :data:`FUSED_ON_CUDA` says ``fused`` was measured faster at that head
dimension and length (not measured yet: empty).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sinklora.attention.pattern import Pattern, PatternSpec, as_pattern

BACKEND_ENV = "SINKLORA_ATTENTION_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str
    supports: Callable[[PatternSpec, torch.device], bool]
    run: Callable  # (q, k, v, spec, scale, key_padding_mask, doc_lengths, batch_cache) -> out


def _grouped(*args):
    from sinklora.attention.grouped import grouped_attention

    return grouped_attention(*args)


def _fused(*args):
    from sinklora.attention.fused import fused_attention

    return fused_attention(*args)


def _flex(*args):
    from sinklora.attention.flex import flex_sparse_attention

    return flex_sparse_attention(*args)


def _reference(q, k, v, spec, scale, key_padding_mask, doc_lengths, batch_cache):
    from sinklora.attention.reference import dense_attention, reference_mask

    return dense_attention(q, k, v, reference_mask(spec, key_padding_mask, doc_lengths, q.device), scale)


def _fused_supports(spec: PatternSpec, device: torch.device) -> bool:
    from sinklora.attention.fused import supports

    return supports(spec)


BACKENDS: dict[str, Backend] = {
    "grouped": Backend("grouped", lambda spec, device: spec.has_groups, _grouped),
    "fused": Backend("fused", _fused_supports, _fused),
    "flex": Backend("flex", lambda spec, device: device.type == "cuda", _flex),
    "reference": Backend("reference", lambda spec, device: True, _reference),
}

# head_dim -> the sequence length from which ``fused`` beat ``flex`` on plain CUDA batches, per the GPU
# suite (bench/bench_attention.py --impls sf sf_fused ...). Empty: not measured yet, so Flex (whose GPU
# results passed the oracle tests) stays the default everywhere. Fill it from BENCHMARKS.md only.
FUSED_ON_CUDA: dict[int, int] = {}


def preference(spec: PatternSpec, device: torch.device, head_dim: int | None,
               padded_or_packed: bool) -> tuple[str, ...]:
    """The backends to try, best first, for this shape on this device (the rule in the module docstring)."""
    if device.type != "cuda":
        return ("fused", "grouped")
    if padded_or_packed:
        return ("grouped", "flex")
    min_len = FUSED_ON_CUDA.get(head_dim) if head_dim is not None else None
    if min_len is not None and spec.seq_len >= min_len:
        return ("fused", "flex")
    return ("flex",)


def choose_backend(spec: PatternSpec, device: torch.device, *, padded_or_packed: bool = False,
                   head_dim: int | None = None) -> str:
    """The first backend in :func:`preference` that supports ``spec`` (never the reference: O(N^2) memory)."""
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r} is unknown: choose one of {', '.join(BACKENDS)}")
        return forced
    for name in preference(spec, device, head_dim, padded_or_packed):
        if BACKENDS[name].supports(spec, device):
            return name
    raise ValueError(f"no fast attention backend runs pattern {spec.name!r} on {device.type}: pass "
                     "backend='reference' (dense, O(N^2) memory) or run it on CUDA (flex)")


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


def _check_documents(doc_lengths, n: int) -> tuple[int, ...] | None:
    if doc_lengths is None:
        return None
    doc_lengths = tuple(int(x) for x in doc_lengths)
    if sum(doc_lengths) != n or min(doc_lengths) < 1:
        raise ValueError(f"doc_lengths={doc_lengths} must be positive and sum to the sequence length {n}")
    return doc_lengths if len(doc_lengths) > 1 else None


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | str = "sf",
    *,
    scale: float | None = None,
    backend: str | None = None,
    key_padding_mask: torch.Tensor | None = None,
    doc_lengths: tuple[int, ...] | list[int] | None = None,
    head_offset: int | None = None,
    total_heads: int | None = None,
    batch_cache: dict | None = None,
    **params,
) -> torch.Tensor:
    """Attention restricted to ``pattern``; q ``(B, Hq, N, D)``, k/v ``(B, Hkv, N, D)`` -> ``(B, Hq, N, D)``.

    ``pattern``: a :class:`Pattern`, or a name with its parameters as keywords (``group_size`` or
    ``group_ratio``, ``sink_tokens``, ``shifted_head_fraction``). ``scale`` defaults to ``1/sqrt(D)``.
    ``key_padding_mask`` ``(B, N)`` bool, True = real token (None: no padding; the caller decides once
    per batch, nothing here reads it back to the host). ``doc_lengths`` describes packed documents in
    one row (patterns restart in each; no attention across documents). ``head_offset``/``total_heads``:
    these heads are a slice of the model's (sequence parallelism; default: the pattern's ``heads``).
    ``batch_cache``: a dict shared by the calls on one batch (every layer of a forward and its recomputation
    under activation checkpointing) in which backends keep what they build for that batch (Flex block masks
    with padding or packing, device copies of slot tables), so it is built once per batch, not once per
    layer; pass a fresh one for each batch. Differentiable.
    """
    _check_shapes(q, k, v)
    B, Hq, N, D = q.shape
    spec = as_pattern(pattern, **params).resolve(N, Hq, head_offset=head_offset, total_heads=total_heads)
    scale = D**-0.5 if scale is None else float(scale)
    doc_lengths = _check_documents(doc_lengths, N)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, N):
            raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected (B, N) = {(B, N)}")
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
    if spec.is_full and key_padding_mask is None and doc_lengths is None and backend is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != Hq)
    if backend is None:
        backend = choose_backend(spec, q.device, padded_or_packed=key_padding_mask is not None or doc_lengths is not None,
                                 head_dim=D)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown: choose one of {', '.join(BACKENDS)}")
    chosen = BACKENDS[backend]
    if not chosen.supports(spec, q.device):
        raise ValueError(f"backend={backend!r} cannot run pattern {spec.name!r} on {q.device.type} (flex needs "
                         "CUDA; grouped needs a group structure; fused needs contiguous groups, not s2_roll); "
                         "use another backend")
    return chosen.run(q, k, v, spec, scale, key_padding_mask, doc_lengths, batch_cache)

