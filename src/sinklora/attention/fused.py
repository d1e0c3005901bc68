"""Fused grouped attention: every group through PyTorch's fused SDPA kernels, groups folded into the batch.

In a pattern with a group structure (``s2``, ``sf``, ``full``) a query reads a contiguous run of its own
group's keys plus the sinks that come before its group. For a group of tokens ``[a, a + L)``::

    keys:   [ tokens 0 .. P-1 | tokens a .. a+L-1 ]        P = min(S, a): the sinks before the group
    query a + i reads the P sink keys and group keys a .. a+i: causal attention aligned bottom-right

    L = 4, P = 2          k: s0 s1 a a+1 a+2 a+3
    query a              x  x  x
    query a+1            x  x  x  x
    query a+2            x  x  x  x   x
    query a+3            x  x  x  x   x   x

Sinks inside a group (the first groups) are ordinary group keys there, so no key is counted twice.
Bottom-right alignment comes from P zero query rows put in front (then plain top-left ``is_causal`` on
a square of P + L is exactly right; the extra rows are dropped), which every fused kernel takes, on CPU
and CUDA alike: the CPU tests run the code path CUDA runs.

Per head class (unshifted heads: groups start at 0, G, 2G, ...; shifted heads: at 0, G - s, 2G - s, ...,
the first and last cut short) consecutive groups of the same length L and the same P form a *run*; one
run is one SDPA call on ``(B * groups, heads, P + L, D)`` tensors: a class has at most four runs (the
first group, the second when it has fewer sinks before it, the full groups, the short last group).
GQA: a class's keys and values are repeated to its query heads (one copy, summed back in backward).

Key padding becomes a boolean mask per run (O(N (G + S)) per batch row, the fused memory-efficient
kernel); packed documents run one after another (positions, groups and sinks restart in each).
``s2_roll`` (LongLoRA's leaky reproduction) is not served: its groups are not contiguous in token order.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from sinklora.attention.pattern import PatternSpec


def supports(spec: PatternSpec) -> bool:
    """Patterns whose groups are contiguous runs of tokens."""
    return spec.has_groups and not spec.rolled


@functools.lru_cache(maxsize=256)
def runs(spec: PatternSpec, shifted: bool) -> tuple[tuple[int, int, int, int], ...]:
    """``(start, groups, L, P)`` per run, in token order, covering ``[0, seq_len)`` (see the module docstring)."""
    n, G, S = spec.seq_len, spec.group_size, spec.sink_tokens
    cut = spec.shift if shifted and not spec.is_full else 0
    starts = [0] + list(range(G - cut, n, G))
    out: list[list[int]] = []
    for a, b in zip(starts, starts[1:] + [n]):
        L, P = b - a, min(S, a)
        if out and out[-1][2:] == [L, P]:
            out[-1][1] += 1
        else:
            out.append([a, 1, L, P])
    return tuple(tuple(r) for r in out)


def _fold(x: torch.Tensor, start: int, m: int, L: int) -> torch.Tensor:
    """Tokens ``[start, start + m*L)`` of ``x`` (B, h, N, D) as ``(B*m, h, L, D)``: groups into the batch."""
    B, h, _, D = x.shape
    return x[:, :, start:start + m * L].unflatten(2, (m, L)).transpose(1, 2).reshape(B * m, h, L, D)


def _run_attention(q, k, v, run, scale, key_padding_mask):
    """One run of one head class: q (B, h, N, D), k/v (B, h, N, D) -> (B, h, m*L, D)."""
    start, m, L, P = run
    B, h, _, D = q.shape
    q_r = _fold(q, start, m, L)  # (B*m, h, L, D)
    k_r, v_r = _fold(k, start, m, L), _fold(v, start, m, L)
    if P:  # the sinks before the group as extra keys
        sinks_k = k[:, None, :, :P].expand(B, m, h, P, D).reshape(B * m, h, P, D)
        sinks_v = v[:, None, :, :P].expand(B, m, h, P, D).reshape(B * m, h, P, D)
        k_r, v_r = torch.cat([sinks_k, k_r], dim=2), torch.cat([sinks_v, v_r], dim=2)  # (B*m, h, P+L, D)
    real = None
    if key_padding_mask is not None:
        real = key_padding_mask[:, start:start + m * L].unflatten(1, (m, L))  # (B, m, L)
        if P:
            real = torch.cat([key_padding_mask[:, None, :P].expand(B, m, P), real], dim=2)  # (B, m, P+L)
        real = real.reshape(B * m, 1, 1, P + L)
    out = bottom_right_causal(q_r, k_r, v_r, scale, real)  # (B*m, h, L, D)
    return out.reshape(B, m, h, L, D).transpose(1, 2).reshape(B, h, m * L, D)


def bottom_right_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        real_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention aligned bottom-right through fused SDPA: q ``(X, h, L, D)``, k/v ``(X, h, P+L, D)``;
    query i reads keys 0 .. P+i. ``real_keys`` (X, 1, 1, P+L) bool drops padded keys (a row left with no
    key returns zeros). PyTorch's fused kernels take only top-left ``is_causal``: P zero query rows go in
    front (then row P + i reads keys 0 .. P + i, exactly right) and are dropped; they get no gradient."""
    X, h, L, D = q.shape
    P = k.shape[2] - L
    if P:
        q = torch.cat([q.new_zeros(X, h, P, D), q], dim=2)  # (X, h, P+L, D)
    if real_keys is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[:, :, P:]
    allowed = torch.ones(P + L, P + L, dtype=torch.bool, device=q.device).tril() & real_keys  # (X, 1, P+L, P+L)
    has_key = allowed.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_key, scale=scale) * has_key
    return out[:, :, P:]


def _plain(q, k, v, spec: PatternSpec, scale: float, key_padding_mask) -> torch.Tensor:
    """One sequence (or one packed document): q/k/v (B, Hq, n, D) with k/v already at query heads."""
    f = spec.first_shifted_head
    outs = []
    for h0, h1, shifted in ((0, f, False), (f, spec.num_heads, True)):
        if h0 == h1:
            continue
        qc, kc, vc = q[:, h0:h1], k[:, h0:h1], v[:, h0:h1]
        parts = [_run_attention(qc, kc, vc, run, scale, key_padding_mask) for run in runs(spec, shifted)]
        outs.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])  # (B, h, n, D)
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: PatternSpec,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
    doc_lengths: tuple[int, ...] | None = None,
    batch_cache: dict | None = None,
) -> torch.Tensor:
    """Same contract as :func:`sinklora.attention.grouped.grouped_attention`; see the module docstring."""
    B, Hq, N, D = q.shape
    rep = Hq // k.shape[1]
    if rep > 1:  # (B, Hkv, N, D) -> (B, Hq, N, D): query head i reads KV head i // rep
        k = k[:, :, None].expand(B, k.shape[1], rep, N, D).reshape(B, Hq, N, D)
        v = v[:, :, None].expand(B, v.shape[1], rep, N, D).reshape(B, Hq, N, D)
    if doc_lengths is None:
        return _plain(q, k, v, spec, scale, key_padding_mask)
    outs, offset = [], 0
    for n in doc_lengths:
        part = slice(offset, offset + n)
        kpm = None if key_padding_mask is None else key_padding_mask[:, part]
        outs.append(_plain(q[:, :, part], k[:, :, part], v[:, :, part], spec.for_document(n), scale, kpm))
        offset += n
    return torch.cat(outs, dim=2)
