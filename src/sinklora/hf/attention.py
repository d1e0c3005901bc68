"""Sparse training attention for Hugging Face models, through public extension points only.

Each distinct pattern configuration is registered under its own neutral name in
``transformers.AttentionInterface`` (the attention function) and ``AttentionMaskInterface`` (the mask
function, without which transformers would pass ``attention_mask=None`` and drop padding), and a
model opts in with ``model.set_attn_implementation(name)``. Two models in one process can therefore
use different patterns, and switching a model back to full attention is one call::

    with use_attention(model, "sf", group_ratio=0.25):   # train
        ...
    # leaving the block restores the previous implementation (e.g. "sdpa") for evaluation

``full`` maps to PyTorch SDPA (transformers' own ``"sdpa"``). Padding (2-D attention masks) and packed
sequences (``position_ids`` restarting at 0, as ``DataCollatorWithFlattening`` produces) keep their
meaning: patterns restart in every packed document.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from sinklora.attention import resolve_pattern, sparse_attention

logger = logging.getLogger(__name__)

_PREFIX = "sinklora_"


def implementation_name(pattern: str, **params) -> str:
    """The registry name for a pattern configuration, e.g. ``sinklora_sf-group_ratio0.25``."""
    parts = [f"{k}{params[k]}" for k in sorted(params) if params[k] is not None]
    return _PREFIX + "-".join([pattern, *parts])


def _validate(pattern: str, params: dict) -> None:
    # resolve once on a dummy shape so bad parameters fail here, not inside a forward pass
    resolve_pattern(pattern, 64, 2, **params)


def _documents_from_positions(position_ids: torch.Tensor | None, n: int) -> tuple[int, ...] | None:
    """Packed documents of a single row: lengths between the places where positions restart at 0."""
    if position_ids is None or position_ids.shape[0] != 1 or position_ids.shape[-1] != n:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if len(starts) <= 1 or starts[0] != 0:
        return None
    return tuple(b - a for a, b in zip(starts, starts[1:] + [n]))


def _make_attention_fn(pattern: str, params: dict):
    def sinklora_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query (B, Hq, Sq, D); key/value (B, Hkv, Skv, D), keys already rotated; GQA not expanded
        if query.shape[2] != key.shape[2]:
            raise ValueError(
                f"attention pattern {pattern!r} is a training pattern and needs the whole sequence "
                f"(got {query.shape[2]} queries over {key.shape[2]} cached keys): switch the model to full "
                "attention for generation with sinklora.hf.attention.use_attention(model, 'full')"
            )
        if dropout and module.training:
            raise ValueError(f"attention dropout={dropout} is not supported by sparse patterns; set attention_dropout=0")
        docs = None
        if attention_mask is None:
            cu = kwargs.get("cu_seq_lens_q")
            if cu is not None and query.shape[0] == 1:
                docs = tuple(int(x) for x in torch.diff(cu).tolist())
            else:
                docs = _documents_from_positions(kwargs.get("position_ids"), query.shape[2])
        out = sparse_attention(
            query, key, value, pattern, scale=scaling, key_padding_mask=attention_mask, doc_lengths=docs, **params
        )
        return out.transpose(1, 2).contiguous(), None  # (B, Sq, Hq, D)

    sinklora_attention.__name__ = f"sinklora_attention_{pattern}"
    return sinklora_attention


def sinklora_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **kwargs):
    """The mask our attention functions take: the 2-D key padding mask ``(B, kv_length)``, or None."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    return None if bool(mask.all()) else mask


def register(pattern: str, **params) -> str:
    """Register ``pattern`` with ``params`` in transformers' registries; returns the implementation name."""
    from transformers import AttentionInterface, AttentionMaskInterface

    _validate(pattern, params)
    if pattern == "full":
        return "sdpa"
    name = implementation_name(pattern, **params)
    AttentionInterface.register(name, _make_attention_fn(pattern, params))
    AttentionMaskInterface.register(name, sinklora_mask)
    return name


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_supported(model) -> None:
    """Refuse models the attention engine cannot serve, with the reason."""
    from sinklora.models.loading import check_supported as check_config

    base = _base_model(model)
    if not getattr(base, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(base).__name__} does not dispatch through transformers' AttentionInterface, "
            "so a sparse training pattern cannot be plugged in: use a Llama-family model"
        )
    check_config(base.config)  # a Llama-family RoPE decoder with num_attention_heads / num_key_value_heads
    hq, hkv = base.config.num_attention_heads, base.config.num_key_value_heads
    if hq % hkv:
        raise ValueError(f"num_attention_heads={hq} is not a multiple of num_key_value_heads={hkv}")


class use_attention(contextlib.ContextDecorator):
    """Switch ``model`` (a transformers model or a peft model) to ``pattern``.

    Usable as a plain call (the switch stays) or as a context manager (the previous implementation is
    restored on exit, even after an exception).
    """

    def __init__(self, model, pattern: str, **params):
        base = _base_model(model)
        if pattern != "full":
            check_supported(model)
        self.model = base
        self.previous = base.config._attn_implementation
        self.name = register(pattern, **params)
        base.set_attn_implementation(self.name)
        logger.debug("attention implementation %s -> %s", self.previous, self.name)

    def __enter__(self):
        return self.model

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.previous)
        return False
