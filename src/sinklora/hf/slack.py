"""Amortised eviction (docs/method.md §3, ``slack``): a cache layer that grows to ``budget + slack`` tokens
in pre-allocated buffers, then evicts down to the budget in one pass.

Between evictions a one-token step does the full cache's work and only this beyond it::

    keys/values  written in place into slot n (``index_copy_``; the full cache concatenates instead)
    attention    SDPA over the views keys[:, :, :n+1], made once per buffer and reused every period
    query        (policies with scores) written into a buffer of ``slack + 1`` queries

No sort, gather, concatenation or scoring per step. The decoding queries kept since the last eviction
each saw the slots up to its own, and those slots sit in token order at the end of the buffer, so at the
next eviction their column sums are one causal :func:`~sinklora.cache.scores.accumulated_attention` over
them: the sums a per-step accumulation gives. The positions of appended slots are implied (slot
``n0 + j`` holds token ``s0 + j``) and written when something reads them.

Buffers (B, Hkv, capacity, ...), capacity = budget + slack + 1 (more if a ragged policy's widest head
keeps more than the budget)::

    | kept at the last eviction | appended since, in token order | unused            |
    0                           n0                               n          capacity

A head that keeps fewer slots than the widest (``adakv``) has dead slots: position -1, score 0 and
``alive`` False, which masks them out of attention and scores.
"""

from __future__ import annotations

from typing import Any

import torch

from sinklora.cache.policies import KVPolicy, SlotState
from sinklora.cache.scores import accumulated_attention
from sinklora.defaults import CACHE_SLACK
from sinklora.hf.layers import LayerBase
from sinklora.hf.sdpa import masked_attention


class SlackLayer(LayerBase):
    """One layer's cache under a policy with amortised eviction (see the module docstring)."""

    def __init__(self, policy: KVPolicy, layer_idx: int = 0, num_layers: int = 1, score_method: str = "auto",
                 slack: int = CACHE_SLACK):
        self.slack = slack
        super().__init__(policy, layer_idx, num_layers, score_method)

    def _reset_state(self) -> None:
        super()._reset_state()
        self.n = 0  # slots in use (the first n of the buffers), dead ones included
        self.width = 0  # slots in use after the last eviction (the budget; a ragged policy's widest head)
        self.buf: dict[str, torch.Tensor] = {}  # keys, values, positions, attention, alive: (B, Hkv, capacity[, D])
        self.loose: dict[str, torch.Tensor] | None = None  # a multi-token step's slots, until finish()
        self.synced = 0  # slots whose position is written
        self.queries: torch.Tensor | None = None  # (B, Hq, slack + 1, D) decoding queries not yet scored
        self.pending = 0
        self.first_pending = 0  # the slot the first pending query's step appended
        self.scaling = 1.0
        self.query_mask: torch.Tensor | None = None  # (B, Hq, 1, capacity) alive, per query head (ragged)
        self.views: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self.slot_index: list[torch.Tensor | None] = []

    # ---- state as the other layers show it ---------------------------------------------------------

    @property
    def kept(self) -> int:
        return self.n

    def kv_bytes(self) -> int:
        if self.loose is None and self.buf:
            return self.buf["keys"].nbytes + self.buf["values"].nbytes  # allocated: budget + slack + 1 slots
        return super().kv_bytes()

    def _slots(self) -> dict[str, torch.Tensor]:
        """Every per-slot tensor, (B, Hkv, n[, D]), positions and scores brought up to date."""
        if self.loose is not None:
            return self.loose
        self._settle()
        return {name: t[:, :, :self.n] for name, t in self.buf.items()}

    @property
    def positions(self) -> torch.Tensor | None:
        """(B, Hkv, kept) absolute token index of every slot (-1: dead)."""
        return self._slots().get("positions")

    @property
    def attention(self) -> torch.Tensor | None:
        """(B, Hkv, kept) accumulated attention, the queries kept since the last eviction included."""
        return self._slots().get("attention")

    def token_order(self) -> torch.Tensor:
        """(B, Hkv, kept) slot indices, oldest first (dead slots first of all)."""
        return self.positions.argsort(dim=-1)

    # ---- a step ----------------------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        n_new = key_states.shape[-2]
        self._begin(n_new)
        self.step = self.n
        if n_new == 1 and self.buf and self.loose is None and not self.deferred and self.n < self.buf["keys"].shape[2]:
            # in place: no new tensor
            slot = self._slot(self.n)
            self.buf["keys"].index_copy_(2, slot, key_states)
            self.buf["values"].index_copy_(2, slot, value_states)
            self.n += 1
            self.keys, self.values, _ = self._view(self.n)
        else:  # the prompt, a new chat turn: append, then finish() stores or evicts
            old = self._slots()
            b, h, dev = key_states.shape[0], key_states.shape[1], key_states.device
            new = {"keys": key_states, "values": value_states,
                   "positions": torch.arange(self.seen, self.seen + n_new, device=dev).expand(b, h, n_new)}
            if self.policy.needs_attention:
                new["attention"] = torch.zeros(b, h, n_new, dtype=torch.float32, device=dev)
            if self.policy.ragged:
                new["alive"] = torch.ones(b, h, n_new, dtype=torch.bool, device=dev)
            self.loose = {name: torch.cat([old[name], t], dim=2) if name in old else t for name, t in new.items()}
            self.keys, self.values = self.loose["keys"], self.loose["values"]
            self.n += n_new
            self.synced = self.n
        self.seen += n_new
        return self.keys, self.values

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               key_padding: torch.Tensor | None, scaling: float, dropout: float = 0.0) -> torch.Tensor:
        """This step's attention over ``key``/``value`` (dead slots masked), then :meth:`finish`."""
        self._check_padding(key_padding)
        self.scaling = scaling
        mask = self._mask(query) if self.policy.ragged else None
        if mask is not None:
            out, probs = masked_attention(query, key, value, mask, scaling, dropout), None
        else:
            out, probs = self._attention(module, query, key, value, scaling, dropout)
        self.finish(query, key, scaling, probs)
        return out

    def finish(self, query: torch.Tensor, key: torch.Tensor, scaling: float, probs: torch.Tensor | None = None) -> None:
        """After this step's attention: keep its query (one token) or add its scores (several), then evict
        down to the budget once more than ``budget + slack`` slots are in use (a ragged policy: once
        ``slack`` more than its widest head kept at the last eviction)."""
        past, self.step = self.step, None
        if self.policy.needs_attention and self.loose is None:  # a one-token step, written in place
            self._keep_query(query)
        elif self.counts_step():
            alive = self.loose.get("alive")
            self.loose["attention"] += self.step_scores(query, key, scaling, past, alive) if probs is None else probs
        if self.deferred:  # the slots stay loose until the step after the deferral
            self._track()
            return
        if self.n > max(self.split.total, self.width) + self.slack:
            self._evict(query)
        elif self.loose is not None:
            self._store(None, query)
        self._track()

    def _keep_query(self, query: torch.Tensor) -> None:
        if self.pending == self.queries.shape[2]:  # more steps than slack since the last eviction (short prompt)
            self._score_pending()
        if not self.pending:
            self.first_pending = self.n - 1
        self.queries.index_copy_(2, self._slot(self.pending), query)
        self.pending += 1

    def _score_pending(self) -> None:
        """Add the kept decoding queries' column sums: query j saw slots [0, first_pending + j]."""
        if not self.pending:
            return
        end = self.first_pending + self.pending
        alive = self.buf["alive"][:, :, :end] if "alive" in self.buf else None
        self.buf["attention"][:, :, :end] += accumulated_attention(
            self.queries[:, :, :self.pending], self.buf["keys"][:, :, :end], scaling=self.scaling,
            past=self.first_pending, method=self.score_method, key_mask=alive)
        self.pending = 0

    def _settle(self) -> None:
        """Score the pending queries; write the implied positions of the slots appended since."""
        if not self.pending and self.synced == self.n:
            return
        # buffers made under inference_mode (generate) can only be written there, also when read later
        with torch.inference_mode(self.buf["positions"].is_inference()):
            self._score_pending()
            appended = self.n - self.synced
            self.buf["positions"][:, :, self.synced:self.n] = torch.arange(
                self.seen - appended, self.seen, device=self.buf["positions"].device)
            self.synced = self.n

    def _evict(self, query: torch.Tensor) -> None:
        slots = self._slots()
        state = SlotState(slots["keys"], slots["values"], slots["positions"], self.seen, slots.get("attention"), query,
                          self.layer_idx, self.num_layers)
        alive = slots.get("alive")
        live = self.n if alive is None else int(alive.sum()) // (alive.shape[0] * alive.shape[1])
        self.evicted += live - self.split.total
        self._store(self.policy.keep_indices(state, self.split), query)

    def _store(self, keep: torch.Tensor | None, query: torch.Tensor) -> None:
        """Put the kept slots (``keep``: (B, Hkv, w) indices, -1 dead; None: all) at the buffers' start."""
        slots, n = self._slots(), self.n
        if keep is not None:
            index = keep.clamp(min=0)
            slots = {name: t.gather(2, index if t.dim() == 3 else index.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1]))
                     for name, t in slots.items()}
            if self.policy.ragged:
                dead = keep < 0
                slots["alive"] &= ~dead
                slots["positions"] = slots["positions"].masked_fill(dead, -1)
                slots["attention"] = slots["attention"].masked_fill(dead, 0.0)
            n = self.width = index.shape[-1]
        if not self.buf or n + self.slack >= self.buf["keys"].shape[2]:  # first store, or a ragged head grew
            self._allocate(slots, query, n)
        for name, t in slots.items():
            self.buf[name][:, :, :n].copy_(t)
        if "attention" in self.buf:
            self.buf["attention"][:, :, n:].zero_()  # appended slots start at 0
        if "alive" in self.buf:
            self.buf["alive"][:, :, n:] = True
            groups = query.shape[1] // self.buf["alive"].shape[1]
            self.query_mask.copy_(self.buf["alive"].repeat_interleave(groups, dim=1)[:, :, None, :])
        self.n = self.synced = n
        self.loose = None
        self.keys, self.values, _ = self._view(n)

    # ---- buffers and their views -------------------------------------------------------------------------

    def _allocate(self, slots: dict[str, torch.Tensor], query: torch.Tensor, n: int) -> None:
        """Buffers for ``budget + slack + 1`` slots; a ragged policy's widest head may keep more than the
        budget: then twice what it exceeds by, so that growing stays rare."""
        capacity = self.split.total + 2 * max(0, n - self.split.total) + self.slack + 1
        self.buf = {name: t.new_empty(*t.shape[:2], capacity, *t.shape[3:]) for name, t in slots.items()}
        if self.policy.needs_attention and self.queries is None:
            self.queries = query.new_empty(*query.shape[:2], self.slack + 1, query.shape[-1])
        if self.policy.ragged:
            self.query_mask = torch.ones(query.shape[0], query.shape[1], 1, capacity, dtype=torch.bool,
                                         device=query.device)
        self.views, self.slot_index = {}, [None] * capacity
        self._arange = torch.arange(capacity, device=query.device)
        # made now, at an eviction, and reused every eviction period: decoding makes no views
        start = min(self.split.total, n)
        for width in range(start + 1, capacity + 1):
            self._view(width)
        for i in (*range(start, capacity), *range(self.slack + 1)):
            self._slot(i)

    def _view(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """keys, values and (ragged) the query-head mask of the first ``n`` slots."""
        view = self.views.get(n)
        if view is None:
            mask = None if self.query_mask is None else self.query_mask[..., :n]
            view = self.views[n] = (self.buf["keys"][:, :, :n], self.buf["values"][:, :, :n], mask)
        return view

    def _slot(self, i: int) -> torch.Tensor:
        """A one-element index tensor ``[i]`` for ``index_copy_``."""
        if self.slot_index[i] is None:
            self.slot_index[i] = self._arange[i:i + 1]
        return self.slot_index[i]

    def _mask(self, query: torch.Tensor) -> torch.Tensor | None:
        """(B, Hq, L, n) which slots each query head attends to: alive, and causal among this step's tokens."""
        if self.loose is None:
            return self._view(self.n)[2]
        alive = self.loose["alive"]
        if bool(alive.all()):
            return None
        n_q, n = query.shape[2], alive.shape[-1]
        causal = torch.arange(n, device=alive.device) <= torch.arange(n - n_q, n, device=alive.device)[:, None]
        return alive.repeat_interleave(query.shape[1] // alive.shape[1], dim=1)[:, :, None, :] & causal

    def _apply_batch(self, fn) -> None:
        self.buf = {name: fn(t) for name, t in self.buf.items()}
        if self.loose is not None:
            self.loose = {name: fn(t) for name, t in self.loose.items()}
            self.keys, self.values = self.loose["keys"], self.loose["values"]
        for name in ("queries", "query_mask"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))
        self.views = {}
        if self.buf and self.loose is None:
            self.keys, self.values, _ = self._view(self.n)
