"""Training attention patterns as executable predicates (method.md section 2).

Every pattern is one predicate ``allowed(h, q, kv)`` over query head ``h``, query position ``q`` and
key position ``kv`` (FlexAttention ``mask_mod`` semantics). :func:`build_mask` evaluates it densely;
that dense mask is the definition every fast path is tested against.

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

The shifted heads' first and last groups are short groups of their own (no wrap-around; this is the
"segmentation and reassembly" of SinkLoRA and LongLoRA's flash-attention path). ``s2_roll`` instead
rolls the shifted heads by -s before grouping, so its last group holds tokens 10, 11, 0, 1 in that
order and tokens 0 and 1 see tokens 10 and 11: LongLoRA's leaky eager path, kept only to reproduce it.

Rules for awkward shapes: any N works (the last group is shorter); G >= N makes every sparse pattern
equal ``full`` (one group covers the sequence, the shift is dropped); sinks are the first
``sink_tokens`` positions and attend causally themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PATTERNS = ("full", "s2", "s2_roll", "sf")
DEFAULT_SINK_TOKENS = {"full": 0, "s2": 0, "s2_roll": 0, "sf": 4}


@dataclass(frozen=True)
class PatternSpec:
    """A pattern with every parameter resolved for one sequence length and head count."""

    pattern: str
    seq_len: int
    num_heads: int
    group_size: int  # G; equals seq_len for full attention
    sink_tokens: int  # S
    first_shifted_head: int  # heads h >= this are shifted (num_heads when none are)

    @property
    def shift(self) -> int:
        return self.group_size // 2

    @property
    def is_full(self) -> bool:
        return self.pattern == "full"

    @property
    def rolled(self) -> bool:
        return self.pattern == "s2_roll"


def _check_int(name: str, value, minimum: int, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: {name} must be {allowed}")
    return value


def resolve_pattern(
    pattern: str,
    seq_len: int,
    num_heads: int,
    *,
    group_size: int | None = None,
    group_ratio: float | None = None,
    sink_tokens: int | None = None,
    shifted_head_fraction: float = 0.5,
) -> PatternSpec:
    """Validate the parameters of ``pattern`` and resolve them for ``seq_len`` x ``num_heads``.

    ``group_size`` wins over ``group_ratio`` (default 1/4, LongLoRA's ``int(N * ratio)``).
    ``shifted_head_fraction`` = 0.5 shifts heads ``h >= H // 2`` as LongLoRA does (5 of 9 heads for H = 9).
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern={pattern!r} is unknown: choose one of {', '.join(PATTERNS)}")
    _check_int("seq_len", seq_len, 1, "a positive integer")
    _check_int("num_heads", num_heads, 1, "a positive integer")
    if group_size is not None and group_ratio is not None:
        raise ValueError(
            f"group_size={group_size} and group_ratio={group_ratio} are both set: give only one of them"
        )
    if group_size is not None:
        _check_int("group_size", group_size, 1, "an integer >= 1 (tokens per group)")
        G = group_size
    else:
        ratio = 0.25 if group_ratio is None else group_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"group_ratio={ratio!r} is invalid: group_ratio must be in (0, 1], e.g. 0.25")
        G = max(1, int(seq_len * ratio))
    S = DEFAULT_SINK_TOKENS[pattern] if sink_tokens is None else sink_tokens
    _check_int("sink_tokens", S, 0, "an integer >= 0")
    if pattern == "s2" and S > 0:
        raise ValueError(f"sink_tokens={S} with pattern='s2': s2 has no sinks; use pattern='sf' for s2 + sinks")
    if pattern == "full" and S > 0:
        raise ValueError(f"sink_tokens={S} with pattern='full': full attention already sees every earlier token")
    f = shifted_head_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
        raise ValueError(f"shifted_head_fraction={f!r} is invalid: it must be in [0, 1] (0.5 = LongLoRA)")
    first_shifted = num_heads - math.ceil(round(f * num_heads, 9))
    if pattern == "full" or G >= seq_len:
        return PatternSpec("full", seq_len, num_heads, seq_len, 0, num_heads)
    return PatternSpec(pattern, seq_len, num_heads, G, S, first_shifted)


def resolve_pattern_like(spec: PatternSpec, n: int) -> PatternSpec:
    """The same parameters (group size, sinks, shifted heads) on a packed document of length n."""
    if spec.is_full or spec.group_size >= n:
        return PatternSpec("full", n, spec.num_heads, n, 0, spec.num_heads)
    return PatternSpec(spec.pattern, n, spec.num_heads, spec.group_size, spec.sink_tokens, spec.first_shifted_head)


def allowed(spec: PatternSpec, h, q, kv, n=None):
    """The pattern's predicate on (broadcastable) integer tensors; ``n`` is the sequence length
    (a tensor for packed documents, whose positions are document-relative)."""
    causal = kv <= q
    if spec.is_full:
        return causal
    G, s = spec.group_size, spec.shift
    plain = (q // G) == (kv // G)
    if spec.rolled:
        n = spec.seq_len if n is None else n
        iq, ik = (q - s) % n, (kv - s) % n  # positions in the rolled sequence
        shifted = ((iq // G) == (ik // G)) & (ik <= iq)
        grouped = torch.where(h >= spec.first_shifted_head, shifted, plain & causal)
    else:
        shifted = ((q + s) // G) == ((kv + s) // G)
        grouped = torch.where(h >= spec.first_shifted_head, shifted, plain) & causal
    if spec.sink_tokens > 0:
        grouped = grouped | ((kv < spec.sink_tokens) & causal)
    return grouped


def build_mask(pattern: str, seq_len: int, num_heads: int, device=None, **params) -> torch.Tensor:
    """Dense boolean mask ``(num_heads, seq_len, seq_len)``: True where query i may attend key j.

    The executable definition of each pattern (O(H N^2) memory: for tests and small N only).
    """
    spec = resolve_pattern(pattern, seq_len, num_heads, **params)
    return spec_mask(spec, device=device)


def spec_mask(spec: PatternSpec, device=None) -> torch.Tensor:
    pos = torch.arange(spec.seq_len, device=device)
    h = torch.arange(spec.num_heads, device=device)[:, None, None]
    return allowed(spec, h, pos[None, :, None], pos[None, None, :]).expand(
        spec.num_heads, spec.seq_len, spec.seq_len
    ).contiguous()
