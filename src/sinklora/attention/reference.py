"""The dense oracle: one masked softmax over exactly the keys a boolean mask allows.

O(N^2) memory per head. Used by tests to check every fast path, never on a hot path.
"""

from __future__ import annotations

import torch


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
