"""Attention computations the Hugging Face integration shares, each as transformers' ``"sdpa"`` computes
it: causal attention (with key padding and packed documents), one query over every cached slot (with the
probabilities a KV-cache policy scores by), and attention under a boolean mask (dead cache slots).
Shapes: query (B, Hq, L, D), key and value (B, Hkv, S, D), GQA not expanded; outputs (B, L, Hq, D)."""

from __future__ import annotations

import torch

from sinklora.attention.batch import per_batch


def causal_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     key_padding: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                     doc_lengths: tuple[int, ...] | None = None, batch_cache: dict | None = None) -> torch.Tensor:
    """Causal attention as transformers' ``"sdpa"`` computes it: queries are the last ``Lq`` positions of
    the ``Lk`` keys (bottom-right aligned), ``key_padding`` (B, Lk) drops padded keys, ``doc_lengths`` keeps
    packed documents apart. ``batch_cache`` keeps the dense mask for the other layers of the batch.
    Returns ``(B, Lq, Hq, D)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    mask = None
    if key_padding is not None or doc_lengths is not None or 1 < q_len < kv_len:
        mask = per_batch(batch_cache, ("causal", q_len, kv_len, doc_lengths),
                     lambda: _causal_mask(q_len, kv_len, key_padding, doc_lengths, query.device))
    out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                    is_causal=mask is None and q_len > 1)
    return out


def _causal_mask(q_len: int, kv_len: int, key_padding, doc_lengths, device) -> torch.Tensor:
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, Lq, Lk)
    if doc_lengths is not None:
        doc = torch.repeat_interleave(torch.arange(len(doc_lengths), device=device),
                                      torch.tensor(doc_lengths, device=device), output_size=kv_len)
        mask = mask & (doc[q_pos] == doc[k_pos])[None, None]
    if key_padding is not None:
        mask = mask & key_padding[:, None, None, :]
    return mask


def one_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per head over every slot, GQA without repeating keys: the output as transformers' SDPA
    returns it, (B, 1, Hq, D), and the probabilities summed over each KV head's query group, (B, Hkv, S)."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    q = query.reshape(b, hkv, hq // hkv, d)  # query head j * G + g reads KV head j (repeat_kv's layout)
    if query.dtype != torch.float32:  # logits and softmax in fp32, as the fused kernels do
        q, key = q.float(), key.float()
    probs = (q @ key.transpose(-1, -2) * scaling).softmax(dim=-1)  # (B, Hkv, G, S)
    out = probs.to(value.dtype) @ value  # (B, Hkv, G, D)
    return out.reshape(b, 1, hq, d), probs.sum(dim=2)


def masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """SDPA with a boolean mask (B, Hq, L, S) (True: attend), GQA not expanded -> (B, L, Hq, D)."""
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()
