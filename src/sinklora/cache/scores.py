"""Accumulated attention per key (H2O's score) without an N x N attention matrix.

For one step with ``L`` new queries over ``S = past + L`` keys (the first ``past`` already cached),
key ``s`` is visible to new query ``i`` iff ``s <= past + i``. The score of key ``s`` is

    a[b, kv, s] = sum over query heads h of group kv, over queries i:  softmax_s(q_i . k_s * scaling)

Shapes: query (B, Hq, L, D), key (B, Hkv, S, D), GQA not expanded (Hq = Hkv * groups); result
(B, Hkv, S) float32. Three exact ways (to float error) and one dense oracle:

- ``chunked``: softmax rows for a block of queries at a time (memory B * Hq * chunk * S floats);
- ``sdpa_grad``: ``dV = P^T dO``, so one SDPA backward with ``dO = ones`` and a scalar value column
  gives every key's column sum of P (flash kernels never hold P);
- :func:`prompt_attention_with_scores` (a prompt on CPU): the attention's own flash pass returns each
  query's log-sum-exp ``lse_i``, and the column sum ``a_s = sum_i exp(q_i . k_s * scaling - lse_i)`` is
  itself a log-sum-exp, over queries, with bias ``-lse_i``: one more flash pass with keys and queries
  swapped (sequence reversed, so the visibility ``i >= s`` is causal) returns ``log a_s``. The prompt's
  attention is computed once, and its probabilities are never materialised;
- :func:`dense_accumulated_attention`: the full matrix, for tests only.

``key_mask`` (B, Hkv, S) bool, where given, drops keys (dead slots of a cache whose heads keep different
numbers of tokens).
"""

from __future__ import annotations

import torch

METHODS = ("auto", "chunked", "sdpa_grad")  # auto: the prompt on CPU by its log-sum-exp, else chunked
_CHUNK_BYTES = 256 * 2**20


def _visible(q_len: int, s_len: int, past: int, device: torch.device, q_start: int = 0) -> torch.Tensor:
    """(q_len, s_len) bool: key s visible to new query q_start + i."""
    q = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    return torch.arange(s_len, device=device)[None, :] <= q + past


def _check(query: torch.Tensor, key: torch.Tensor) -> tuple[int, int, int, int, int]:
    b, hq, n_q, _ = query.shape
    hkv, n_k = key.shape[1], key.shape[2]
    assert hq % hkv == 0 and n_k >= n_q, (query.shape, key.shape)
    return b, hq, hkv, n_q, n_k


def dense_accumulated_attention(query: torch.Tensor, key: torch.Tensor, *, scaling: float, past: int) -> torch.Tensor:
    """The oracle: materialises (B, Hq, L, S) probabilities in float64."""
    b, hq, hkv, n_q, n_k = _check(query, key)
    k = key.double().repeat_interleave(hq // hkv, dim=1)  # (B, Hq, S, D)
    logits = (query.double() @ k.transpose(-1, -2)) * scaling  # (B, Hq, L, S)
    logits = logits.masked_fill(~_visible(n_q, n_k, past, query.device), float("-inf"))
    p = logits.softmax(dim=-1).sum(dim=2)  # (B, Hq, S)
    return p.view(b, hkv, hq // hkv, n_k).sum(dim=2).float()


def _chunked(query: torch.Tensor, key: torch.Tensor, scaling: float, past: int, chunk: int | None,
             key_mask: torch.Tensor | None = None) -> torch.Tensor:
    b, hq, hkv, n_q, n_k = _check(query, key)
    g = hq // hkv
    # bf16/fp32 products accumulate in fp32 anyway; only fp16 is promoted first (overflow)
    q = query.view(b, hkv, g, n_q, -1)  # (B, Hkv, G, L, D)
    q, k = (q.float(), key.float()) if query.dtype == torch.float16 else (q, key)
    if chunk is None:
        chunk = max(1, _CHUNK_BYTES // (4 * b * hq * n_k))
    out = torch.zeros(b, hkv, n_k, dtype=torch.float32, device=key.device)
    for start in range(0, n_q, chunk):
        stop = min(n_q, start + chunk)
        visible = past + stop  # keys beyond this are masked for every query of the block
        logits = torch.einsum("bhgld,bhsd->bhgls", q[:, :, :, start:stop] * scaling, k[:, :, :visible]).float()
        if stop - start > 1:  # only the block's own keys need the causal triangle; earlier keys are all visible
            own = torch.ones(stop - start, stop - start, dtype=torch.bool, device=key.device).tril()
            logits[..., past + start:].masked_fill_(~own, float("-inf"))
        if key_mask is not None:
            logits.masked_fill_(~key_mask[:, :, None, None, :visible], float("-inf"))
        out[..., :visible] += logits.softmax(dim=-1).sum(dim=(2, 3))
    return out


def _sdpa_grad(query: torch.Tensor, key: torch.Tensor, scaling: float, past: int) -> torch.Tensor:
    b, hq, hkv, n_q, n_k = _check(query, key)
    with torch.inference_mode(False), torch.enable_grad():
        # clones: inference-mode tensors (generate under inference_mode) cannot enter autograd
        q, k = query.detach().clone(), key.detach().clone()
        v = torch.zeros(b, hkv, n_k, q.shape[-1], dtype=q.dtype, device=q.device, requires_grad=True)
        mask = None if past == 0 else _visible(n_q, n_k, past, q.device)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=past == 0, scale=scaling, enable_gqa=hq != hkv)
        out.backward(torch.ones_like(out))  # dV = P^T 1: every value column holds the key's column sum
    return v.grad[..., 0].float()


def accumulated_attention(query: torch.Tensor, key: torch.Tensor, *, scaling: float, past: int,
                          method: str = "chunked", chunk: int | None = None,
                          key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hkv, S) float32 column sums of this step's attention probabilities (see the module docstring)."""
    if method in ("chunked", "auto") or key_mask is not None:
        return _chunked(query, key, scaling, past, chunk, key_mask)
    if method == "sdpa_grad":
        return _sdpa_grad(query, key, scaling, past)
    raise ValueError(f"score_method={method!r}: choose one of {', '.join(map(repr, METHODS))}")


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def prompt_attention_with_scores(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                                 scaling: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A whole prompt's causal attention (B, L, Hq, D), as SDPA computes it, and its column sums
    (B, Hkv, L) float32 (see the module docstring); None where torch's CPU flash kernel is not there."""
    if (_FLASH_CPU is None or query.device.type != "cpu" or query.shape[2] != key.shape[2]
            or query.dtype not in (torch.float32, torch.bfloat16)):
        return None
    b, hq, n, d = query.shape
    g = hq // key.shape[1]
    k = key.repeat_interleave(g, dim=1)  # (B, Hq, L, D): the kernel takes no GQA
    out, lse = _FLASH_CPU(query, k, value.repeat_interleave(g, dim=1), 0.0, True, scale=scaling)[:2]
    # swapped pass, sequence reversed: "query" s' = L-1-s sees "key" i' = L-1-i iff i >= s; fp32 for the bias
    bias = (-lse).flip(-1).contiguous()[:, :, None, :]  # (B, Hq, 1, L); lse comes (B, L, Hq)-strided
    keys_as_queries, queries_as_keys = k.flip(2).float(), query.flip(2).float()
    log_sums = _FLASH_CPU(keys_as_queries, queries_as_keys, torch.zeros_like(keys_as_queries), 0.0, True,
                          attn_mask=bias, scale=scaling)[1]  # (B, Hq, L), the value is not used
    scores = log_sums.flip(-1).exp().view(b, hq // g, g, n).sum(dim=2)
    return out.transpose(1, 2).contiguous(), scores
