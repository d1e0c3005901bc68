"""KV-cache policies as Hugging Face ``Cache`` objects: the only module that touches ``cache_utils``.

Attaching is explicit: build the cache and pass it to ``generate``::

    cache = make_cache(model, "h2o", budget=0.2)        # 20% of the prompt, half heavy, half recent
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    cache.stats()                                       # seen / kept tokens, KV bytes, evictions

How a step runs (one layer)::

    update(k_new, v_new)   append; return kept + new (all of it is attended to); mark the step pending
    attention(q, k, v)     SDPA as transformers' "sdpa"; then the pending layer computes this step's
                           attention scores if its policy needs them and evicts down to the budget

Evicting layers therefore need the model's attention to go through ``ATTENTION_NAME`` (SDPA plus that
hand-off, registered with ``AttentionInterface`` and the SDPA mask under the same name);
:func:`make_cache` switches the model to it (:func:`prepare_model`), and a layer whose step was never
finished refuses the next one instead of silently growing past its budget.

Positions stay absolute: ``get_seq_length()`` is the number of tokens seen, so RoPE positions and
generate's input slicing are those of the full cache; ``get_mask_sizes`` reports the kept slots with an
offset, as ``DynamicSlidingWindowLayer`` does. Batches: equal-length rows work (each row and KV head
keeps its own heavy hitters); padded batches are refused (the kept slots of different rows would need
different padding masks); the ``full`` policy accepts anything ``DynamicCache`` does.
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from sinklora.cache.policies import KVPolicy, SlotState, Split, make_policy
from sinklora.cache.scores import METHODS, accumulated_attention

logger = logging.getLogger(__name__)

ATTENTION_NAME = "sinklora_kvcache"
_pending = threading.local()  # the layer whose update() ran and whose attention step has not finished yet


class PolicyLayer(DynamicLayer):
    """One layer's cache under a policy. Extra state: ``positions`` (B, Hkv, N) absolute token index of
    every kept slot, ``attention`` (B, Hkv, N) accumulated attention (policies that need it)."""

    is_croppable = False

    def __init__(self, policy: KVPolicy, budget: _SharedBudget, score_method: str = "chunked"):
        super().__init__()
        self.policy, self.budget, self.score_method = policy, budget, score_method
        self._reset_state()

    def _reset_state(self) -> None:
        self.seen = 0
        self.positions: torch.Tensor | None = None
        self.attention: torch.Tensor | None = None
        self.step: tuple[int, int] | None = None  # (kept before this step, new tokens) until finish()
        self.max_kept = 0
        self.max_bytes = 0
        self.evicted = 0

    def _track(self) -> None:
        self.max_kept = max(self.max_kept, self.kept)
        if self.kept:
            self.max_bytes = max(self.max_bytes, self.keys.nbytes + self.values.nbytes)

    @property
    def kept(self) -> int:
        return 0 if self.keys is None or self.keys.dim() < 3 else self.keys.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.step is not None:
            raise RuntimeError(
                f"cache policy {self.policy.name!r}: the previous forward step never reached the cache's attention "
                f"function, so nothing was evicted. The model must use attention {ATTENTION_NAME!r}: build the "
                "cache with sinklora.hf.cache.make_cache(model, ...) or call prepare_model(model) first")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past, n_new = self.kept, key_states.shape[-2]
        split = self.budget.resolve(self.seen + n_new)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if split is not None:  # evicting policy: track positions, hand the step to the attention function
            b, h = key_states.shape[:2]
            new_pos = torch.arange(self.seen, self.seen + n_new, device=key_states.device).expand(b, h, n_new)
            self.positions = new_pos if self.positions is None else torch.cat([self.positions, new_pos], dim=-1)
            self.step = (past, n_new)
            _pending.layer = self
        self.seen += n_new
        if split is None:
            self._track()
        return self.keys, self.values

    def finish(self, query: torch.Tensor, scaling: float) -> None:
        """After this step's attention: accumulate scores (if needed) and evict down to the budget."""
        (past, n_new), self.step = self.step, None
        if self.policy.needs_attention:
            step_scores = accumulated_attention(query, self.keys, scaling=scaling, past=past, method=self.score_method)
            if self.attention is None:
                self.attention = step_scores
            else:
                pad = step_scores.new_zeros(*step_scores.shape[:2], n_new)
                self.attention = torch.cat([self.attention, pad], dim=-1) + step_scores
        state = SlotState(self.keys, self.values, self.positions, self.attention)
        split = self.budget.split
        assert split is not None
        keep = self.policy.keep_indices(state, split)
        if keep is not None:
            self.evicted += self.kept - keep.shape[-1]
            self._select(keep)
        self._track()

    def _select(self, keep: torch.Tensor) -> None:
        if keep.dim() == 1 and self.budget.split.sinks == 0 and type(self.policy).keep_indices is KVPolicy.keep_indices:
            # recent tokens only: one contiguous range, a view (no copy; the next cat copies anyway)
            n = keep.numel()
            self.keys, self.values = self.keys[:, :, -n:], self.values[:, :, -n:]
            self.positions = self.positions[:, :, -n:]
            if self.attention is not None:
                self.attention = self.attention[:, :, -n:]
            return
        if keep.dim() == 1:  # the same slots for every row and head
            self.keys, self.values = self.keys[:, :, keep], self.values[:, :, keep]
            self.positions = self.positions[:, :, keep]
            if self.attention is not None:
                self.attention = self.attention[:, :, keep]
            return
        idx = keep.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])  # (B, Hkv, n_keep, D)
        self.keys, self.values = self.keys.gather(2, idx), self.values.gather(2, idx)
        self.positions = self.positions.gather(2, keep)
        if self.attention is not None:
            self.attention = self.attention.gather(2, keep)

    def get_seq_length(self) -> int:
        return self.seen  # tokens seen: RoPE positions and generate's input slicing stay absolute

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # kept slots are all in the past of every new query: a causal mask over `kept + new` slots whose
        # first slot is placed at `seen - kept` is exactly right (no padding: see check_no_padding)
        return self.kept + query_length, self.seen - self.kept

    def reset(self) -> None:
        super().reset()
        self._reset_state()
        self.budget.reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(f"cache policy {self.policy.name!r} cannot be cropped (evicted tokens are gone); "
                                  "assisted decoding needs policy 'full'")

    def _apply_batch(self, fn) -> None:
        for name in ("keys", "values", "positions", "attention"):
            t = getattr(self, name)
            if t is not None and t.numel():
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_batch(lambda t: t[indices, ...])


class _SharedBudget:
    """The split, resolved once per cache from the first step's length (ratios are of the prompt)."""

    def __init__(self, policy: KVPolicy):
        self.policy, self.split, self.resolved = policy, None, False

    def resolve(self, prompt_len: int) -> Split | None:
        if not self.resolved:
            self.split, self.resolved = self.policy.split(prompt_len), True
        return self.split

    def reset(self) -> None:
        self.split, self.resolved = None, False


class PolicyCache(Cache):
    """A ``Cache`` whose layers keep tokens by ``policy`` (see :mod:`sinklora.cache.policies`)."""

    def __init__(self, policy: KVPolicy, num_layers: int, *, score_method: str = "chunked"):
        if score_method not in METHODS:
            raise ValueError(f"score_method={score_method!r}: choose one of {', '.join(map(repr, METHODS))}")
        self.policy = policy
        self._budget = _SharedBudget(policy)
        super().__init__(layers=[PolicyLayer(policy, self._budget, score_method) for _ in range(num_layers)])

    @property
    def split(self) -> Split | None:
        return self._budget.split

    def stats(self) -> dict[str, Any]:
        """Tokens seen and kept, the budget split, KV bytes now and at most, evictions (summed over layers)."""
        layers = [layer for layer in self.layers if isinstance(layer, PolicyLayer)]
        kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers if layer.kept)
        split = self.split
        return {
            "policy": self.policy.name,
            "budget": self.policy.budget,
            "split": None if split is None else {"sinks": split.sinks, "heavy": split.heavy, "recent": split.recent},
            "seen_tokens": layers[0].seen if layers else 0,
            "kept_tokens": max((layer.kept for layer in layers), default=0),
            "max_kept_tokens": max((layer.max_kept for layer in layers), default=0),
            "evicted_tokens": sum(layer.evicted for layer in layers),
            "kv_bytes": int(kv_bytes),
            "max_kv_bytes": int(sum(layer.max_bytes for layer in layers)),
        }


def check_no_padding(attention_mask: torch.Tensor | None, policy: KVPolicy) -> None:
    """Refuse padded batches: with padding, the last query row of the causal mask is not all True."""
    if attention_mask is None or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        return
    last = attention_mask[..., -1, :]
    ok = last.all() if last.dtype == torch.bool else (last == 0).all()
    if not bool(ok):
        raise ValueError(
            f"cache policy {policy.name!r} got a padded batch (attention_mask has zeros): evicting caches keep "
            "different slots per row and cannot follow padding. Pass equal-length prompts (group them by length) "
            "or one prompt at a time; policy 'full' accepts padded batches")


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Transformers' SDPA attention, then hand the step to the cache layer that produced ``key``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = getattr(_pending, "layer", None)
    if layer is not None and layer.keys is not key:
        layer = None  # not this cache's keys (another model or a nested call): plain SDPA
    if layer is not None:
        _pending.layer = None
        check_no_padding(attention_mask, layer.policy)
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
    if layer is not None:
        layer.finish(query, scaling if scaling is not None else query.shape[-1] ** -0.5)
    return out, weights


def register() -> str:
    """Register the attention function and its (SDPA) mask under ``ATTENTION_NAME``; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


def prepare_model(model: Any) -> Any:
    """Route the model's attention through ``ATTENTION_NAME`` (numerically transformers' SDPA)."""
    register()
    current = getattr(model.config, "_attn_implementation", None)
    if current != ATTENTION_NAME:
        logger.info("attention implementation %s -> %s (SDPA that feeds the KV-cache policy)", current, ATTENTION_NAME)
        model.set_attn_implementation(ATTENTION_NAME)
    return model


def num_cache_layers(model: Any) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


def make_cache(model: Any, policy: str | KVPolicy = "full", budget: int | float | str | None = None, *,
               sinks: int | None = None, heavy_ratio: float | None = None, score_method: str = "chunked") -> PolicyCache:
    """A fresh cache for one ``generate`` call (or one conversation) under ``policy``.

    ``policy``: a :class:`KVPolicy` or a name ('full', 'local', 'sink', 'h2o'; then ``budget``, ``sinks``
    and ``heavy_ratio`` build it). Evicting policies switch the model's attention to ``ATTENTION_NAME``.
    """
    if isinstance(policy, str):
        policy = make_policy(policy, budget, sinks=sinks, heavy_ratio=heavy_ratio)
    elif budget is not None or sinks is not None or heavy_ratio is not None:
        raise ValueError("make_cache: give budget/sinks/heavy_ratio with a policy name, not with a KVPolicy instance")
    if policy.name != "full":
        prepare_model(model)
    return PolicyCache(policy, num_cache_layers(model), score_method=score_method)


def cache_kwargs(cache: Cache) -> dict[str, Cache]:
    """How to hand a cache to ``generate``/``forward``: ``{"cache": c}`` where transformers renamed
    ``past_key_values`` (5.2x), ``{"past_key_values": c}`` before (5.17)."""
    from transformers.generation.utils import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}
