"""Evaluation: perplexity (sliding window, LongLoRA protocol), passkey retrieval, result files, plots.

Submodules are imported on use; the main entry points are re-exported lazily:
``evaluate_perplexity``, ``document_nll``, ``longlora_window_nll`` (:mod:`.perplexity`),
``run_passkey``, ``build_passkey_prompt``, ``make_prompt`` (:mod:`.passkey`).
"""

from __future__ import annotations

from sinklora._lazy import lazy_exports

_EXPORTS = {
    "evaluate_perplexity": "perplexity",
    "document_nll": "perplexity",
    "longlora_window_nll": "perplexity",
    "run_passkey": "passkey",
    "build_passkey_prompt": "passkey",
    "make_prompt": "passkey",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
