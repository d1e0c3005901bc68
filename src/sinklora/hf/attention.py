"""sinklora's one Hugging Face attention function, and the context managers that give it state.

transformers dispatches attention through a registry (``AttentionInterface``, with the mask builder in
``AttentionMaskInterface``); sinklora registers one function there, under :data:`ATTENTION`. It reads
the state the model holds, on each of its attention modules:

- a training :class:`~sinklora.attention.Pattern`, attached by :func:`use_attention`: sparse attention
  (``sparse_attention``), with padding and packed documents kept;
- a KV cache, attached by :func:`attach_cache`: the cache layer of the module runs the step (SDPA,
  then its policy's scoring and eviction; :mod:`sinklora.hf.cache`);
- nothing: causal SDPA, as transformers' ``"sdpa"``.

The registered mask function runs once per forward and hands every layer the same :class:`BatchMask`
(the key padding mask and a per-batch cache), so what depends only on the batch (is there padding,
packed document lengths, block masks) is worked out once per batch, never per layer.

Both context managers switch the model to :data:`ATTENTION` on entry and restore its previous
implementation and state on exit, exceptions included::

    with use_attention(model, "sf", group_ratio=0.25):      # train with SF-Attn
        loss = model(input_ids, labels=input_ids).loss
    with attach_cache(model, make_cache(model, "h2o", budget=0.2)) as cache_kw:
        model.generate(**inputs, **cache_kw)                 # decode under a compressed KV cache

A KV cache belongs to one request: attaching a second cache to a model that is generating with one (two
threads sharing a model instance) is refused; two model instances generate independently. This is the
only module that touches transformers' attention and mask registries.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from sinklora.attention import Pattern, as_pattern, sparse_attention
from sinklora.attention.batch import per_batch
from sinklora.hf.sdpa import causal_attention

logger = logging.getLogger(__name__)

ATTENTION = "sinklora"
_STATE = "_sinklora_state"  # attribute of every attention module while something is attached
_ATTACH_LOCK = threading.Lock()  # makes "is a cache attached? then attach mine" one step across threads


@dataclass(frozen=True)
class AttentionState:
    """What an attention module computes while attached: a training pattern or a KV cache."""

    pattern: Pattern | None = None
    cache: Any = None  # sinklora.hf.cache.PolicyCache


# ---- the registered functions --------------------------------------------------------------------


@dataclass(eq=False)
class BatchMask:
    """What :func:`_mask` hands every attention layer of one forward: the key padding mask
    ``key_padding`` ``(B, kv_length)`` bool (None without padding) and ``cache``, where what is derived
    from the batch is kept once (packed document lengths, Flex block masks, device tables, the dense
    mask of padded full attention). Every layer, and the recomputation under activation checkpointing,
    receives this same object, so none of it is rebuilt, nor read back from the device, per layer."""

    key_padding: torch.Tensor | None
    cache: dict = field(default_factory=dict)


def _mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
          **kwargs) -> BatchMask:
    """The mask :func:`_attention` takes (a :class:`BatchMask`). Called once per forward, not per layer,
    so its one device-to-host check (is there padding at all?) is paid once per batch."""
    if attention_mask is None:
        return BatchMask(None)
    mask = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    return BatchMask(None if bool(mask.all()) else mask)


def documents_from_positions(position_ids: torch.Tensor | None, n: int) -> tuple[int, ...] | None:
    """Packed documents of a single row: lengths between the places where positions restart at 0.
    Reads the row back to the host once (one device-to-host copy)."""
    if position_ids is None or position_ids.shape[0] != 1 or position_ids.shape[-1] != n:
        return None
    starts = [i for i, p in enumerate(position_ids[0].tolist()) if p == 0]
    if len(starts) <= 1 or starts[0] != 0:
        return None
    return tuple(b - a for a, b in zip(starts, starts[1:] + [n]))


def _packed_documents(query: torch.Tensor, key: torch.Tensor, key_padding: torch.Tensor | None,
                      kwargs: dict, batch_cache: dict | None = None) -> tuple[int, ...] | None:
    """Packed documents of a one-row batch without padding and without a cache (``cu_seq_lens_q`` from
    transformers' flattening collator, or ``position_ids`` restarting at 0); found once per batch when
    there is a batch cache (the positions are the same for every layer)."""
    if key_padding is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None

    def find() -> tuple[int, ...] | None:
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None:
            bounds = cu.tolist()
            return tuple(b - a for a, b in zip(bounds, bounds[1:]))
        return documents_from_positions(kwargs.get("position_ids"), query.shape[2])

    return per_batch(batch_cache, ("documents", query.shape[2]), find)


def _pattern_attention(module, pattern: Pattern, query, key, value, key_padding, scaling, dropout, kwargs,
                       batch_cache: dict | None = None):
    docs = _packed_documents(query, key, key_padding, kwargs, batch_cache)
    if pattern.name == "full":
        return causal_attention(module, query, key, value, key_padding, scaling, dropout, docs, batch_cache)
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"attention pattern {pattern.key!r} is a training pattern and needs the whole sequence (got "
            f"{query.shape[2]} queries over {key.shape[2]} cached keys): generate outside `use_attention`, "
            "or inside `use_attention(model, 'full')`")
    if dropout:
        raise ValueError(f"attention dropout={dropout} is not supported by sparse patterns; set attention_dropout=0")
    out = sparse_attention(query, key, value, pattern, scale=scaling, key_padding_mask=key_padding,
                           doc_lengths=docs, batch_cache=batch_cache)
    return out.transpose(1, 2).contiguous()  # (B, N, Hq, D)


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: BatchMask | torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query (B, Hq, Lq, D); key/value (B, Hkv, Lk, D), RoPE applied, GQA not expanded; attention_mask
    from :func:`_mask`. Returns ((B, Lq, Hq, D), None) as transformers expects."""
    state: AttentionState | None = getattr(module, _STATE, None)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    batch_cache = None
    if isinstance(attention_mask, BatchMask):
        attention_mask, batch_cache = attention_mask.key_padding, attention_mask.cache
    if state is not None and state.cache is not None:
        out = state.cache.layers[module.layer_idx].attend(module, query, key, value, attention_mask, scaling, dropout)
    elif state is not None and state.pattern is not None:
        out = _pattern_attention(module, state.pattern, query, key, value, attention_mask, scaling, dropout, kwargs,
                                 batch_cache)
    else:
        out = causal_attention(module, query, key, value, attention_mask, scaling, dropout,
                               _packed_documents(query, key, attention_mask, kwargs, batch_cache), batch_cache)
    return out, None


@functools.cache
def register() -> str:
    """Register :func:`_attention` and its mask function under :data:`ATTENTION` (once per process)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, _mask)
    return ATTENTION


# ---- attaching state -----------------------------------------------------------------------------


def base_model(model: Any) -> Any:
    """The transformers model inside a peft ``PeftModel`` (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_supported(model: Any) -> None:
    """Refuse models this attention function cannot serve, with the reason."""
    from sinklora.models.loading import check_supported as check_config

    base = base_model(model)
    if not getattr(base, "_supports_attention_backend", False):
        raise ValueError(f"{type(base).__name__} does not dispatch through transformers' AttentionInterface, so "
                         "sinklora's attention cannot be plugged in: use a Llama-family model")
    check_config(base.config)  # a Llama-family RoPE decoder with num_attention_heads / num_key_value_heads
    hq, hkv = base.config.num_attention_heads, base.config.num_key_value_heads
    if hq % hkv:
        raise ValueError(f"num_attention_heads={hq} is not a multiple of num_key_value_heads={hkv}")


def attention_modules(model: Any) -> list[torch.nn.Module]:
    """The model's attention modules (those transformers hands to the attention function), in layer order."""
    base = base_model(model)
    found = [m for m in base.modules() if isinstance(getattr(m, "layer_idx", None), int)
             and hasattr(m, "num_key_value_groups")]
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if len(found) != config.num_hidden_layers:
        raise ValueError(f"{type(base).__name__}: found {len(found)} attention modules for {config.num_hidden_layers} "
                         "layers; sinklora supports Llama-family decoders")
    return sorted(found, key=lambda m: m.layer_idx)


@contextlib.contextmanager
def _attached(model: Any, state: AttentionState) -> Iterator[Any]:
    base = base_model(model)
    register()
    modules = attention_modules(base)
    with _ATTACH_LOCK:
        previous = getattr(modules[0], _STATE, None)
        if previous is not None and previous.cache is not None:
            raise RuntimeError(
                f"{type(base).__name__} is generating with another KV cache (a cache belongs to one request): "
                "serve concurrent requests with one model instance each, or one after another")
        for m in modules:
            setattr(m, _STATE, state)
        implementation = base.config._attn_implementation
    try:
        if implementation != ATTENTION:
            base.set_attn_implementation(ATTENTION)
        yield base
    finally:
        with _ATTACH_LOCK:
            for m in modules:
                setattr(m, _STATE, previous)
            if implementation != ATTENTION:
                base.set_attn_implementation(implementation)


@contextlib.contextmanager
def use_attention(model: Any, pattern: Pattern | str, **params: Any) -> Iterator[Any]:
    """Compute ``model``'s attention with ``pattern`` inside the block (a :class:`Pattern`, or a name and
    its parameters); the previous attention comes back on exit. Yields the transformers model."""
    pattern = as_pattern(pattern, **params)
    if pattern.name != "full":
        check_supported(model)
    with _attached(model, AttentionState(pattern=pattern)) as base:
        yield base


@contextlib.contextmanager
def attach_cache(model: Any, cache: Any) -> Iterator[dict[str, Any]]:
    """Let ``cache`` (a :class:`sinklora.hf.cache.PolicyCache`) run ``model``'s attention steps inside the
    block; yields the keyword arguments that hand the cache to ``generate`` / ``forward``. Any other
    cache (transformers' own) is handed over without attaching; ``None`` yields ``{}`` (the model's own)."""
    from sinklora.hf.cache import PolicyCache, cache_kwargs

    if not isinstance(cache, PolicyCache):
        yield {} if cache is None else cache_kwargs(cache)
        return
    with _attached(model, AttentionState(cache=cache)):
        yield cache_kwargs(cache)
