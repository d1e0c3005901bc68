"""Training attention patterns as typed objects (docs/method.md §2).

A :class:`Pattern` says *what* to compute, for any length: built once (from a config section or in
code), validated once in its constructor. :meth:`Pattern.resolve` fixes it for one sequence length
and head layout (a :class:`PatternSpec`, cached); the spec's :meth:`~PatternSpec.predicate` is the
pattern's definition, composed from :mod:`sinklora.attention.masks`, and every backend computes
exactly the softmax over the keys it allows.

N = 12, G = 4 (so the shift s = G // 2 = 2), S = 1 sink. Rows are queries, columns keys::

    s2, unshifted heads (h < H//2)        s2, shifted heads (h >= H//2)         sf = s2 + sinks (shifted head)
    q\\kv 0 1 2 3 4 5 6 7 8 9 0 1          q\\kv 0 1 2 3 4 5 6 7 8 9 0 1          q\\kv 0 1 2 3 4 5 6 7 8 9 0 1
     0   x                                 0   x                                 0   x
     1   x x                               1   x x                               1   x x
     2   x x x                             2       x                             2   x   x
     3   x x x x                           3       x x                           3   x   x x
     4           x                         4       x x x                         4   x   x x x
     5           x x                       5       x x x x                       5   x   x x x x
     6           x x x                     6               x                     6   x           x
     7           x x x x                   7               x x                   7   x           x x
     8                   x                 8               x x x                 8   x           x x x
     9                   x x               9               x x x x               9   x           x x x x
    10                   x x x            10                       x            10   x                   x
    11                   x x x x          11                       x x          11   x                   x x

The shifted heads' first and last groups are short groups of their own (no wrap-around: SinkLoRA's
"segmentation and reassembly", LongLoRA's flash-attention path). ``s2_roll`` rolls the shifted heads
by -s before grouping instead, so its last group holds tokens 10, 11, 0, 1 and tokens 0 and 1 see
tokens 10 and 11: LongLoRA's leaky eager path, kept only to reproduce it.

Rules for awkward shapes: any N works (the last group is shorter); G >= N is plain causal attention
(one group covers the sequence); sinks are the first ``sink_tokens`` positions and attend causally;
sinks must be fewer than the tokens of a group. Heads are query heads (with GQA a KV head may serve
shifted and unshifted query heads). This module imports nothing heavy: configs validate through it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

from sinklora.attention import masks
from sinklora.defaults import GROUP_RATIO, SF_SINK_TOKENS, SHIFTED_HEAD_FRACTION


@dataclass(frozen=True)
class PatternSpec:
    """A :class:`Pattern` resolved for one sequence length and head layout (see :meth:`Pattern.resolve`)."""

    name: str
    seq_len: int
    num_heads: int
    group_size: int  # G; equals seq_len when the pattern is plain causal at this length
    sink_tokens: int  # S
    first_shifted_head: int  # local heads h >= this are shifted (num_heads when none are)

    @property
    def shift(self) -> int:
        return self.group_size // 2

    @property
    def is_full(self) -> bool:
        return self.name == "full"

    @property
    def rolled(self) -> bool:
        return self.name == "s2_roll"

    @property
    def has_groups(self) -> bool:
        """Whether the pattern declares a group structure (groups, shifted groups, sinks) that the
        ``grouped`` backend can run; ``flex`` and ``reference`` run any predicate."""
        return KINDS[self.name].grouped

    def predicate(self) -> masks.Predicate:
        """``allowed(b, h, q, kv, n)``: the definition of this pattern (docs/method.md §2)."""
        return _predicate(self)

    def for_document(self, n: int) -> PatternSpec:
        """The same parameters on a packed document of ``n`` tokens (one causal group if ``n <= G``)."""
        if self.is_full or n <= self.group_size:
            return PatternSpec("full", n, self.num_heads, n, 0, self.num_heads)
        return dataclasses.replace(self, seq_len=n)


@dataclass(frozen=True)
class Kind:
    """One row of the pattern table: how to build the predicate of a resolved spec."""

    build: Callable[[PatternSpec], masks.Predicate]
    grouped: bool  # has a group structure (the grouped backend can run it)
    default_sinks: int = 0
    takes_sinks: bool = False


def _sparse(spec: PatternSpec, grouped: masks.Predicate) -> masks.Predicate:
    with_sinks = masks.or_masks(grouped, masks.and_masks(masks.causal, masks.sinks(spec.sink_tokens)))
    return with_sinks if spec.sink_tokens else grouped


def _s2(spec: PatternSpec) -> masks.Predicate:
    G = spec.group_size
    heads = masks.by_head(spec.first_shifted_head, masks.same_group(G), masks.same_shifted_group(G))
    return _sparse(spec, masks.and_masks(masks.causal, heads))


def _s2_roll(spec: PatternSpec) -> masks.Predicate:
    G = spec.group_size
    unshifted = masks.and_masks(masks.causal, masks.same_group(G))
    return _sparse(spec, masks.by_head(spec.first_shifted_head, unshifted, masks.same_rolled_group(G)))


KINDS: dict[str, Kind] = {
    "full": Kind(lambda spec: masks.causal, grouped=True),
    "s2": Kind(_s2, grouped=True),
    "s2_roll": Kind(_s2_roll, grouped=True, takes_sinks=True),
    "sf": Kind(_s2, grouped=True, default_sinks=SF_SINK_TOKENS, takes_sinks=True),
}
PATTERNS = tuple(KINDS)


def _predicate(spec: PatternSpec) -> masks.Predicate:
    if spec.is_full:
        return masks.causal
    return masks.short_is_causal(spec.group_size, KINDS[spec.name].build(spec))


def _check_number(name: str, value, ok: bool, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
        raise ValueError(f"{name}={value!r} is invalid: {name} must be {allowed}")


@dataclass(frozen=True)
class Pattern:
    """A training attention pattern and its parameters (docs/method.md §2); hashable, validated here.

    ``group_size`` (tokens) wins over ``group_ratio`` (default 1/4 of the sequence, LongLoRA's
    ``int(N * ratio)``); giving both is an error. ``sink_tokens`` defaults to 4 for ``sf`` and 0 for the
    others. ``shifted_head_fraction`` = 0.5 shifts heads ``h >= H // 2`` (5 of 9 heads for H = 9).
    ``heads=(offset, total)``: the attention it runs on holds heads ``offset ..`` of a model with ``total``
    heads (sequence parallelism: each rank holds ``H / N`` of them); which heads are shifted is decided on
    these global indices. None: the attention holds every head.
    """

    name: str = "sf"
    group_ratio: float | None = None
    group_size: int | None = None
    sink_tokens: int | None = None
    shifted_head_fraction: float = SHIFTED_HEAD_FRACTION
    heads: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.name not in KINDS:
            raise ValueError(f"pattern={self.name!r} is unknown: choose one of {', '.join(PATTERNS)}")
        kind = KINDS[self.name]
        if self.group_size is not None and self.group_ratio is not None:
            raise ValueError(f"group_size={self.group_size} and group_ratio={self.group_ratio} are both set: "
                             "give only one of them")
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"group_size={self.group_size!r} is invalid: group_size must be an integer >= 1 "
                                 "(tokens per group)")
        else:
            ratio = GROUP_RATIO if self.group_ratio is None else self.group_ratio
            _check_number("group_ratio", ratio, isinstance(ratio, (int, float)) and 0 < ratio <= 1,
                          "in (0, 1], e.g. 0.25")
            object.__setattr__(self, "group_ratio", float(ratio))
        sinks = kind.default_sinks if self.sink_tokens is None else self.sink_tokens
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"sink_tokens={sinks!r} is invalid: sink_tokens must be an integer >= 0")
        if sinks and not kind.takes_sinks:
            fix = ("full attention already sees every earlier token" if self.name == "full"
                   else "s2 has no sinks; use pattern='sf' for s2 + sinks")
            raise ValueError(f"sink_tokens={sinks} with pattern={self.name!r}: {fix}")
        if self.group_size is not None and sinks >= self.group_size:
            raise ValueError(f"sink_tokens={sinks} >= group_size={self.group_size}: sinks must be fewer than the "
                             "tokens of a group (the paper: 4 sinks, groups of N/4)")
        object.__setattr__(self, "sink_tokens", sinks)
        f = self.shifted_head_fraction
        _check_number("shifted_head_fraction", f, isinstance(f, (int, float)) and 0 <= f <= 1,
                      "in [0, 1] (0.5 = LongLoRA)")
        if self.heads is not None:
            heads = tuple(self.heads)
            if (len(heads) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in heads)
                    or not 0 <= heads[0] < heads[1]):
                raise ValueError(f"heads={self.heads!r} is invalid: heads must be (offset, total) with 0 <= offset < total")
            object.__setattr__(self, "heads", heads)

    @property
    def key(self) -> str:
        """A short stable name: the pattern name plus the parameters that differ from the defaults,
        e.g. ``sf``, ``sf-g512``, ``sf-r0.125-s8-f0``."""
        parts = [self.name]
        if self.name != "full":
            if self.group_size is not None:
                parts.append(f"g{self.group_size}")
            elif self.group_ratio != GROUP_RATIO:
                parts.append(f"r{self.group_ratio:g}")
            if self.sink_tokens != KINDS[self.name].default_sinks:
                parts.append(f"s{self.sink_tokens}")
            if self.shifted_head_fraction != SHIFTED_HEAD_FRACTION:
                parts.append(f"f{self.shifted_head_fraction:g}")
        return "-".join(parts)

    def resolve(self, seq_len: int, num_heads: int, *, head_offset: int | None = None, total_heads: int | None = None
                ) -> PatternSpec:
        """This pattern on ``seq_len`` tokens and ``num_heads`` query heads (cached).

        ``head_offset`` / ``total_heads``: the heads are ``head_offset .. head_offset + num_heads - 1`` of a
        model with ``total_heads`` heads (sequence parallelism holds a slice of the heads); which heads are
        shifted is decided on the global indices. Default: :attr:`heads`, else all heads.
        """
        offset, total = self.heads or (0, None)
        offset = offset if head_offset is None else head_offset
        return _resolve(self, seq_len, num_heads, offset, total_heads or total or num_heads)

    def problems_at(self, seq_len: int) -> list[str]:
        """What is wrong with training at ``seq_len`` tokens (for config validation): a group as long as the
        sequence (the pattern would be full attention), or sinks that do not fit a group."""
        if self.name == "full":
            return []
        try:
            spec = self.resolve(seq_len, 1)
        except ValueError as e:
            return [str(e)]
        if spec.is_full:
            return [f"the group size resolves to {self.group_size or int(seq_len * self.group_ratio)} >= "
                    f"{seq_len} tokens: {self.name!r} would be full attention; lower group_size/group_ratio or use "
                    "pattern=full"]
        return []


@functools.lru_cache(maxsize=256)
def _resolve(pattern: Pattern, seq_len: int, num_heads: int, head_offset: int, total_heads: int) -> PatternSpec:
    for name, value in (("seq_len", seq_len), ("num_heads", num_heads), ("total_heads", total_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: {name} must be a positive integer")
    if not 0 <= head_offset <= total_heads - num_heads:
        raise ValueError(f"head_offset={head_offset} with {num_heads} local heads does not fit total_heads={total_heads}")
    G = pattern.group_size or max(1, int(seq_len * pattern.group_ratio))
    if pattern.name == "full" or G >= seq_len:
        return PatternSpec("full", seq_len, num_heads, seq_len, 0, num_heads)
    S = pattern.sink_tokens
    if S >= G:
        raise ValueError(f"sink_tokens={S} >= group size {G} at {seq_len} tokens (group_ratio={pattern.group_ratio}): "
                         "sinks must be fewer than the tokens of a group; train on longer sequences, lower "
                         "sink_tokens or set group_size")
    first_global = total_heads - math.ceil(round(pattern.shifted_head_fraction * total_heads, 9))
    first_local = min(max(first_global - head_offset, 0), num_heads)
    return PatternSpec(pattern.name, seq_len, num_heads, G, S, first_local)


def as_pattern(pattern: Pattern | str, **params) -> Pattern:
    """A :class:`Pattern`, or a name plus keyword parameters (the keyword form of the public functions)."""
    if isinstance(pattern, Pattern):
        if params:
            raise ValueError(f"parameters {sorted(params)} given with a Pattern object: set them on the Pattern")
        return pattern
    return Pattern(pattern, **params)
