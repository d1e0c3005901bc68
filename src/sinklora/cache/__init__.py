"""KV-cache policies for inference (docs/method.md §3): full, local, sink (StreamingLLM), h2o,
snapkv (H2O scored by the prompt's last queries).

The policies are plain torch (:mod:`sinklora.cache.policies`, :mod:`sinklora.cache.scores`); the
Hugging Face ``Cache`` integration is :func:`sinklora.hf.cache.make_cache`::

    from sinklora.hf.cache import make_cache, cache_kwargs
    cache = make_cache(model, "h2o", budget=0.2)
    model.generate(**inputs, **cache_kwargs(cache))
"""

from sinklora.cache.policies import (
    POLICIES,
    FullPolicy,
    H2OPolicy,
    KVPolicy,
    LocalPolicy,
    SinkPolicy,
    SlotState,
    SnapKVPolicy,
    Split,
    make_policy,
    parse_budget,
)

__all__ = ["POLICIES", "FullPolicy", "H2OPolicy", "KVPolicy", "LocalPolicy", "SinkPolicy", "SlotState",
           "SnapKVPolicy", "Split", "make_policy", "parse_budget"]
