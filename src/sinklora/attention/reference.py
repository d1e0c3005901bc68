"""The dense oracle: a pattern's mask evaluated on every (query, key) pair, and one masked softmax
over exactly the keys it allows.

O(N^2) memory per head. The definition every fast path is tested against; never on a hot path.
"""

from __future__ import annotations

import torch

from sinklora.attention.pattern import Pattern, PatternSpec, as_pattern


def spec_mask(spec: PatternSpec, device=None) -> torch.Tensor:
    """The spec's predicate on every pair: ``(num_heads, seq_len, seq_len)`` bool."""
    pos = torch.arange(spec.seq_len, device=device)
    h = torch.arange(spec.num_heads, device=device)[:, None, None]
    allowed = spec.predicate()(0, h, pos[None, :, None], pos[None, None, :], spec.seq_len)
    return allowed.expand(spec.num_heads, spec.seq_len, spec.seq_len).contiguous()


def build_mask(pattern: Pattern | str, seq_len: int, num_heads: int, device=None, **params) -> torch.Tensor:
    """Dense boolean mask ``(num_heads, seq_len, seq_len)``: True where query i may attend key j.

    The executable definition of each pattern (O(H N^2) memory: for tests and small N only).
    """
    return spec_mask(as_pattern(pattern, **params).resolve(seq_len, num_heads), device=device)


def reference_mask(spec: PatternSpec, key_padding_mask: torch.Tensor | None = None,
                   doc_lengths: tuple[int, ...] | None = None, device=None) -> torch.Tensor:
    """Dense mask ``(H, N, N)`` or ``(B, H, N, N)`` with packed documents and key padding applied,
    through the ``mask_mod`` FlexAttention uses (:func:`sinklora.attention.flex.mask_mod`)."""
    from sinklora.attention.flex import mask_mod as flex_mask_mod

    N, H = spec.seq_len, spec.num_heads
    mod = flex_mask_mod(spec, key_padding_mask, doc_lengths, device, length=N)
    pos = torch.arange(N, device=device)
    h = torch.arange(H, device=device)[:, None, None]
    if key_padding_mask is None:
        return mod(0, h, pos[None, :, None], pos[None, None, :]).expand(H, N, N).contiguous()
    b = torch.arange(key_padding_mask.shape[0], device=device)[:, None, None, None]
    return mod(b, h[None], pos[None, None, :, None], pos[None, None, None, :]).expand(-1, H, N, N).contiguous()


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Softmax attention restricted to ``mask``.

    q ``(B, Hq, N, D)``, k/v ``(B, Hkv, N, D)`` with ``Hq % Hkv == 0`` (GQA: query head h reads KV head
    ``h // (Hq // Hkv)``); mask ``(Hq, N, N)`` or ``(B, Hq, N, N)``, True = attend. Rows with no allowed
    key return zeros (FlexAttention's convention). ``upcast`` computes in fp32 (fp64 stays fp64).
    """
    B, Hq, N, D = q.shape
    rep = Hq // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    dtype = q.dtype
    if upcast and dtype not in (torch.float32, torch.float64):
        q, k, v = q.float(), k.float(), v.float()
    k = k.repeat_interleave(rep, dim=1)  # (B, Hq, N, D)
    v = v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, Hq, N, N)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows: all -inf -> nan -> 0
    return (probs @ v).to(dtype)
