"""Models: loading (hub id, local folder, the default SmolLM2 alias), RoPE extension, LoRA+, merge/export.

Names are re-exported lazily so ``import sinklora.models`` stays cheap.
"""

from __future__ import annotations

from sinklora._lazy import lazy_exports

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
__getattr__ = lazy_exports(__name__, _EXPORTS)
