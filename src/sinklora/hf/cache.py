"""KV-cache policies as Hugging Face ``Cache`` objects (with :mod:`sinklora.hf.layers` and
:mod:`sinklora.hf.slack`, the only modules that touch ``cache_utils``).

A cache belongs to one request (one ``generate`` call, or one conversation). Its policy runs inside the
model's attention steps, so the cache is attached to the model for the duration::

    cache = make_cache(model, "h2o", budget=0.2)        # 20% of the prompt, half heavy, half recent
    with attach_cache(model, cache) as cache_kw:         # sinklora.hf.attention
        out = model.generate(**inputs, max_new_tokens=64, **cache_kw)
    cache.stats()                                       # seen / kept tokens, KV bytes, evictions

How a step runs (one layer)::

    update(k_new, v_new)   add the new tokens; return kept + new (all of it is attended to); the step is pending
    attend(q, k, v)        SDPA as transformers' "sdpa" (a one-token H2O step computes its probabilities
                           itself; an H2O prompt gets its scores from the same attention pass), then the
                           policy scores the step (if it needs attention) and evicts (``finish``)

When a layer evicts depends on ``slack`` (docs/method.md §3):

- ``slack=0`` (:class:`sinklora.hf.layers.PolicyLayer`): down to the budget after every step. Decoding
  moves no cached data: once the cache is full, a one-token step leaves ``budget + 1`` slots, the policy
  names the one to drop (:meth:`KVPolicy.evict_slot`), and the next token's key and value are written
  into that slot (one scratch slot beyond the budget, never attended to while it is stale).
- ``slack > 0`` (:class:`sinklora.hf.slack.SlackLayer`, the default): the cache grows to ``budget + slack``
  tokens in pre-allocated buffers and then evicts down to the budget in one pass; between evictions a
  decoding step writes its key and value in place and keeps its query for scoring at the next eviction.

Steps of several tokens (the prompt, a new chat turn) append and then gather the kept slots; inside
:func:`deferred_eviction` they only append (a prompt fed in chunks evicts once, at its last chunk). A
layer whose step never reached its ``attend`` (the cache was not attached) refuses the next step instead
of silently growing past its budget.

Positions: ``get_seq_length()`` is the number of tokens seen, so RoPE positions and generate's input
slicing are those of the full cache (``positions="absolute"``, the default); ``get_mask_sizes`` reports
the kept slots with an offset, as ``DynamicSlidingWindowLayer`` does. ``positions="rank"`` is
StreamingLLM's mode for streaming past the trained length: every step, each kept key is turned forward
by the number of tokens evicted after it (RoPE rotations compose), so the query sees its keys at their
distances *within the cache* (never more than the budget). RoPE types whose rotations do not compose
exactly (yarn, dynamic, longrope) are refused, and so is ``slack`` (keys are re-rotated at every step anyway).

Batches: equal-length rows work (each row and KV head keeps its own heavy hitters); padded batches are
refused (the kept slots of different rows would need different padding masks); the ``full`` policy
accepts anything ``DynamicCache`` does.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
from transformers.cache_utils import Cache

from sinklora.cache.policies import (
    KVPolicy,
    Split,
    check_positions,
    check_slack,
    make_policy,
)
from sinklora.cache.scores import METHODS
from sinklora.hf.layers import LayerBase, PolicyLayer
from sinklora.hf.slack import SlackLayer

logger = logging.getLogger(__name__)


class PolicyCache(Cache):
    """A ``Cache`` whose layers keep tokens by ``policy`` (see :mod:`sinklora.cache.policies`), evicting
    after every step (``slack=0``) or once ``slack`` tokens beyond the budget have piled up (None: the
    default, :data:`~sinklora.defaults.CACHE_SLACK`, or 0 with rank positions)."""

    def __init__(self, policy: KVPolicy, num_layers: int, *, score_method: str = "auto",
                 inv_freq: torch.Tensor | None = None, slack: int | None = None):
        if score_method not in METHODS:
            raise ValueError(f"score_method={score_method!r}: choose one of {', '.join(map(repr, METHODS))}")
        self.positions = "absolute" if inv_freq is None else "rank"
        self.policy = policy
        self.slack = 0 if policy.name == "full" else check_slack(slack, policy, self.positions)  # full never evicts
        if self.slack:
            layers = [SlackLayer(policy, i, num_layers, score_method, self.slack) for i in range(num_layers)]
        else:
            layers = [PolicyLayer(policy, i, num_layers, score_method, inv_freq) for i in range(num_layers)]
        super().__init__(layers=layers)

    @property
    def split(self) -> Split | None:
        """The first layer's budget split (every layer's, unless the policy budgets layers differently)."""
        return self.layers[0].split if self.layers else None

    def stats(self) -> dict[str, Any]:
        """Tokens seen and kept, the budget split, KV bytes now and at most (allocated: with slack, the
        buffers of ``budget + slack + 1`` slots), evictions (summed over layers)."""
        layers = [layer for layer in self.layers if isinstance(layer, LayerBase)]
        split = self.split
        return {
            "policy": self.policy.name,
            "budget": self.policy.budget,
            "slack": self.slack,
            "positions": self.positions,
            "split": None if split is None else {"sink_tokens": split.sink_tokens, "heavy": split.heavy,
                                                 "recent": split.recent},
            "seen_tokens": layers[0].seen if layers else 0,
            "kept_tokens": max((layer.kept for layer in layers), default=0),
            "max_kept_tokens": max((layer.max_kept for layer in layers), default=0),
            "evicted_tokens": sum(layer.evicted for layer in layers),
            "kv_bytes": int(sum(layer.kv_bytes() for layer in layers)),
            "max_kv_bytes": int(sum(layer.max_bytes for layer in layers)),
        }


@contextlib.contextmanager
def deferred_eviction(cache: Any) -> Iterator[None]:
    """Steps inside the block add their tokens (and the scores of policies that count every query) but
    evict nothing; the first step after the block evicts as if everything had come in one step. A prompt
    fed in chunks (``serve``'s prefill) thus keeps what the whole prompt at once keeps: ``snapkv`` scores
    by the last chunk's last queries (the question) over every token of the prompt. Costs the whole
    prompt's KV until then, as an unchunked prefill does. Other caches (transformers' own): no-op.

    A ratio budget resolves on the cache's first step: give a token budget, or a cache that has already
    seen a step (:func:`sinklora.serve.engine.resolve_budget` turns a ratio of the whole prompt into tokens)."""
    layers = [layer for layer in getattr(cache, "layers", []) if isinstance(layer, LayerBase)]
    if layers and isinstance(cache.policy.budget, float) and not layers[0].resolved:
        raise ValueError(f"deferred_eviction: budget={cache.policy.budget} is a ratio of the first step, and the "
                         "first step would be one chunk of the prompt; give the budget in tokens of the whole prompt")
    for layer in layers:
        layer.deferred = True
    try:
        yield
    finally:
        for layer in layers:
            layer.deferred = False


def num_cache_layers(model: Any) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


def make_cache(model: Any, policy: str | KVPolicy = "full", budget: int | float | str | None = None, *,
               sink_tokens: int | None = None, heavy_ratio: float | None = None, score_method: str = "auto",
               positions: str = "absolute", slack: int | None = None) -> PolicyCache:
    """A fresh cache for one request (one ``generate`` call, or one conversation) under ``policy``; attach it
    with :func:`sinklora.hf.attention.attach_cache` while the model runs.

    ``policy``: a :class:`KVPolicy` or a name ('auto', 'full', 'local', 'sink', 'h2o', 'snapkv', 'pyramidkv',
    'adakv'; then ``budget``, ``sink_tokens`` and ``heavy_ratio`` build it). ``positions``: 'absolute'
    (RoPE positions of the full sequence) or 'rank' (positions within the cache, StreamingLLM; see the
    module docstring). ``slack``: tokens the cache may grow past its budget before it evicts down to it
    (None: :data:`~sinklora.defaults.CACHE_SLACK`, 0 with rank positions; 0 evicts after every step).
    """
    if isinstance(policy, str):
        policy = make_policy(policy, budget, sink_tokens=sink_tokens, heavy_ratio=heavy_ratio)
    elif budget is not None or sink_tokens is not None or heavy_ratio is not None:
        raise ValueError("make_cache: give budget/sink_tokens/heavy_ratio with a policy name, not with a KVPolicy "
                         "instance")
    check_positions(positions, policy.name)
    inv_freq = rope_frequencies(model) if positions == "rank" else None
    return PolicyCache(policy, num_cache_layers(model), score_method=score_method, inv_freq=inv_freq, slack=slack)


ROTATION_ROPE_TYPES = ("default", "linear", "llama3")


def rope_frequencies(model: Any) -> torch.Tensor:
    """The model's RoPE inverse frequencies, for re-rotating cached keys. Only RoPE types whose rotations
    compose exactly (a turn by a then b equals a turn by a + b, no cos/sin scaling) are accepted."""
    rope = next((m for m in model.modules() if hasattr(m, "inv_freq") and hasattr(m, "rope_type")), None)
    if rope is None:
        raise ValueError(f"positions='rank': found no rotary embedding (a module with inv_freq and rope_type) in "
                         f"{type(model).__name__}; use positions='absolute'")
    scaling = float(getattr(rope, "attention_scaling", 1.0))
    if rope.rope_type not in ROTATION_ROPE_TYPES or scaling != 1.0:
        raise ValueError(f"positions='rank': RoPE type {rope.rope_type!r} (attention scaling {scaling}) cannot be "
                         f"re-rotated exactly; supported: {', '.join(ROTATION_ROPE_TYPES)}. Use positions='absolute'")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if 2 * rope.inv_freq.numel() != head_dim:
        raise ValueError(f"positions='rank': RoPE rotates {2 * rope.inv_freq.numel()} of {head_dim} head dimensions "
                         "(partial rotary); re-rotation supports full rotary only. Use positions='absolute'")
    return rope.inv_freq.detach().float()


def cache_kwargs(cache: Cache) -> dict[str, Cache]:
    """How to hand a cache to ``generate``/``forward``: ``{"cache": c}`` where transformers renamed
    ``past_key_values`` (5.2x), ``{"past_key_values": c}`` before (5.17)."""
    from transformers.generation.utils import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}
