"""KV-cache policies (docs/method.md §3): which cached key/value slots survive each step.

A policy is one small class; the one method to write is :meth:`KVPolicy.score` (higher is kept).
Everything else (budgets, the protected sink and recent windows, top-k, gathering) lives in the
base class, so every policy keeps tokens the same way::

    tokens of one KV head, oldest -> newest (kept + new tokens of this step)
    | sinks S | ............ evictable middle ............ | recent W |
              ^ the K highest score() slots survive here

Roles come from each slot's absolute token position, not from where the slot sits: sinks are tokens
``0..S-1``, the recent window the last ``W`` tokens seen. After every forward step at most ``S + K + W``
slots remain (the budget); the step itself attends to the kept slots plus its own new tokens. Sinks are
never evicted. A one-token step over a full cache evicts exactly one slot (the lowest :meth:`KVPolicy.rank`)
and the next token is written into it, so slot order is token order only until decoding starts
(attention does not depend on slot order: keys carry their RoPE positions).

Budgets are token counts (``int >= 1``) or ratios of the prompt (``float`` in ``(0, 1]``, resolved
when the first forward step sees the prompt). Split: ``S = sink_tokens``; of the rest, ``K =
floor(heavy_ratio * rest)`` heavy hitters and ``W = rest - K`` recent tokens (H2O default: half/half).

| policy | S | K | W | score |
|---|---|---|---|---|
| ``full`` | - | - | - | never evicts |
| ``local`` | 0 | 0 | budget | - (H2O's "Local" baseline) |
| ``sink`` | 4 | 0 | budget - S | - (StreamingLLM) |
| ``h2o`` | 0 (optional) | half | half | attention accumulated over every query that saw the key |
| ``snapkv`` | 0 (optional) | half | half | as h2o, but a multi-token step counts its last 32 queries; pooled |

``snapkv`` (SnapKV's observation window and pooling) scores the prompt by what its end (the question)
attends to, not by what the whole prompt attended to (H2O's sums favour early tokens, which every later
query sees), and keeps the neighbours of a token that scores high, so a span such as a number survives
whole. One-token decoding steps count for both alike (and snapkv keeps pooling when it evicts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sinklora.defaults import CACHE_SINK_TOKENS, HEAVY_RATIO


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
    """Base policy. Subclasses set the class attributes and may override :meth:`score`."""

    name: ClassVar[str] = ""
    needs_attention: ClassVar[bool] = False  # the cache must see the attention probabilities
    default_sink_tokens: ClassVar[int] = 0
    default_heavy_ratio: ClassVar[float] = 0.0
    allows_sinks: ClassVar[bool] = True
    allows_heavy: ClassVar[bool] = False
    score_window: ClassVar[int | None] = None  # needs_attention: count only a step's last N queries (None: all)

    def __init__(self, budget: int | float | str | None = None, *, sink_tokens: int | None = None,
                 heavy_ratio: float | None = None):
        self.budget = parse_budget(budget)
        self.sink_tokens = self.default_sink_tokens if sink_tokens is None else sink_tokens
        self.heavy_ratio = self.default_heavy_ratio if heavy_ratio is None else heavy_ratio
        self._validate()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget!r}, sink_tokens={self.sink_tokens}, heavy_ratio={self.heavy_ratio})"

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
        if not 0.0 <= self.heavy_ratio <= 1.0:
            raise ValueError(f"heavy_ratio={self.heavy_ratio}: must be in [0, 1] (the share of the non-sink "
                             "budget given to heavy hitters; H2O uses 0.5)")
        if self.heavy_ratio and not self.allows_heavy:
            raise ValueError(f"heavy_ratio={self.heavy_ratio}: policy {name!r} keeps no heavy hitters; "
                             "use heavy_ratio=0 or policy 'h2o' or 'snapkv'")
        if isinstance(b, float):
            if not 0.0 < b <= 1.0:
                raise ValueError(f"budget={b}: a ratio of the prompt must be in (0, 1]; for a token count "
                                 f"give an integer (e.g. budget={max(1, int(b))})")
        elif b < 1:
            raise ValueError(f"budget={b}: must be at least 1 token (or a ratio of the prompt in (0, 1])")
        elif b < self.sink_tokens:
            raise ValueError(f"budget={b} is smaller than sink_tokens={self.sink_tokens}: the sinks alone would not "
                             f"fit; raise the budget to at least {self.sink_tokens} or lower sink_tokens")

    def split(self, prompt_len: int, layer_idx: int = 0, num_layers: int = 1) -> Split | None:
        """The budget of layer ``layer_idx`` (of ``num_layers``) for a cache whose first forward step holds
        ``prompt_len`` tokens (None = unbounded). The same for every layer here; a per-layer policy
        (PyramidKV) overrides this."""
        b = self.budget
        total = b if isinstance(b, int) else max(1, round(b * prompt_len))
        if total < self.sink_tokens:
            raise ValueError(f"budget={b} of a {prompt_len}-token prompt is {total} tokens, fewer than "
                             f"sink_tokens={self.sink_tokens}; raise the budget or lower sink_tokens")
        rest = total - self.sink_tokens
        heavy = int(rest * self.heavy_ratio)
        return Split(self.sink_tokens, heavy, rest - heavy)

    def score(self, state: SlotState) -> torch.Tensor | None:
        """Importance of every slot, (B, Hkv, N); the top ``heavy`` of the evictable middle survive.
        ``None``: no heavy hitters (only sinks and recent tokens are kept)."""
        return None

    def rank(self, state: SlotState, split: Split) -> torch.Tensor:
        """(B, Hkv, N) float32 keep priority: +inf for sinks and the recent window, :meth:`score` for the
        evictable middle (its position when the policy has no scores: first in, first out)."""
        pos = state.positions
        protected = (pos < split.sink_tokens) | (pos >= state.seen - split.recent)
        scores = self.score(state) if split.heavy else None
        return (pos if scores is None else scores).float().masked_fill(protected, float("inf"))

    def keep_indices(self, state: SlotState, split: Split) -> torch.Tensor | None:
        """The ``split.total`` highest-ranked slots in slot order, (B, Hkv, total); None keeps all."""
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


POLICIES: dict[str, type[KVPolicy]] = {
    p.name: p for p in (FullPolicy, LocalPolicy, SinkPolicy, H2OPolicy, SnapKVPolicy)}


def make_policy(name: str, budget: int | float | str | None = None, *, sink_tokens: int | None = None,
                heavy_ratio: float | None = None) -> KVPolicy:
    """A policy by name: 'full', 'local', 'sink' or 'h2o' (see the module docstring)."""
    if name not in POLICIES:
        raise ValueError(f"cache policy {name!r} is unknown; choose one of {', '.join(map(repr, POLICIES))}")
    return POLICIES[name](budget, sink_tokens=sink_tokens, heavy_ratio=heavy_ratio)


POSITIONS = ("absolute", "rank")


def check_positions(positions: str, policy: str) -> None:
    """Refuse an unknown ``positions`` mode, or rank positions for a cache that never evicts."""
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}: choose 'absolute' (default) or 'rank' (StreamingLLM's positions "
                         "within the cache)")
    if positions == "rank" and policy == "full":
        raise ValueError("positions='rank' re-rotates keys after evictions; policy 'full' never evicts: drop it, "
                         "or pick policy 'sink', 'local', 'h2o' or 'snapkv'")
