"""Evaluation: perplexity (sliding window, LongLoRA protocol), passkey retrieval, result files, plots.

Submodules are imported on use; the main entry points are re-exported lazily:
``evaluate_perplexity``, ``document_nll``, ``longlora_window_nll`` (:mod:`.perplexity`),
``run_passkey``, ``build_passkey_prompt``, ``make_prompt`` (:mod:`.passkey`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate_perplexity": "perplexity",
    "document_nll": "perplexity",
    "longlora_window_nll": "perplexity",
    "run_passkey": "passkey",
    "build_passkey_prompt": "passkey",
    "make_prompt": "passkey",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
