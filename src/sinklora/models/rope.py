"""Position interpolation: linear RoPE scaling written into a transformers (5.x) config.

Position interpolation (Chen et al. 2023, used by LongLoRA and SinkLoRA) divides every position by
``factor = target_len / original_len`` so a model pretrained on ``original_len`` tokens sees a
``target_len`` window inside the position range it was trained on. In transformers 5.x this is
``config.rope_parameters = {..., "rope_type": "linear", "factor": s}``; the rotary embedding divides
its inverse frequencies by ``s`` (``p * (inv_freq / s) == (p / s) * inv_freq``).

We also record the pretraining length as the top-level config attribute
``original_max_position_embeddings`` so that extending an already extended config is relative to the
original length (idempotent, exact) rather than stacking factors. It sits beside, not inside,
``rope_parameters``: transformers' linear validator warns about unknown keys there, while a top-level
attribute is kept silently (Phi-3's convention) and ignored by linear RoPE. Records written before this
change kept it inside ``rope_parameters``; they are still read.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROUNDINGS = ("ceil", "exact")
ORIGINAL_KEY = "original_max_position_embeddings"
# written beside a saved adapter: the base config's RoPE settings the adapter was trained with
CONTEXT_RECORD = "sinklora_context.json"
_UNSUPPORTED_TYPES = ("llama3", "yarn", "dynamic", "longrope")


def _rope_parameters(config: Any) -> dict:
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise ValueError(
            f"config of type {type(config).__name__} has no flat RoPE parameters (rope_parameters={params!r}); "
            "position interpolation needs a Llama-family decoder using RoPE with a single "
            "rope_parameters dict holding rope_theta (transformers >= 5)"
        )
    return params


def _recorded_original(config: Any) -> int | None:
    recorded = getattr(config, ORIGINAL_KEY, None) or _rope_parameters(config).get(ORIGINAL_KEY)
    return int(recorded) if recorded else None


def original_length(config: Any) -> int:
    """The pretraining context length: the recorded original, else ``max_position_embeddings``."""
    return _recorded_original(config) or int(config.max_position_embeddings)


def rope_summary(config: Any) -> dict:
    """What decides the positions: ``{rope_type, factor, rope_theta, max_position_embeddings, original}``."""
    params = _rope_parameters(config)
    return {"rope_type": params.get("rope_type", params.get("type", "default")), "factor": current_factor(config),
            "rope_theta": float(params["rope_theta"]), "max_position_embeddings": int(config.max_position_embeddings),
            "original": original_length(config)}


def current_factor(config: Any) -> float:
    """The linear interpolation factor in effect (1.0 for an unscaled config)."""
    params = _rope_parameters(config)
    return float(params["factor"]) if params.get("rope_type") == "linear" else 1.0


def interpolation_factor(target_len: int, original_len: int, rounding: str = "ceil") -> float:
    """``target / original``, rounded up to an integer with ``ceil`` (LongLoRA) or kept as is (``exact``)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}: must be one of {', '.join(map(repr, ROUNDINGS))}")
    if target_len < 1 or original_len < 1:
        raise ValueError(
            f"target_len={target_len}, original_len={original_len}: both must be positive token counts"
        )
    ratio = target_len / original_len
    return float(math.ceil(ratio)) if rounding == "ceil" else float(ratio)


def extend_context(
    config: Any, target_len: int, *, original_len: int | None = None, rounding: str = "ceil"
) -> float:
    """Write linear position interpolation for ``target_len`` tokens into ``config`` (in place).

    ``original_len`` is the pretraining context length; by default the length recorded by an earlier
    extension, else ``config.max_position_embeddings``. The factor is always relative to that
    original length, so extending twice to the same target is a no-op and a later extension
    replaces (never multiplies) an earlier one. A factor <= 1 changes nothing.

    Returns the linear factor now in effect (1.0 when the config is and stays unscaled).

    Raises ValueError for configs that already carry a non-linear scaling type (llama3, yarn, dynamic,
    longrope): these encode a frequency-dependent schedule that linear interpolation cannot compose with.
    """
    params = _rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in _UNSUPPORTED_TYPES:
        raise ValueError(
            f"config.rope_parameters['rope_type']={rope_type!r}: re-extending a model that already uses "
            f"{rope_type!r} RoPE scaling is not supported (linear position interpolation cannot be stacked on it "
            "exactly); use a base model with default RoPE (or linear scaling), or extend it with its own "
            f"{rope_type!r} parameters"
        )
    if rope_type not in ("default", "linear"):
        raise ValueError(
            f"config.rope_parameters['rope_type']={rope_type!r}: only 'default' and 'linear' RoPE can be extended "
            "by position interpolation"
        )
    recorded = _recorded_original(config)
    if rope_type == "linear" and recorded is None and original_len is None:
        raise ValueError(
            f"config already has linear RoPE scaling (factor {params.get('factor')}) but no record of the "
            f"pretraining length ({ORIGINAL_KEY}); pass original_len=<pretraining context length> so the new "
            "factor is target_len / original_len"
        )
    if original_len is None:
        original_len = recorded or int(config.max_position_embeddings)
    elif recorded is not None and recorded != original_len:
        logger.warning("original_len=%d overrides the recorded %s=%s", original_len, ORIGINAL_KEY, recorded)

    factor = interpolation_factor(target_len, original_len, rounding)
    if factor <= 1.0:
        logger.info("target_len=%d <= original length %d: RoPE left unchanged", target_len, original_len)
        return current_factor(config)
    params = {k: v for k, v in params.items() if k not in (ORIGINAL_KEY, "type")}
    config.rope_parameters = {**params, "rope_type": "linear", "factor": factor}
    setattr(config, ORIGINAL_KEY, int(original_len))
    config.max_position_embeddings = int(target_len)
    logger.info(
        "position interpolation: %d -> %d tokens, linear RoPE factor %g", original_len, target_len, factor
    )
    return factor


def context_record(config: Any) -> dict:
    """The RoPE settings of ``config`` as a JSON-able dict (saved beside an adapter)."""
    params = {k: v for k, v in _rope_parameters(config).items() if k != ORIGINAL_KEY}
    return {"rope_parameters": params, "max_position_embeddings": int(config.max_position_embeddings),
            ORIGINAL_KEY: original_length(config)}


def apply_context_record(config: Any, record: dict) -> None:
    """Put a :func:`context_record` back into ``config`` (before the model is built from it)."""
    params = dict(record["rope_parameters"])
    original = record.get(ORIGINAL_KEY) or params.pop(ORIGINAL_KEY, None)  # older records kept it inside
    params.pop(ORIGINAL_KEY, None)
    config.rope_parameters = params
    config.max_position_embeddings = int(record["max_position_embeddings"])
    if original:
        setattr(config, ORIGINAL_KEY, int(original))


def record_mismatch(base_config: Any, record: dict) -> str | None:
    """Why an adapter trained with ``record`` does not fit a base with ``base_config`` (different RoPE
    theta or pretraining length: probably another base model), or None."""
    theta = float(record["rope_parameters"]["rope_theta"])
    base_theta = float(_rope_parameters(base_config)["rope_theta"])
    original = record.get(ORIGINAL_KEY) or record["rope_parameters"].get(ORIGINAL_KEY)
    base_original = original_length(base_config)
    if theta != base_theta or (original and int(original) != base_original):
        return (f"the adapter was trained on a base with rope_theta={theta:g} and a {original}-token pretraining "
                f"context, but this base has rope_theta={base_theta:g} and {base_original} tokens")
    return None


def save_context_record(config: Any, folder: str | Path, **extra: Any) -> Path:
    """Write :func:`context_record` (plus ``extra`` keys, e.g. ``base_model``) atomically."""
    from sinklora import atomic

    return atomic.write_text(Path(folder) / CONTEXT_RECORD,
                             json.dumps({**context_record(config), **extra}, indent=2, sort_keys=True) + "\n")


def load_context_record(folder: str | Path) -> dict | None:
    path = Path(folder) / CONTEXT_RECORD
    return json.loads(path.read_text()) if path.is_file() else None
