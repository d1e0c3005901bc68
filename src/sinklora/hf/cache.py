"""KV-cache policies as Hugging Face ``Cache`` objects: the only module that touches ``cache_utils``.

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

- ``slack=0`` (:class:`PolicyLayer`): down to the budget after every step. Decoding moves no cached data:
  once the cache is full, a one-token step leaves ``budget + 1`` slots, the policy names the one to drop
  (:meth:`KVPolicy.evict_slot`), and the next token's key and value are written into that slot (one
  scratch slot beyond the budget, never attended to while it is stale).
- ``slack > 0`` (:class:`sinklora.hf.slack.SlackLayer`, the default): the cache grows to ``budget + slack``
  tokens in pre-allocated buffers and then evicts down to the budget in one pass; between evictions a
  decoding step writes its key and value in place and keeps its query for scoring at the next eviction.

Steps of several tokens (the prompt, a new chat turn) append and then gather the kept slots. A layer
whose step never reached :meth:`PolicyLayer.attend` (the cache was not attached) refuses the next step
instead of silently growing past its budget.

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

import inspect
import logging
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from sinklora.cache.policies import KVPolicy, SlotState, Split, check_positions, check_slack, make_policy
from sinklora.cache.scores import METHODS, accumulated_attention, prompt_attention_with_scores
from sinklora.hf.attention import causal_attention

logger = logging.getLogger(__name__)


class LayerBase(DynamicLayer):
    """What every evicting layer shares: the policy, the budget resolved on the first step, tokens seen,
    the pending-step guard, the attention of a step, statistics and the ``Cache`` layer protocol."""

    is_croppable = False

    def __init__(self, policy: KVPolicy, layer_idx: int = 0, num_layers: int = 1, score_method: str = "auto"):
        super().__init__()
        self.policy, self.layer_idx, self.num_layers, self.score_method = policy, layer_idx, num_layers, score_method
        self._reset_state()

    def _reset_state(self) -> None:
        self.split: Split | None = None  # this layer's budget, resolved on the first step (ratios of the prompt)
        self.resolved = False
        self.seen = 0
        self.step: int | None = None  # slots kept before this step, until finish()
        self.max_kept = 0
        self.max_bytes = 0
        self.evicted = 0

    def kv_bytes(self) -> int:
        """Bytes the layer holds for keys and values."""
        return self.keys.nbytes + self.values.nbytes if self.kept else 0

    def _track(self) -> None:
        self.max_kept = max(self.max_kept, self.kept)
        self.max_bytes = max(self.max_bytes, self.kv_bytes())

    def _begin(self, n_new: int) -> None:
        """Refuse a step while the previous one is pending; resolve the budget on the first step."""
        if self.step is not None:
            raise RuntimeError(
                f"cache policy {self.policy.name!r}: the previous forward step never reached the cache's attention, "
                "so nothing was evicted. Attach the cache while the model runs: `with "
                "sinklora.hf.attention.attach_cache(model, cache) as kw: model.generate(..., **kw)`")
        if not self.resolved:
            self.split, self.resolved = self.policy.split(self.seen + n_new, self.layer_idx, self.num_layers), True

    def _check_padding(self, key_padding: torch.Tensor | None) -> None:
        if key_padding is not None:
            raise ValueError(
                f"cache policy {self.policy.name!r} got a padded batch (attention_mask has zeros): evicting caches keep "
                "different slots per row and cannot follow padding. Pass equal-length prompts (group them by length) "
                "or one prompt at a time; policy 'full' accepts padded batches")

    def _attention(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   scaling: float, dropout: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Causal attention of this step, (B, L, Hq, D), and its column sums when the same pass gives them
        (an H2O prompt on CPU: :func:`prompt_attention_with_scores`), else None."""
        if (self.policy.needs_attention and self.policy.score_window is None and self.score_method == "auto"
                and not dropout and query.shape[-2] > 1 and self.seen == query.shape[-2]):
            both = prompt_attention_with_scores(query, key, value, scaling=scaling)
            if both is not None:
                return both
        return causal_attention(module, query, key, value, None, scaling, dropout), None

    def step_scores(self, query: torch.Tensor, key: torch.Tensor, scaling: float, past: int,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Hkv, slots) this step's attention column sums: its queries (only the last ``score_window``,
        where the policy says so) over ``key``, whose first ``past`` slots every query sees."""
        window = self.policy.score_window
        if window is not None and query.shape[-2] > window:  # only the last queries count
            past, query = past + query.shape[-2] - window, query[:, :, -window:]
        return accumulated_attention(query, key, scaling=scaling, past=past, method=self.score_method,
                                     key_mask=key_mask)

    def get_seq_length(self) -> int:
        return self.seen  # tokens seen: RoPE positions and generate's input slicing stay absolute

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # kept slots are all in the past of every new query: a causal mask over `kept + new` slots whose
        # first slot is placed at `seen - kept` is exactly right (padded batches are refused in attend)
        return self.kept + query_length, self.seen - self.kept

    def reset(self) -> None:
        super().reset()
        self._reset_state()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(f"cache policy {self.policy.name!r} cannot be cropped (evicted tokens are gone); "
                                  "assisted decoding needs policy 'full'")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_batch(lambda t: t[indices, ...])


class PolicyLayer(LayerBase):
    """One layer's cache under a policy, evicting after every step (``slack=0``). Extra state:
    ``positions`` (B, Hkv, slots) absolute token index of every slot, ``attention`` (B, Hkv, slots)
    accumulated attention (policies that need it), ``free`` (B, Hkv, 1) the evicted slot the next one-token
    step overwrites (None while every slot is kept)."""

    def __init__(self, policy: KVPolicy, layer_idx: int = 0, num_layers: int = 1, score_method: str = "auto",
                 inv_freq: torch.Tensor | None = None):
        self.inv_freq = inv_freq  # RoPE frequencies: rank positions (None: absolute)
        super().__init__(policy, layer_idx, num_layers, score_method)

    def _reset_state(self) -> None:
        super()._reset_state()
        self.positions: torch.Tensor | None = None
        self.attention: torch.Tensor | None = None
        self.free: torch.Tensor | None = None

    @property
    def kept(self) -> int:
        """Tokens held (the scratch slot of an evicted token does not count)."""
        if self.keys is None or self.keys.dim() < 3:
            return 0
        return self.keys.shape[-2] - (self.free is not None)

    def token_order(self) -> torch.Tensor:
        """(B, Hkv, kept) slot indices of the kept tokens, oldest first."""
        pos = self.positions
        if self.free is not None:
            pos = pos.scatter(-1, self.free, torch.iinfo(pos.dtype).max)
        return pos.argsort(dim=-1)[..., :self.kept]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        n_new = key_states.shape[-2]
        self._begin(n_new)
        if self.split is None:  # policy 'full': DynamicLayer's append
            super().update(key_states, value_states)
            self.seen += n_new
            self._track()
            return self.keys, self.values
        b, h = key_states.shape[:2]
        new_pos = torch.arange(self.seen, self.seen + n_new, device=key_states.device).repeat(b, h, 1)
        self.step = self.kept
        if self.free is not None and n_new == 1:  # the new token takes the evicted token's slot
            slot = self.free
            rows = slot.unsqueeze(-1).expand(-1, -1, -1, key_states.shape[-1])
            self.keys.scatter_(2, rows, key_states)
            self.values.scatter_(2, rows, value_states)
            self.positions.scatter_(2, slot, new_pos)
            if self.attention is not None:
                self.attention.scatter_(2, slot, 0.0)
            self.free = None
        else:
            if self.free is not None:  # drop the scratch slot, then append in token order
                n = self.keys.shape[-2]
                slots = torch.arange(n - 1, device=self.free.device).expand(b, h, n - 1)
                self._select(torch.where(slots < self.free, slots, slots + 1))
                self.free = None
            super().update(key_states, value_states)  # append (initialises on the first step)
            self.positions = new_pos if self.positions is None else torch.cat([self.positions, new_pos], dim=-1)
            if self.policy.needs_attention:
                zeros = torch.zeros(b, h, n_new, dtype=torch.float32, device=key_states.device)
                self.attention = zeros if self.attention is None else torch.cat([self.attention, zeros], dim=-1)
        self.seen += n_new
        return self.keys, self.values

    def attended_keys(self) -> torch.Tensor:
        """The keys this step attends to: as cached, or re-rotated to rank positions (``inv_freq`` set).

        A kept key at absolute position p and rank r (kept tokens before it) must sit at distance
        ``r_q - r`` from the query instead of ``P - p``: it turns forward by ``(P - r_q) - (p - r)``, the
        number of tokens evicted after it. New tokens (and every token before the first eviction) turn by 0."""
        n = self.keys.shape[-2]
        if self.inv_freq is None or self.seen == n:
            return self.keys
        pos = self.positions
        slots = torch.arange(n, device=pos.device).expand_as(pos)
        rank = torch.empty_like(pos).scatter_(-1, pos.argsort(dim=-1), slots)  # kept tokens older than each slot
        turn = (self.seen - n) - (pos - rank)  # (B, Hkv, n) tokens evicted after each key
        angle = turn.unsqueeze(-1).float() * self.inv_freq.to(pos.device)  # (B, Hkv, n, D/2)
        cos, sin = (torch.cat([f, f], dim=-1).to(self.keys.dtype) for f in (angle.cos(), angle.sin()))
        half = self.keys.shape[-1] // 2
        rotated_half = torch.cat([-self.keys[..., half:], self.keys[..., :half]], dim=-1)  # RoPE's rotate_half
        return self.keys * cos + rotated_half * sin

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               key_padding: torch.Tensor | None, scaling: float, dropout: float = 0.0) -> torch.Tensor:
        """This step's attention over ``key``/``value`` (what :meth:`update` returned), then :meth:`finish`.
        query (B, Hq, L, D) -> (B, L, Hq, D)."""
        if self.step is None:  # policy 'full' (nothing to evict)
            return causal_attention(module, query, key, value, key_padding, scaling, dropout)
        self._check_padding(key_padding)
        key = self.attended_keys()
        if self.policy.needs_attention and query.shape[-2] == 1 and not dropout:
            out, probs = one_query_attention(query, key, value, scaling)  # every slot is in the query's past
        else:
            out, probs = self._attention(module, query, key, value, scaling, dropout)
        self.finish(query, key, scaling, probs)
        return out

    def finish(self, query: torch.Tensor, key: torch.Tensor, scaling: float, probs: torch.Tensor | None = None) -> None:
        """After this step's attention over ``key``: add its scores (if the policy needs them) and evict down
        to the budget. ``probs``: this step's (B, Hkv, slots) attention column sums, if the attention computed them."""
        past, self.step = self.step, None
        if self.policy.needs_attention:
            self.attention += self.step_scores(query, key, scaling, past) if probs is None else probs
        split = self.split
        state = SlotState(self.keys, self.values, self.positions, self.seen, self.attention, query, self.layer_idx,
                          self.num_layers)
        over = self.kept - split.total
        if over == 1:
            self.free = self.policy.evict_slot(state, split)
        elif over > 1:
            self._select(self.policy.keep_indices(state, split))
        self.evicted += max(over, 0)
        self._track()

    def _select(self, keep: torch.Tensor) -> None:
        """Keep the slots ``keep`` (B, Hkv, n) of every per-slot tensor, in that order."""
        rows = keep.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        self.keys, self.values = self.keys.gather(2, rows), self.values.gather(2, rows)
        self.positions = self.positions.gather(2, keep)
        if self.attention is not None:
            self.attention = self.attention.gather(2, keep)

    def _apply_batch(self, fn) -> None:
        for name in ("keys", "values", "positions", "attention", "free"):
            t = getattr(self, name)
            if t is not None and t.numel():
                setattr(self, name, fn(t))


class PolicyCache(Cache):
    """A ``Cache`` whose layers keep tokens by ``policy`` (see :mod:`sinklora.cache.policies`), evicting
    after every step (``slack=0``) or once ``slack`` tokens beyond the budget have piled up (None: the
    default, :data:`~sinklora.defaults.CACHE_SLACK`, or 0 with rank positions)."""

    def __init__(self, policy: KVPolicy, num_layers: int, *, score_method: str = "auto",
                 inv_freq: torch.Tensor | None = None, slack: int | None = None):
        from sinklora.hf.slack import SlackLayer

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
