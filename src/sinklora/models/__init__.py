"""Models: loading (hub id, local folder, the default SmolLM2 alias), RoPE extension, LoRA+, merge/export.

Names are re-exported lazily so ``import sinklora.models`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "resolve_model": "loading",
    "load_tokenizer": "loading",
    "load_model": "loading",
    "load_config": "loading",
    "check_supported": "loading",
    "extend_context": "rope",
    "apply_lora_plus": "lora",
    "save_adapter": "lora",
    "export_merged": "export",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
