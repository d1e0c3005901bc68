"""KV-cache policies for inference (docs/method.md §3): full, local, sink (StreamingLLM), h2o,
snapkv (H2O scored by the prompt's last queries), pyramidkv (budgets per layer), adakv (per head).

The policies are plain torch (:mod:`sinklora.cache.policies`, :mod:`sinklora.cache.scores`); the
Hugging Face ``Cache`` integration is :func:`sinklora.hf.cache.make_cache`::

    from sinklora.hf.attention import attach_cache
    from sinklora.hf.cache import make_cache
    cache = make_cache(model, "snapkv", budget=0.2)     # grows to budget + slack, then evicts at once
    with attach_cache(model, cache) as kw:              # sinklora.hf.attention
        model.generate(**inputs, **kw)
"""

from sinklora.cache.policies import (
    AUTO,
    POLICIES,
    AdaKVPolicy,
    FullPolicy,
    H2OPolicy,
    KVPolicy,
    LocalPolicy,
    PyramidKVPolicy,
    SinkPolicy,
    SlotState,
    SnapKVPolicy,
    Split,
    make_policy,
    parse_budget,
    policy_name,
)

__all__ = ["AUTO", "POLICIES", "AdaKVPolicy", "FullPolicy", "H2OPolicy", "KVPolicy", "LocalPolicy", "PyramidKVPolicy",
           "SinkPolicy", "SlotState", "SnapKVPolicy", "Split", "make_policy", "parse_budget", "policy_name"]
