"""The layers of a :class:`sinklora.hf.cache.PolicyCache` (see that module for how a step runs):
:class:`LayerBase`, what every evicting layer shares, and :class:`PolicyLayer`, which evicts after every
step (``slack=0``). The amortised layer is :class:`sinklora.hf.slack.SlackLayer`."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from sinklora.cache.policies import KVPolicy, SlotState, Split
from sinklora.cache.scores import accumulated_attention, prompt_attention_with_scores
from sinklora.hf.sdpa import causal_attention, one_query_attention

logger = logging.getLogger(__name__)


class LayerBase(DynamicLayer):
    """What every evicting layer shares: the policy, the budget resolved on the first step, tokens seen,
    the pending-step guard, the attention of a step, statistics and the ``Cache`` layer protocol."""

    is_croppable = False

    def __init__(self, policy: KVPolicy, layer_idx: int = 0, num_layers: int = 1, score_method: str = "auto"):
        super().__init__()
        self.policy, self.layer_idx, self.num_layers, self.score_method = policy, layer_idx, num_layers, score_method
        self.deferred = False  # inside sinklora.hf.cache.deferred_eviction: keep every token for now
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
                f"cache policy {self.policy.name!r} got a padded batch (attention_mask has zeros): evicting caches "
                "keep different slots per row and cannot follow padding. Pass equal-length prompts (group them by "
                "length) or one prompt at a time; policy 'full' accepts padded batches")

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

    def counts_step(self) -> bool:
        """Does this step's attention add to the scores? Not a deferred step of a policy that counts only a
        step's last queries: its window is the end of the prompt, which the step after the deferral holds."""
        return self.policy.needs_attention and not (self.deferred and self.policy.score_window is not None)

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
        if self.counts_step():
            self.attention += self.step_scores(query, key, scaling, past) if probs is None else probs
        if self.deferred:
            self._track()
            return
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
