"""Passkey retrieval for many KV-cache policies at the price of about one prompt forward.

A prompt's forward pass is the same whatever the cache policy: every layer attends over the whole prompt
before its cache evicts, and the hidden states it hands on do not depend on what it keeps. So the prompt
runs once with a recording cache, and each policy's cache is then built by replaying every layer's step
(``update`` with the recorded keys and values, ``attend`` with the recorded queries: the policy's own
attention and scoring, without the projections and MLPs). Decoding then runs the model for real with
each cache, greedily, ``len(key ids) + 4`` tokens, and is scored by :mod:`sinklora.eval.passkey`'s rule:
what :func:`sinklora.eval.passkey.run_passkey` with a ``cache_factory`` computes, one prompt forward per
trial instead of one per policy and trial.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from sinklora.cache.policies import make_policy
from sinklora.eval.passkey import (
    build_passkey_prompt,
    key_token_ids,
    passkey_key,
    score_generation,
)
from sinklora.hf.attention import attach_cache
from sinklora.hf.cache import PolicyCache
from sinklora.hf.layers import PolicyLayer


class RecordingLayer(PolicyLayer):
    """A full-cache layer that keeps what its attention step saw."""

    def attend(self, module, query, key, value, key_padding, scaling, dropout=0.0):
        self.seen_step = (module, query, key, value, scaling)
        return super().attend(module, query, key, value, key_padding, scaling, dropout)


def record_prompt(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple]]:
    """-> (the prompt's last logits (1, V), per layer (module, query, key, value, scaling))."""
    cache = PolicyCache(make_policy("full"), model.config.num_hidden_layers)
    cache.layers = [RecordingLayer(cache.policy, i, len(cache.layers)) for i in range(len(cache.layers))]
    with torch.inference_mode(), attach_cache(model, cache) as kw:
        logits = model(input_ids=ids[None], logits_to_keep=1, **kw).logits[:, -1]
    return logits, [layer.seen_step for layer in cache.layers]


def replay(cache: Any, steps: list[tuple]) -> None:
    """Run every layer's prompt step of ``cache`` from the recording (its scores and eviction included)."""
    with torch.inference_mode():
        for layer, (module, query, key, value, scaling) in zip(cache.layers, steps):
            keys, values = layer.update(key, value)
            layer.attend(module, query, keys, values, None, scaling)


def greedy(model: Any, cache: Any, first: torch.Tensor, n: int) -> list[int]:
    """``first`` (1, 1) then ``n - 1`` more greedy tokens through ``cache``."""
    tokens, token = [int(first)], first
    with torch.inference_mode(), attach_cache(model, cache) as kw:
        for _ in range(n - 1):
            token = model(input_ids=token, logits_to_keep=1, **kw).logits[:, -1:].argmax(-1)
            tokens.append(int(token))
    return tokens


def passkey_many(model: Any, tokenizer: Any, caches: dict[Any, Callable[[], Any]], length: int,
                 depths: list[float], trials: int, seed: int = 0, extra_new_tokens: int = 4,
                 skip: set[tuple[float, int]] = frozenset()) -> Iterator[dict[Any, dict]]:
    """For every (depth, trial) but those in ``skip``, trial by trial (every depth once first): one
    recorded prompt, then every cache of ``caches`` (name -> factory); yields name -> that trial's score
    (``exact``, ``digits``, ...) after each prompt."""
    device = next(model.parameters()).device
    for trial in range(trials):
        for depth in depths:
            if (depth, trial) in skip:
                continue
            key = passkey_key(seed, length, depth, trial)
            text, ids = build_passkey_prompt(tokenizer, length, depth, key)
            key_ids = key_token_ids(tokenizer, text, key)
            logits, steps = record_prompt(model, ids.to(device))
            first = logits.argmax(-1, keepdim=True)  # (1, 1)
            scores = {}
            for name, factory in caches.items():
                cache = factory()
                replay(cache, steps)
                new = greedy(model, cache, first, len(key_ids) + extra_new_tokens)
                scores[name] = {"depth": depth, "trial": trial, "key": key, "prompt_tokens": ids.numel(),
                                **score_generation(tokenizer, new, key_ids, key)}
            del steps
            yield scores
