"""LoRA+ (LongLoRA's name): LoRA on the attention projections plus fully trained embeddings and norms.

The extra weights are peft ``modules_to_save``, so ``save_pretrained`` writes them with the adapter
and ``merge_and_unload`` puts them into the merged model (setting ``requires_grad`` by hand, LongLoRA's
way, trains them but never saves them). Models with tied input/output embeddings (SmolLM2, Llama-3.2)
use peft's ``ensure_weight_tying``: the output layer shares the trained embedding copy, during
training, in the saved adapter and after reloading.

Activation checkpointing needs no ``enable_input_require_grads()`` from us: with LoRA+ the embedding is
trainable, so the first checkpointed block's input already requires grad; and for plain LoRA
(``trainable_extra=[]``) transformers' ``gradient_checkpointing_enable`` (5.17 and 5.24) registers that
hook itself and defaults to non-reentrant checkpointing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sinklora.config import option
from sinklora.models import rope

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass
class LoraSettings:
    r: int = option(8, "LoRA rank")
    alpha: float = option(16.0, "LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = option(0.0, "dropout on the LoRA input")
    target_modules: list[str] = option(
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        help="module names (last path component) that get LoRA adapters",
    )
    trainable_extra: list[str] = option(
        factory=lambda: ["embed_tokens", "norm"],
        help="module name suffixes trained fully and saved with the adapter (LoRA+: embeddings and every norm); "
        "[] for plain LoRA",
    )

    def validate(self) -> list[str]:
        errors = []
        if self.r < 1:
            errors.append(f"r={self.r}: the LoRA rank must be >= 1 (the paper uses 8)")
        if self.alpha <= 0:
            errors.append(f"alpha={self.alpha}: must be > 0 (the paper uses 16)")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout={self.dropout}: must be in [0, 1) (the paper uses 0)")
        if not self.target_modules:
            errors.append("target_modules=[]: name at least one module, e.g. [q_proj, k_proj, v_proj, o_proj]")
        for name in ("target_modules", "trainable_extra"):
            bad = [m for m in getattr(self, name) if not m or m != m.strip()]
            if bad:
                errors.append(f"{name}={getattr(self, name)!r}: empty or padded module names {bad!r}")
        return errors


def _matches(module_names: list[str], selector: str, *, suffix: bool) -> list[str]:
    """Modules peft will pick for ``selector``: target_modules match the last path component(s),
    modules_to_save match any name suffix (so ``norm`` matches ``input_layernorm``)."""
    if suffix:
        return [n for n in module_names if n.endswith(selector)]
    return [n for n in module_names if n == selector or n.endswith("." + selector)]


def _check_selectors(model: torch.nn.Module, settings: LoraSettings) -> dict[str, list[str]]:
    """Every selector must match at least one module (a selector that matches nothing trains nothing)."""
    names = [n for n, _ in model.named_modules() if n]
    found, errors = {}, []
    for field_name, suffix in (("target_modules", False), ("trainable_extra", True)):
        for selector in getattr(settings, field_name):
            hits = _matches(names, selector, suffix=suffix)
            if not hits:
                errors.append(f"{field_name} entry {selector!r} matches no module of {type(model).__name__}")
            found[selector] = hits
    if errors:
        examples = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names})[:30])
        raise ValueError("; ".join(errors) + f" (module names include: {examples})")
    return found


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft 0.21 reads transformers' deprecated ``is_gradient_checkpointing``: hide that FutureWarning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def ties_embeddings(model: torch.nn.Module) -> bool:
    """True when the output layer shares the input embedding's weight."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def apply_lora_plus(model: Any, settings: LoraSettings | None = None) -> Any:
    """Wrap ``model`` in a ``peft.PeftModel`` with LoRA on ``target_modules`` and full training of
    ``trainable_extra``. Only LoRA A/B and the extra modules' copies are trainable afterwards."""
    from peft import LoraConfig, get_peft_model

    settings = settings or LoraSettings()
    errors = settings.validate()
    if errors:
        raise ValueError("invalid LoRA settings: " + "; ".join(errors))
    found = _check_selectors(model, settings)
    tied = ties_embeddings(model)
    embed_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    embed_trained = any(embed_name in found[sel] for sel in settings.trainable_extra)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        modules_to_save=list(settings.trainable_extra) or None,
        # tied models (SmolLM2): the output layer must use the trained embedding copy, not the frozen one
        ensure_weight_tying=tied and embed_trained,
    )
    with quiet_peft():
        peft_model = get_peft_model(model, config)
    if tied and embed_trained:
        assert ties_embeddings(peft_model.get_base_model()), "peft left lm_head untied from the trained embedding"
    counts = trainable_counts(peft_model)
    logger.info(
        "LoRA+ r=%d alpha=%g on %s; fully trained: %s; trainable parameters: %s",
        settings.r, settings.alpha, ",".join(settings.target_modules),
        ", ".join(f"{sel} ({len(found[sel])} modules)" for sel in settings.trainable_extra) or "none",
        ", ".join(f"{k} {v:,}" for k, v in counts.items()),
    )
    return peft_model


def trainable_counts(peft_model: Any) -> dict[str, int]:
    """Trainable parameter counts split into LoRA factors and fully trained extra modules."""
    counts = {"lora": 0, "extra": 0, "total": 0}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            counts["lora" if ".lora_" in name else "extra"] += p.numel()
            counts["total"] += p.numel()
    return counts


def save_adapter(peft_model: Any, folder: str | os.PathLike) -> Path:
    """``save_pretrained`` plus the base config's RoPE settings (read back by ``load_model(adapter=...)``),
    so an adapter trained at an extended context is evaluated with that context."""
    folder = Path(folder)
    peft_model.save_pretrained(folder)
    rope.save_context_record(peft_model.get_base_model().config, folder)
    return folder
