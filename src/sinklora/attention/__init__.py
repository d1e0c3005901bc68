"""Training attention: ``full``, ``s2``, ``s2_roll`` and ``sf`` (SinkLoRA) patterns (docs/method.md §2).

- :class:`Pattern` (:mod:`.pattern`) is a pattern with its parameters, validated once; its resolved
  predicate, composed from :mod:`.masks`, is the definition; :func:`build_mask` evaluates it densely.
- :func:`sparse_attention` (:mod:`.backends`) computes the softmax over exactly the keys the pattern
  allows, on a backend chosen by capability: ``grouped`` (O(N x G) memory), ``fused`` (fused SDPA
  per run of groups), ``flex`` (CUDA) or ``reference`` (the dense oracle).
- Hugging Face models: :mod:`sinklora.hf.attention`.

Names are re-exported lazily: importing this package (e.g. for :class:`Pattern` in a config) does not
import torch.
"""

from __future__ import annotations

from sinklora._lazy import lazy_exports

_EXPORTS = {
    "Pattern": "pattern",
    "PatternSpec": "pattern",
    "PATTERNS": "pattern",
    "as_pattern": "pattern",
    "build_mask": "reference",
    "reference_mask": "reference",
    "dense_attention": "reference",
    "sparse_attention": "backends",
    "BACKENDS": "backends",
    "choose_backend": "backends",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
