"""Small attention predicates and the ways to combine them (docs/method.md §2).

A predicate answers "may query ``q`` of head ``h`` in batch row ``b`` read key ``kv``?" for a
sequence (or packed document) of ``n`` tokens: ``pred(b, h, q, kv, n) -> bool``. The arguments are
integer tensors that broadcast against each other (``n`` may also be a Python int), so one predicate
serves the dense oracle (:func:`dense`), FlexAttention (``mask_mod`` via :func:`at_length` or
:func:`per_document`) and the tests. Only operators are used (``&``, ``|``, ``//``, ``%``,
comparisons), never ``torch.where``: the module imports nothing heavy and every predicate stays
traceable by ``torch.compile``.

Patterns are built by composing these pieces (see :mod:`sinklora.attention.pattern`), e.g. ``sf``::

    and_masks(causal, or_masks(by_head(first_shifted, same_group(G), same_shifted_group(G)), sinks(S)))

wrapped by :func:`short_is_causal` (a sequence no longer than a group is plain causal attention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Predicate = Callable[[Any, Any, Any, Any, Any], Any]  # (b, h, q, kv, n) -> bool tensor
MaskMod = Callable[[Any, Any, Any, Any], Any]  # FlexAttention's (b, h, q, kv) -> bool tensor


def causal(b, h, q, kv, n):
    """Key at or before the query."""
    return kv <= q


def and_masks(*preds: Predicate) -> Predicate:
    def pred(b, h, q, kv, n):
        out = preds[0](b, h, q, kv, n)
        for p in preds[1:]:
            out = out & p(b, h, q, kv, n)
        return out

    return pred


def or_masks(*preds: Predicate) -> Predicate:
    def pred(b, h, q, kv, n):
        out = preds[0](b, h, q, kv, n)
        for p in preds[1:]:
            out = out | p(b, h, q, kv, n)
        return out

    return pred


def same_group(G: int) -> Predicate:
    """Query and key in the same block of ``G`` tokens: ``q // G == kv // G``."""
    return lambda b, h, q, kv, n: (q // G) == (kv // G)


def same_shifted_group(G: int) -> Predicate:
    """The blocks shifted by half a group, cut at the sequence ends (no wrap-around):
    ``(q + G//2) // G == (kv + G//2) // G``, so the first and last half-groups are groups of their own."""
    s = G // 2
    return lambda b, h, q, kv, n: ((q + s) // G) == ((kv + s) // G)


def same_rolled_group(G: int) -> Predicate:
    """LongLoRA's eager path: positions rolled by ``-G//2`` (mod ``n``), then grouped and causal *in the
    rolled order*, so the last group holds the last ``G//2`` and the first ``G//2`` tokens (a leak)."""
    s = G // 2

    def pred(b, h, q, kv, n):
        iq, ik = (q - s) % n, (kv - s) % n
        return ((iq // G) == (ik // G)) & (ik <= iq)

    return pred


def sinks(S: int) -> Predicate:
    """The first ``S`` tokens."""
    return lambda b, h, q, kv, n: kv < S


def by_head(first: int, low: Predicate, high: Predicate) -> Predicate:
    """``low`` for heads ``h < first``, ``high`` for heads ``h >= first``."""
    return lambda b, h, q, kv, n: ((h < first) & low(b, h, q, kv, n)) | ((h >= first) & high(b, h, q, kv, n))


def short_is_causal(G: int, pred: Predicate) -> Predicate:
    """A sequence (or packed document) of ``n <= G`` tokens is one causal group; longer ones use ``pred``.
    The one place this rule is written for tensors (:meth:`Pattern.resolve` applies it to ints)."""
    return lambda b, h, q, kv, n: ((n <= G) & (kv <= q)) | ((n > G) & pred(b, h, q, kv, n))


def at_length(pred: Predicate, n: int) -> MaskMod:
    """The ``mask_mod`` of a whole sequence of ``n`` tokens."""
    return lambda b, h, q, kv: pred(b, h, q, kv, n)


def per_document(pred: Predicate, doc, start, length) -> MaskMod:
    """The ``mask_mod`` of a row of packed documents: ``pred`` applies inside each document, in
    document-relative positions; no attention crosses a document boundary. ``doc``, ``start`` and
    ``length`` are per-token tensors: each token's document, its document's first token and length.

    Every captured tensor is indexed by ``q`` or ``kv`` alone (never by a value read from another one),
    so padding them to a length pads the whole domain of the ``mask_mod``: FlexAttention evaluates it on
    indices up to the next multiple of its block size (see :mod:`sinklora.attention.flex`)."""

    def mask_mod(b, h, q, kv):
        first = start[q]
        return (doc[kv] == doc[q]) & pred(b, h, q - first, kv - first, length[q])

    return mask_mod


def with_key_padding(mask_mod: MaskMod, key_padding_mask) -> MaskMod:
    """Drop padded keys: ``key_padding_mask`` (B, N) bool, True = real token (indexed by ``b`` and ``kv``)."""
    return lambda b, h, q, kv: mask_mod(b, h, q, kv) & key_padding_mask[b, kv]
