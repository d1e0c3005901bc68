"""Group-wise attention for sparse patterns: O(N x (G + S)) memory, never an N x N matrix.

The query heads of a pattern fall into at most two classes (unshifted, shifted). For each class the
sequence is cut into segments of at most G tokens, taken in the class's token order (identity, or the
rolled order of ``s2_roll``). Each segment becomes one row of a ``(num_groups, G)`` slot table; its
keys are the S sink tokens followed by the segment itself::

    slot keys of group g:  [ sink 0 .. sink S-1 | token order[a_g] .. token order[a_g + G - 1] ]

and a ``(num_groups, G, S + G)`` boolean table says which of them each query slot may read: causal
inside the segment (in the class's order), plus every sink at or before the query that the segment
does not already contain (so no key is counted twice). One batched masked softmax over that table
then equals the dense pattern exactly. Padded slots (a short last segment) have no keys; they are
computed on a safe dummy row and discarded.

Fast path: a "clean" group (G real tokens, none of them a sink) needs no table: its query a reads
all S sinks and group keys 0..a, which is a causal mask aligned bottom-right on ``[sinks | group]``,
run through PyTorch's fused causal SDPA (:func:`sinklora.attention.fused.bottom_right_causal`). Only
the few irregular groups (the first, the short last ones, those holding sinks, and all groups when
there is key padding) use the table. On CUDA the ``fused`` backend (:mod:`.fused`) runs every group
without gathers or tables; this backend stays the exact path for padded and packed batches there.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from sinklora.attention.batch import per_batch
from sinklora.attention.fused import bottom_right_causal
from sinklora.attention.pattern import PatternSpec


@dataclass(frozen=True)
class _Layout:
    heads: tuple[int, int]  # [start, stop) of the query heads in this class
    slot_token: torch.Tensor  # (nG, G) token index of each query slot (0 where padded)
    key_token: torch.Tensor  # (nG, S + G) token index of each key slot (0 where padded)
    allowed: torch.Tensor  # (nG, G, S + G) pattern part of the mask
    token_slot: torch.Tensor  # (N,) flattened slot that holds each token
    num_clean: int  # the first num_clean groups are clean (see the module docstring)


def _class_segments(spec: PatternSpec, shifted: bool, n: int) -> tuple[torch.Tensor, list[int]]:
    """Token order and segment starts (indices into the order) for one document of length n."""
    G, s = spec.group_size, spec.shift
    order = torch.arange(n)
    if not shifted or s == 0:
        starts = list(range(0, n, G))
    elif spec.rolled:
        order = torch.roll(order, -s)  # order[i] = (i + s) mod n: LongLoRA's roll by -G/2
        starts = list(range(0, n, G))
    else:
        starts = [0] + list(range(G - s, n, G))
    return order, starts


def _document_layout(spec: PatternSpec, shifted: bool, n: int, offset: int):
    """Slot tables for one document of length n starting at token ``offset``."""
    G, sink_slots = spec.group_size, spec.sink_tokens  # slot table widths, shared by all documents
    spec = spec.for_document(n)  # a document no longer than G is one causal group
    S = min(spec.sink_tokens, n)
    order, starts = _class_segments(spec, shifted and not spec.is_full, n)
    nG = len(starts)
    lengths = torch.diff(torch.tensor(starts + [n]))  # (nG,) each <= G
    local = torch.arange(G)
    valid = local[None, :] < lengths[:, None]  # (nG, G)
    order_idx = (torch.tensor(starts)[:, None] + local[None, :]).clamp(max=n - 1)
    slot_pos = torch.where(valid, order[order_idx], 0)  # (nG, G) document-relative position

    # in-segment keys: causal in the class's order (slot index order), both slots real
    in_seg = (local[None, :, None] >= local[None, None, :]) & valid[:, :, None] & valid[:, None, :]
    # sink keys: position j < S, at or before the query, and not already a readable in-segment key
    sink = torch.arange(S)
    order_of = torch.empty(n, dtype=torch.long)
    order_of[order] = torch.arange(n)
    sink_group = torch.bucketize(order_of[sink], torch.tensor(starts), right=True) - 1  # (S,)
    sink_local = order_of[sink] - torch.tensor(starts)[sink_group]  # (S,)
    same_seg = sink_group[None, :] == torch.arange(nG)[:, None]  # (nG, S)
    seen_in_seg = same_seg[:, None, :] & (sink_local[None, None, :] <= local[None, :, None])  # (nG, G, S)
    sink_ok = (sink[None, None, :] <= slot_pos[:, :, None]) & valid[:, :, None] & ~seen_in_seg
    if S < sink_slots:  # a short document: pad the sink slots so all documents share one table
        pad = sink_slots - S
        sink_ok = torch.cat([sink_ok, sink_ok.new_zeros(nG, G, pad)], dim=-1)
        sink = torch.cat([sink, sink.new_zeros(pad)])
    allowed = torch.cat([sink_ok, in_seg], dim=-1)  # (nG, G, S + G)
    key_token = torch.cat([sink[None, :].expand(nG, -1), slot_pos], dim=-1) + offset
    clean = valid.all(-1) & ~same_seg.any(-1)  # (nG,) full length, no sink inside
    return slot_pos + offset, key_token, allowed, clean


@lru_cache(maxsize=64)
def _layouts(spec: PatternSpec, doc_lengths: tuple[int, ...]) -> tuple[_Layout, ...]:
    classes = [(0, spec.first_shifted_head, False), (spec.first_shifted_head, spec.num_heads, True)]
    layouts = []
    for start, stop, shifted in classes:
        if start == stop:
            continue
        parts, offset = [], 0
        for n in doc_lengths:
            parts.append(_document_layout(spec, shifted, n, offset))
            offset += n
        slot_token, key_token, ok, clean = (torch.cat(p) for p in zip(*parts))
        order = torch.argsort(~clean, stable=True)  # clean groups first
        slot_token, key_token, ok = slot_token[order], key_token[order], ok[order]
        G = spec.group_size
        token_slot = torch.full((offset,), -1, dtype=torch.long)
        real = ok.any(-1)  # (nG, G) slots holding a token
        token_slot[slot_token[real]] = torch.arange(slot_token.numel()).reshape(-1, G)[real]
        assert int(real.sum()) == offset and (token_slot >= 0).all(), "segments must partition the tokens"
        layouts.append(_Layout((start, stop), slot_token, key_token, ok, token_slot, int(clean.sum())))
    return tuple(layouts)


def _table_attention(q_g, k_g, v_g, allowed, scale):
    """Masked softmax over the slot table: q_g (B, h, n, G, D), k_g/v_g (B, h, n, S+G, D)."""
    has_key = allowed.any(-1, keepdim=True)  # rows with no key (padding) -> zeros
    allowed = allowed | ~has_key
    scores = (q_g @ k_g.transpose(-1, -2)) * scale  # (B, h, n, G, S+G)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q_g.dtype, torch.float32)).to(q_g.dtype)
    return (probs @ v_g) * has_key


def _clean_attention(q_g, k_g, v_g, scale):
    """Clean groups through fused causal SDPA over keys [sinks | group], aligned bottom-right."""
    B, h, n, G, D = q_g.shape
    L = k_g.shape[3]
    out = bottom_right_causal(q_g.reshape(B, h * n, G, D), k_g.reshape(B, h * n, L, D),
                              v_g.reshape(B, h * n, L, D), scale)
    return out.reshape(B, h, n, G, D)


def _device_layouts(spec: PatternSpec, doc_lengths: tuple[int, ...], device: torch.device,
                    batch_cache: dict | None) -> tuple[_Layout, ...]:
    """The layouts on ``device``, copied there once per batch (every layer of a forward shares them)."""
    def build() -> tuple[_Layout, ...]:
        return tuple(_Layout(lay.heads, lay.slot_token.to(device), lay.key_token.to(device), lay.allowed.to(device),
                             lay.token_slot.to(device), lay.num_clean) for lay in _layouts(spec, doc_lengths))

    return per_batch(batch_cache, ("grouped", spec, doc_lengths, str(device)), build)


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: PatternSpec,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
    doc_lengths: tuple[int, ...] | None = None,
    batch_cache: dict | None = None,
) -> torch.Tensor:
    """q ``(B, Hq, N, D)``, k/v ``(B, Hkv, N, D)`` -> ``(B, Hq, N, D)``; see the module docstring.

    ``key_padding_mask`` ``(B, N)`` True = real token; ``doc_lengths`` splits the sequence into packed
    documents (positions, groups and sinks restart in each). ``batch_cache``: see
    :func:`sinklora.attention.sparse_attention`.
    """
    N = q.shape[2]
    rep = q.shape[1] // k.shape[1]
    outs = []
    for lay in _device_layouts(spec, doc_lengths or (N,), q.device, batch_cache):
        slot_token, key_token, allowed = lay.slot_token, lay.key_token, lay.allowed  # allowed (nG, G, S+G)
        c = lay.num_clean
        if key_padding_mask is not None:
            allowed = allowed[None] & key_padding_mask[:, key_token][:, :, None, :]  # (B, nG, G, S+G)
            allowed = allowed[:, None]  # (B, 1, nG, G, S+G) broadcasts over heads
            c = 0  # padding can fall anywhere: every group goes through the table

        h0, h1 = lay.heads
        q_c = q[:, h0:h1]  # (B, h, N, D)
        kv_heads = torch.arange(h0, h1, device=q.device) // rep
        k_c, v_c = k[:, kv_heads], v[:, kv_heads]
        q_g = q_c[:, :, slot_token]  # (B, h, nG, G, D)
        k_g, v_g = k_c[:, :, key_token], v_c[:, :, key_token]  # (B, h, nG, S+G, D)
        parts = []
        if c > 0:
            parts.append(_clean_attention(q_g[:, :, :c], k_g[:, :, :c], v_g[:, :, :c], scale))
        if c < q_g.shape[2]:
            parts.append(_table_attention(q_g[:, :, c:], k_g[:, :, c:], v_g[:, :, c:], allowed[..., c:, :, :], scale))
        o_g = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]  # (B, h, nG, G, D)
        outs.append(o_g.flatten(2, 3)[:, :, lay.token_slot])  # (B, h, N, D)
    return torch.cat(outs, dim=1)
