"""KV-cache policies (docs/method.md §3): which cached key/value slots survive each step.

A policy is one small class; the one method to write is :meth:`KVPolicy.score` (higher is kept).
Everything else (budgets, the protected sink and recent windows, top-k, gathering) lives in the
base class, so every policy keeps tokens the same way::

    tokens of one KV head, oldest -> newest (kept + new tokens of this step)
    | sinks S | ............ evictable middle ............ | recent W |
              ^ the K highest score() slots survive here

Roles come from each slot's absolute token position, not from where the slot sits: sinks are tokens
``0..S-1``, the recent window the last ``W`` tokens seen. An eviction leaves ``S + K + W`` slots (the
budget) per head; the step itself attends to the kept slots plus its own new tokens. Sinks are never
evicted. With ``slack=0`` a one-token step over a full cache evicts exactly one slot (the lowest
:meth:`KVPolicy.rank`) and the next token is written into it, so slot order is token order only until
decoding starts (attention does not depend on slot order: keys carry their RoPE positions).

Budgets are token counts (``int``, more than the sinks) or ratios of the prompt (``float`` in ``(0, 1]``,
resolved when the first forward step sees the prompt, never below ``budget_floor`` tokens: 20% of a
30-token chat prompt would keep 6 tokens and evict the question). Split: ``S = sink_tokens``; of the
rest, ``K = floor(heavy_ratio * rest)`` heavy hitters and ``W = rest - K >= 1`` recent tokens (H2O
default: half/half). How often the cache evicts (every step, or once ``slack`` tokens have piled up)
is the cache's business (:mod:`sinklora.hf.cache`), not the policy's.

| policy | S | K | W | score |
|---|---|---|---|---|
| ``full`` | - | - | - | never evicts |
| ``local`` | 0 | 0 | budget | - (H2O's "Local" baseline) |
| ``sink`` | 4 | 0 | budget - S | - (StreamingLLM) |
| ``h2o`` | 0 (optional) | half | half | attention accumulated over every query that saw the key |
| ``snapkv`` | 0 (optional) | half | half | as h2o, but a multi-token step counts its last 32 queries; pooled |
| ``pyramidkv`` | as snapkv | K per layer: from ``2K - K/20`` (layer 0) down to ``K/20`` (last) | as snapkv | snapkv's |
| ``adakv`` | as snapkv | ``Hkv * K`` per layer, shared by its KV heads (each keeps >= 20% of K) | as snapkv | snapkv's |

``snapkv`` (SnapKV's observation window and pooling) scores the prompt by what its end (the question)
attends to, not by what the whole prompt attended to (H2O's sums favour early tokens, which every later
query sees), and keeps the neighbours of a token that scores high, so a span such as a number survives
whole. One-token decoding steps count for both alike (and snapkv keeps pooling when it evicts).
``pyramidkv`` (PyramidKV) gives lower layers more heavy hitters and upper layers fewer, the same in
total; ``adakv`` (Ada-KV) lets the KV heads of a layer share their heavy hitters, so a head whose
attention is spread out keeps more than one whose attention is concentrated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sinklora.defaults import CACHE_AUTO_POLICY, CACHE_SINK_TOKENS, CACHE_SLACK, HEAVY_RATIO


@dataclass(frozen=True)
class Split:
    """A resolved budget: slots kept after every step, by role."""

    sink_tokens: int
    heavy: int
    recent: int

    @property
    def total(self) -> int:
        return self.sink_tokens + self.heavy + self.recent


@dataclass
class SlotState:
    """What a policy sees of one layer's step. Shapes: ``keys``/``values`` (B, Hkv, N, D) every slot,
    kept and new; ``positions`` (B, Hkv, N) absolute token index of every slot; ``seen`` tokens seen so
    far; ``attention`` (B, Hkv, N) float32 accumulated attention (only when the policy ``needs_attention``);
    ``queries`` (B, Hq, L, D) this step's queries, RoPE applied (None outside a forward step);
    ``layer_idx`` / ``num_layers`` which layer of how many (per-layer budgets and scorers)."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    seen: int
    attention: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    layer_idx: int = 0
    num_layers: int = 1


def parse_budget(value: int | float | str | None) -> int | float | None:
    """``512`` -> 512 tokens; ``0.2``, ``"0.2"``, ``"20%"`` -> ratio 0.2; ``None``/``""`` -> no budget.

    A string with a decimal point or a percent sign is a ratio, so ``"1.0"`` is the whole prompt.
    """
    if value is None or isinstance(value, bool):
        if isinstance(value, bool):
            raise ValueError(f"budget={value!r}: give a token count (e.g. 512) or a ratio of the prompt (e.g. 0.2)")
        return None
    if isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    if not text or text.lower() == "none":
        return None
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise ValueError(f"budget={value!r}: not a number; give a token count (e.g. 512), a ratio "
                         "(e.g. 0.2) or a percentage (e.g. 20%)") from None


class KVPolicy:
    """Base policy. Subclasses set the class attributes and may override :meth:`score` (and, for budgets
    per layer or per head, :meth:`split` or :meth:`keep_indices`)."""

    name: ClassVar[str] = ""
    needs_attention: ClassVar[bool] = False  # the cache must see the attention probabilities
    default_sink_tokens: ClassVar[int] = 0
    default_heavy_ratio: ClassVar[float] = 0.0
    allows_sinks: ClassVar[bool] = True
    allows_heavy: ClassVar[bool] = False
    score_window: ClassVar[int | None] = None  # needs_attention: count only a step's last N queries (None: all)
    ragged: ClassVar[bool] = False  # KV heads keep different numbers of slots (keep_indices pads with -1)

    def __init__(self, budget: int | float | str | None = None, *, sink_tokens: int | None = None,
                 heavy_ratio: float | None = None, budget_floor: int = 0):
        self.budget = parse_budget(budget)
        self.sink_tokens = self.default_sink_tokens if sink_tokens is None else sink_tokens
        self.heavy_ratio = self.default_heavy_ratio if heavy_ratio is None else heavy_ratio
        self.budget_floor = budget_floor
        self._validate()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(budget={self.budget!r}, sink_tokens={self.sink_tokens}, "
                f"heavy_ratio={self.heavy_ratio})")

    def _validate(self) -> None:
        b, name = self.budget, self.name
        if b is None:
            raise ValueError(f"policy {name!r}: budget is required; give a token count (e.g. budget=512) or a "
                             "ratio of the prompt (e.g. budget=0.2), or use policy 'full'")
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ValueError(f"budget={b!r}: must be a token count (int) or a ratio of the prompt (float)")
        s = self.sink_tokens
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"sink_tokens={s!r}: must be an integer >= 0 (StreamingLLM uses 4)")
        if s and not self.allows_sinks:
            raise ValueError(f"sink_tokens={s}: policy {name!r} keeps no sink tokens; use sink_tokens=0, or policy "
                             "'sink' (sinks + recent) or 'h2o' (optional sinks + heavy hitters + recent)")
        if not 0.0 <= self.heavy_ratio < 1.0:
            raise ValueError(f"heavy_ratio={self.heavy_ratio}: must be in [0, 1) (the share of the non-sink "
                             "budget given to heavy hitters; the rest, at least one token, is the recent window; "
                             "H2O uses 0.5)")
        if self.heavy_ratio and not self.allows_heavy:
            raise ValueError(f"heavy_ratio={self.heavy_ratio}: policy {name!r} keeps no heavy hitters; "
                             "use heavy_ratio=0 or policy 'h2o' or 'snapkv'")
        if isinstance(self.budget_floor, bool) or not isinstance(self.budget_floor, int) or self.budget_floor < 0:
            raise ValueError(f"budget_floor={self.budget_floor!r}: must be an integer >= 0 (tokens)")
        if isinstance(b, float):
            if not 0.0 < b <= 1.0:
                raise ValueError(f"budget={b}: a ratio of the prompt must be in (0, 1]; for a token count "
                                 f"give an integer (e.g. budget={max(1, int(b))})")
        elif b < 1:
            raise ValueError(f"budget={b}: must be at least 1 token (or a ratio of the prompt in (0, 1])")
        elif b <= self.sink_tokens:
            raise ValueError(f"budget={b} with sink_tokens={self.sink_tokens} leaves no room for recent tokens (the "
                             f"sinks alone fill it); raise the budget to at least {self.sink_tokens + 1} or lower "
                             "sink_tokens")

    def split(self, prompt_len: int, layer_idx: int = 0, num_layers: int = 1) -> Split | None:
        """The budget of layer ``layer_idx`` (of ``num_layers``) for a cache whose first forward step holds
        ``prompt_len`` tokens (None = unbounded). The same for every layer here; a per-layer policy
        (PyramidKV) overrides this."""
        b = self.budget
        total = b if isinstance(b, int) else max(1, round(b * prompt_len), self.budget_floor)
        if total <= self.sink_tokens:
            raise ValueError(f"budget={b} of a {prompt_len}-token prompt is {total} tokens, no more than "
                             f"sink_tokens={self.sink_tokens}: no room for recent tokens; raise the budget or lower "
                             "sink_tokens")
        rest = total - self.sink_tokens
        heavy = int(rest * self.heavy_ratio)
        return Split(self.sink_tokens, heavy, rest - heavy)

    def score(self, state: SlotState) -> torch.Tensor | None:
        """Importance of every slot, (B, Hkv, N); the top ``heavy`` of the evictable middle survive.
        ``None``: no heavy hitters (only sinks and recent tokens are kept)."""
        return None

    def rank(self, state: SlotState, split: Split) -> torch.Tensor:
        """(B, Hkv, N) float32 keep priority: +inf for sinks and the recent window, :meth:`score` for the
        evictable middle (its position when the policy has no scores: first in, first out), -inf for dead
        slots (position -1: a head that keeps fewer slots than the widest)."""
        pos = state.positions
        protected = (pos < split.sink_tokens) | (pos >= state.seen - split.recent)
        scores = self.score(state) if split.heavy else None
        rank = (pos if scores is None else scores).float().masked_fill(protected, float("inf"))
        return rank.masked_fill(pos < 0, float("-inf")) if self.ragged else rank

    def keep_indices(self, state: SlotState, split: Split) -> torch.Tensor | None:
        """The slots that survive, in slot order: (B, Hkv, total), the ``split.total`` highest-ranked of
        each head; None keeps all. A ragged policy returns (B, Hkv, widest) padded with -1."""
        if state.keys.shape[-2] <= split.total:
            return None
        return self.rank(state, split).topk(split.total, dim=-1, sorted=False).indices.sort(dim=-1).values

    def evict_slot(self, state: SlotState, split: Split) -> torch.Tensor:
        """The one slot to drop when a step left ``split.total + 1`` slots: (B, Hkv, 1), the lowest rank
        (the same choice as :meth:`keep_indices`, without moving any data)."""
        return self.rank(state, split).argmin(dim=-1, keepdim=True)


class FullPolicy(KVPolicy):
    """Keep everything (the reference)."""

    name = "full"

    def _validate(self) -> None:
        if self.budget is not None:
            raise ValueError(f"budget={self.budget!r}: policy 'full' keeps everything; drop the budget or pick "
                             "policy 'local', 'sink' or 'h2o'")

    def split(self, prompt_len: int, layer_idx: int = 0, num_layers: int = 1) -> Split | None:
        return None


class LocalPolicy(KVPolicy):
    """The most recent ``budget`` tokens only (H2O's "Local" baseline; collapses once sinks leave)."""

    name = "local"
    allows_sinks = False


class SinkPolicy(KVPolicy):
    """StreamingLLM: the first ``sink_tokens`` tokens and the most recent ``budget - sink_tokens``."""

    name = "sink"
    default_sink_tokens = CACHE_SINK_TOKENS


class H2OPolicy(KVPolicy):
    """H2O: optional sinks, heavy hitters by accumulated attention (per KV head), and recent tokens."""

    name = "h2o"
    needs_attention = True
    default_heavy_ratio = HEAVY_RATIO
    allows_heavy = True

    def score(self, state: SlotState) -> torch.Tensor | None:
        return state.attention


class SnapKVPolicy(H2OPolicy):
    """H2O whose prompt scores come from the prompt's last ``score_window`` queries (SnapKV's observation
    window), max-pooled over ``pool`` neighbouring tokens: what the question at the end of a long prompt
    attends to survives, with its neighbours."""

    name = "snapkv"
    score_window = 32
    pool = 7

    def score(self, state: SlotState) -> torch.Tensor | None:
        order = state.positions.argsort(dim=-1)  # pool over neighbouring *tokens* (slots are not in token order)
        scores = state.attention.gather(-1, order)
        b, h, n = scores.shape
        pooled = torch.nn.functional.max_pool1d(scores.reshape(b * h, 1, n), self.pool, stride=1,
                                                padding=self.pool // 2).reshape(b, h, n)
        return torch.empty_like(pooled).scatter_(-1, order, pooled)


class PyramidKVPolicy(SnapKVPolicy):
    """PyramidKV: snapkv's scores, with heavy hitters spread over layers as an arithmetic sequence from
    ``2K - K/beta`` (layer 0) down to ``K/beta`` (the last layer): lower layers, whose attention is spread
    out, keep more; the total over layers stays ``num_layers * K`` (up to rounding)."""

    name = "pyramidkv"
    beta = 20  # PyramidKV's default steepness

    def split(self, prompt_len: int, layer_idx: int = 0, num_layers: int = 1) -> Split | None:
        base = super().split(prompt_len, layer_idx, num_layers)
        if num_layers < 2 or not base.heavy:
            return base
        low = base.heavy / self.beta
        high = 2 * base.heavy - low
        heavy = round(high - layer_idx * (high - low) / (num_layers - 1))
        return Split(base.sink_tokens, heavy, base.recent)


class AdaKVPolicy(SnapKVPolicy):
    """Ada-KV (Ada-SnapKV): snapkv's scores; the ``Hkv * K`` heavy hitters of a layer go to the highest
    scores over all its KV heads, each head keeping at least its own top ``safeguard * K``. Heads then keep
    different numbers of slots: the cache pads the narrower ones with dead slots that attention masks."""

    name = "adakv"
    ragged = True
    safeguard = 0.2  # Ada-KV's alpha: the share of K every head keeps for itself

    def keep_indices(self, state: SlotState, split: Split) -> torch.Tensor | None:
        rank = self.rank(state, split)  # +inf sinks/recent, -inf dead, scores in the middle
        b, h, n = rank.shape
        middle = rank.isfinite()
        keep = rank == float("inf")
        candidates = rank.masked_fill(~middle, float("-inf"))
        safe = min(int(self.safeguard * split.heavy), n)
        if safe:
            own = torch.zeros_like(keep).scatter_(-1, candidates.topk(safe, dim=-1).indices, True)
            keep |= own & middle
        shared = h * (split.sink_tokens + split.heavy + split.recent) - keep.sum(dim=(1, 2))  # (B,) still to keep
        rest = candidates.masked_fill(keep, float("-inf")).reshape(b, h * n)
        top = rest.topk(min(int(shared.max()), h * n), dim=-1)  # sorted: the first shared[b] of row b
        take = (torch.arange(top.indices.shape[-1], device=rank.device) < shared[:, None]) & top.values.isfinite()
        keep |= torch.zeros_like(rest, dtype=torch.bool).scatter_(-1, top.indices, take).view(b, h, n)
        return packed_indices(keep)


def packed_indices(keep: torch.Tensor) -> torch.Tensor:
    """(B, H, N) bool -> (B, H, widest) the kept slots of every head in slot order, padded with -1."""
    counts = keep.sum(dim=-1, keepdim=True)
    order = (~keep).to(torch.uint8).argsort(dim=-1, stable=True)[..., :int(counts.max())]  # kept slots first
    return order.masked_fill(torch.arange(order.shape[-1], device=keep.device) >= counts, -1)


POLICIES: dict[str, type[KVPolicy]] = {
    p.name: p for p in (FullPolicy, LocalPolicy, SinkPolicy, H2OPolicy, SnapKVPolicy, PyramidKVPolicy, AdaKVPolicy)}
AUTO = "auto"  # the policy name that picks: full without a budget, CACHE_AUTO_POLICY with one


def policy_name(name: str, budget: int | float | str | None) -> str:
    """``auto`` resolved: 'full' without a budget, the default compressing policy with one."""
    if name != AUTO:
        return name
    return "full" if parse_budget(budget) is None else CACHE_AUTO_POLICY


def make_policy(name: str, budget: int | float | str | None = None, *, sink_tokens: int | None = None,
                heavy_ratio: float | None = None, budget_floor: int = 0) -> KVPolicy:
    """A policy by name: 'auto', 'full', 'local', 'sink', 'h2o', 'snapkv', 'pyramidkv' or 'adakv' (see the
    module docstring)."""
    name = policy_name(name, budget)
    if name not in POLICIES:
        raise ValueError(f"cache policy {name!r} is unknown; choose {AUTO!r} (full without a budget, "
                         f"{CACHE_AUTO_POLICY!r} with one) or one of {', '.join(map(repr, POLICIES))}")
    return POLICIES[name](budget, sink_tokens=sink_tokens, heavy_ratio=heavy_ratio, budget_floor=budget_floor)


POSITIONS = ("absolute", "rank")


def check_positions(positions: str, policy: str) -> None:
    """Refuse an unknown ``positions`` mode, or rank positions for a cache that never evicts."""
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}: choose 'absolute' (default) or 'rank' (StreamingLLM's positions "
                         "within the cache)")
    if positions == "rank" and policy == "full":
        raise ValueError("positions='rank' re-rotates keys after evictions; policy 'full' never evicts: drop it, "
                         "or pick policy 'sink', 'local', 'h2o' or 'snapkv'")


def check_slack(slack: int | None, policy: KVPolicy, positions: str) -> int:
    """The slack to use (None: :data:`~sinklora.defaults.CACHE_SLACK`, or 0 with rank positions, which
    re-rotate keys at every step anyway); refuses one that the policy or the positions cannot use."""
    if slack is None:
        return CACHE_SLACK if positions == "absolute" else 0
    if isinstance(slack, bool) or not isinstance(slack, int) or slack < 0:
        raise ValueError(f"slack={slack!r}: must be an integer >= 0 (tokens the cache may grow past its budget "
                         f"before it evicts; 0 evicts after every step; default {CACHE_SLACK})")
    if slack and positions == "rank":
        raise ValueError(f"slack={slack} with positions='rank': rank positions re-rotate every kept key at every "
                         "step, so eviction cannot wait; use slack=0 (the default with rank positions)")
    if not slack and policy.ragged:
        raise ValueError(f"slack=0 with policy {policy.name!r}: its KV heads keep different numbers of tokens, which "
                         f"needs the buffered cache; give slack >= 1 (default {CACHE_SLACK})")
    return slack
