"""Perplexity of a model on held-out documents at several context lengths (sliding window or LongLoRA).

Two protocols, both per document (no window ever spans two documents):

``sliding`` (default; the standard token-weighted sliding window, as in Hugging Face's perplexity
guide). A document ``x[0..n)`` is scored on targets ``x[1..n)``, each exactly once. Window ``k``
feeds input tokens ``x[b:e]`` with ``b = k * stride``, ``e = min(b + L, n - 1)`` and scores the
targets ``x[t]`` for ``t`` in ``(e_prev, e]``: target ``t`` is predicted from ``x[b:t]``, so it has
between 1 and ``L`` tokens of context (at least ``L - stride + 1`` after the first window, except in
a short last window). The first window is ``x[0:L]`` and scores ``x[1..L]``. With ``stride = L`` this
is independent non-overlapping chunks of ``L`` inputs, each predicting its next ``L`` tokens.
``ppl = exp(sum NLL / number of scored tokens)`` over all documents.

    n = 10, L = 4, stride = 2      input positions        scored targets
      window 0                      0 1 2 3                1 2 3 4
      window 1                          2 3 4 5                    5 6
      window 2                              4 5 6 7                    7 8
      window 3                                  6 7 8                      9

``longlora`` (LongLoRA's eval.py, to compare with published numbers): windows of ``L`` tokens start
every 256 tokens; each window's loss is the mean NLL of its ``L - 1`` next-token predictions (the
model's own shifted loss on ``labels = input_ids``); ``ppl = exp(mean over windows)``. Differences from
eval.py, chosen on purpose: windows stay inside each document (eval.py slides over one concatenated
token stream of the whole validation set); we keep the last window that eval.py drops with
``all_ix.pop()`` (it only guards an index used for its accuracy statistic); windows are averaged with
equal weight (eval.py averages per batch of 32 windows, so a short last batch weighs more); ``exp``
uses e, not 2.71828.

Logits are never held for a whole window: the decoder gives hidden states, the output embedding is
applied to chunks of ``chunk_tokens`` positions and cross-entropy is summed in fp32 chunk by chunk.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from sinklora.defaults import PPL_CHUNK_TOKENS

logger = logging.getLogger(__name__)

PROTOCOLS = ("sliding", "longlora")
LONGLORA_STEP = 256  # eval.py's `sliding_window`


def causal_lm_parts(model: Any) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """-> (decoder returning hidden states, output embedding, config); unwraps a peft ``PeftModel``.

    LoRA layers stay active: peft injects them into the base model's modules in place.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", None)
    if not isinstance(decoder, torch.nn.Module):
        decoder = base.get_decoder()
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"model {type(base).__name__} has no output embeddings; perplexity needs a causal LM head")
    return decoder, head, base.config


def warn_beyond_trained_range(model: Any, length: int, what: str = "context length") -> bool:
    """Log a warning when ``length`` exceeds ``config.max_position_embeddings``; -> whether it does."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None or length <= limit:
        return False
    logger.warning(
        "%s %d exceeds max_position_embeddings=%d: positions beyond %d are outside the range the model was "
        "trained on (or extended to by position interpolation), so results there measure extrapolation",
        what, length, limit, limit,
    )
    return True


def _logit_softcap(config: Any) -> float | None:
    return getattr(config, "final_logit_softcapping", None)


def _chunked_nll(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk_tokens: int,
                 softcap: float | None) -> float:
    """Sum of fp32 cross-entropy of ``head(hidden)`` against ``targets``; hidden (T, D), targets (T,)."""
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        logits = head(hidden[start : start + chunk_tokens]).float()  # (chunk, V)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        total += F.cross_entropy(logits, targets[start : start + chunk_tokens], reduction="sum").double()
    return float(total)


def _window_nll(model: Any, input_ids: torch.Tensor, begin: int, end: int, first_target: int,
                chunk_tokens: int) -> float:
    """NLL sum of targets ``x[first_target..end]`` given inputs ``x[begin:end]`` (target t uses ``x[begin:t]``)."""
    decoder, head, config = causal_lm_parts(model)
    head_device = next(head.parameters()).device
    window = input_ids[begin:end].to(next(decoder.parameters()).device).unsqueeze(0)  # (1, W)
    hidden = decoder(input_ids=window, use_cache=False).last_hidden_state[0]  # (W, D)
    hidden = hidden[first_target - 1 - begin : end - begin].to(head_device)  # positions predicting the targets
    targets = input_ids[first_target : end + 1].to(head_device)
    return _chunked_nll(hidden, targets, head, chunk_tokens, _logit_softcap(config))


def sliding_windows(n_tokens: int, context_len: int, stride: int | None = None) -> Iterator[tuple[int, int, int]]:
    """-> (begin, end, first_target) per window; inputs ``x[begin:end]`` score targets ``first_target..end``.

    Covers targets ``1..n_tokens-1`` exactly once (see the module docstring's drawing).
    """
    stride = context_len if stride is None else stride
    if not 1 <= stride <= context_len:
        raise ValueError(f"stride={stride}: must be between 1 and context_len={context_len}; use stride <= context_len")
    last_target = n_tokens - 1
    begin = end = 0
    while end < last_target:
        new_end = min(begin + context_len, last_target)
        yield begin, new_end, end + 1
        begin, end = begin + stride, new_end


def document_nll(model: Any, input_ids: torch.Tensor, context_len: int, stride: int | None = None, *,
                 chunk_tokens: int = PPL_CHUNK_TOKENS,
                 on_window: Callable[[], object] | None = None) -> tuple[float, int]:
    """Sliding-window NLL of one document: -> (sum of token NLLs, number of scored tokens = len - 1).

    ``on_window`` is called after each window (progress reporting)."""
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: pass one document as a 1D LongTensor")
    if context_len < 1 or chunk_tokens < 1:
        raise ValueError(f"context_len={context_len}, chunk_tokens={chunk_tokens}: both must be >= 1")
    nll, count = 0.0, 0
    with torch.inference_mode():
        for begin, end, first in sliding_windows(input_ids.numel(), context_len, stride):
            nll += _window_nll(model, input_ids, begin, end, first, chunk_tokens)
            count += end - first + 1
            if on_window is not None:
                on_window()
    return nll, count


def longlora_starts(n_tokens: int, context_len: int, step: int = LONGLORA_STEP) -> range:
    """Start of every LongLoRA window ``x[i:i+L]`` inside a document of ``n_tokens`` tokens."""
    return range(0, n_tokens - context_len + 1, step)


def longlora_window_nll(model: Any, input_ids: torch.Tensor, context_len: int, step: int = LONGLORA_STEP, *,
                        chunk_tokens: int = PPL_CHUNK_TOKENS,
                        on_window: Callable[[], object] | None = None) -> tuple[float, int]:
    """LongLoRA protocol on one document: -> (sum over windows of each window's mean NLL, number of windows).

    Windows ``x[i:i+L]`` for ``i = 0, step, 2 step, ...`` with ``i + L <= len``; each window's loss is
    the mean over its ``L - 1`` next-token predictions.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: pass one document as a 1D LongTensor")
    if context_len < 2 or step < 1:
        raise ValueError(f"context_len={context_len}, step={step}: need context_len >= 2 and step >= 1")
    total, windows = 0.0, 0
    with torch.inference_mode():
        for start in longlora_starts(input_ids.numel(), context_len, step):
            end = start + context_len - 1  # the last input token is only a label
            total += _window_nll(model, input_ids, start, end, start + 1, chunk_tokens) / (context_len - 1)
            windows += 1
            if on_window is not None:
                on_window()
    return total, windows


def evaluate_perplexity(model: Any, token_lists: Sequence[Sequence[int] | torch.Tensor],
                        context_lengths: Sequence[int], stride: int | None = None,
                        protocol: Literal["sliding", "longlora"] = "sliding", max_tokens: int | None = None, *,
                        chunk_tokens: int = PPL_CHUNK_TOKENS, progress: bool = True) -> dict[str, Any]:
    """Perplexity at each context length over ``token_lists`` (one list of ids per document).

    ``max_tokens`` keeps the first ``max_tokens`` tokens of each document. Documents shorter than a
    context length are skipped at that length (counted in ``docs_skipped``); a length that keeps none
    raises ``ValueError``. -> ``{"protocol", "stride", "max_tokens", "by_length": [{"context_len", "ppl",
    "mean_nll", "tokens", "windows", "docs_used", "docs_skipped", "beyond_trained_range", "seconds"}]}``
    (for ``longlora``, ``mean_nll`` is the mean of per-window means and ``tokens`` counts window inputs).
    """
    from tqdm.auto import tqdm

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: must be one of {', '.join(PROTOCOLS)}")
    if not context_lengths or min(context_lengths) < 2:
        raise ValueError(f"context_lengths={list(context_lengths)}: give one or more lengths >= 2, e.g. [2048]")
    if protocol == "longlora" and stride is not None and stride != LONGLORA_STEP:
        logger.info("longlora protocol: windows start every %d tokens (stride=%d used as the step)", stride, stride)
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens}: must be >= 2 or None (no limit)")
    docs = [torch.as_tensor(list(d) if not isinstance(d, torch.Tensor) else d, dtype=torch.long)[:max_tokens]
            for d in token_lists]
    rows = []
    for length in context_lengths:
        used = [d for d in docs if d.numel() >= length]
        if not used:
            longest = max((d.numel() for d in docs), default=0)
            raise ValueError(
                f"context length {length}: no document has >= {length} tokens (longest: {longest}, "
                f"max_tokens={max_tokens}); use shorter lengths, longer documents or a larger max_tokens"
            )
        beyond = warn_beyond_trained_range(model, length)
        step = stride or LONGLORA_STEP
        n_windows = sum(len(list(sliding_windows(d.numel(), length, stride))) if protocol == "sliding"
                        else len(longlora_starts(d.numel(), length, step)) for d in used)
        t0 = time.perf_counter()
        total, count, tokens = 0.0, 0, 0
        with tqdm(total=n_windows, desc=f"ppl@{length}", unit="window", disable=not progress) as bar:
            for doc in used:
                if protocol == "sliding":
                    nll, n = document_nll(model, doc, length, stride, chunk_tokens=chunk_tokens, on_window=bar.update)
                    tokens += n
                else:
                    nll, n = longlora_window_nll(model, doc, length, step, chunk_tokens=chunk_tokens,
                                                 on_window=bar.update)
                    tokens += n * length
                total, count = total + nll, count + n
        mean = total / count
        rows.append({
            "context_len": int(length), "ppl": math.exp(mean), "mean_nll": mean, "tokens": tokens,
            "windows": count if protocol == "longlora" else None, "docs_used": len(used),
            "docs_skipped": len(docs) - len(used), "beyond_trained_range": beyond,
            "seconds": round(time.perf_counter() - t0, 3),
        })
        logger.info("context %d: ppl %.4f over %d tokens, %d docs (%d skipped)",
                    length, rows[-1]["ppl"], tokens, len(used), len(docs) - len(used))
    return {"protocol": protocol, "stride": stride, "max_tokens": max_tokens, "by_length": rows}
