"""One greedy answer from a model under a KV-cache setting: the only place the long-context suites
(:mod:`sinklora.eval.ruler`, :mod:`sinklora.eval.longbench`) touch the model or its cache.

A cache setting is a :class:`sinklora.settings.CacheOptions` (``full``; ``h2o@0.2`` = H2O keeping 20% of
the prompt). :func:`generate_answer` builds a fresh cache for the call, attaches it, decodes greedily and
returns the new token ids with the cache's statistics (tokens seen and kept, KV bytes), so a suite can
report its score next to the compression that produced it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GeneratedAnswer:
    """New token ids (the prompt excluded) and the cache's statistics after the call."""

    ids: list[int]
    cache_stats: dict[str, Any] = field(default_factory=dict)


def generate_answer(model: Any, tokenizer: Any, prompt_ids: Sequence[int], max_new_tokens: int,
                    cache: Any = None, *, stop_ids: Sequence[int] = (), min_new_tokens: int = 0) -> GeneratedAnswer:
    """Greedy decoding of at most ``max_new_tokens`` after ``prompt_ids`` (one prompt, no padding) with a
    fresh cache built from ``cache`` (a :class:`sinklora.settings.CacheOptions`; default: the full cache).
    Generation stops at the model's EOS token(s) or any of ``stop_ids``, not before ``min_new_tokens``."""
    import torch

    from sinklora.hf.attention import attach_cache
    from sinklora.hf.cache import make_cache
    from sinklora.models.loading import eos_ids

    device = getattr(model, "device", None) or next(model.parameters()).device
    kv = cache.make(model) if cache is not None else make_cache(model, "full")
    eos = eos_ids(model, tokenizer)
    eos += [int(i) for i in stop_ids if int(i) not in eos]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # (1, N)
    extra = {"min_new_tokens": min_new_tokens} if min_new_tokens > 0 else {}
    with torch.inference_mode(), attach_cache(model, kv) as cache_kw:
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, num_beams=1,
                             max_new_tokens=max_new_tokens, eos_token_id=eos or None, pad_token_id=pad,
                             **extra, **cache_kw)
    sequences = getattr(out, "sequences", out)  # (1, N + new)
    return GeneratedAnswer(sequences[0, prompt.shape[1]:].tolist(), kv.stats())
