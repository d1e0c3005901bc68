"""Merge a LoRA+ adapter (with its trained embeddings and norms) into a plain Hugging Face model folder.

The folder's config carries the extended context (linear RoPE factor and max_position_embeddings), so
``AutoModelForCausalLM.from_pretrained(folder)`` needs no sinklora code. Merging is done in float32;
after saving, the folder is reloaded and its logits are compared with the adapter model's.

Older readers: transformers 4.x, vLLM and llama.cpp's converter read ``rope_scaling`` and ``rope_theta``,
not 5.x's ``rope_parameters`` (4.57 silently falls back to default RoPE and theta 10000). config.json
carries both forms (5.x reads ``rope_scaling`` first, so both say the same), and tokenizer_config.json
names a class 4.x knows (5.x writes ``TokenizersBackend``, which 4.57 cannot import).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from sinklora.models.loading import load_model
from sinklora.models.lora import usual_permissions
from sinklora.models.rope import rope_summary
from sinklora.runtime import as_dtype

logger = logging.getLogger(__name__)

_PROBE_TEXT = "The grass is green. The sky is blue. The pass key is 4711. Remember it."
# merging W + B A in float32 changes rounding only (SmolLM2: 6e-5 on logits of size 30): a relative
# error above this is a broken export
_FP32_TOLERANCE = 1e-4


def check_output(output: Path, overwrite: bool) -> str | None:
    if output.exists() and not output.is_dir():
        return f"output={str(output)!r} is a file; give a folder path"
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        return f"output={str(output)!r} is a non-empty folder; choose a new folder or set overwrite=true"
    return None


def _probe_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits.float()


def _target_dtype(dtype: Any, config: Any) -> torch.dtype:
    resolved = as_dtype(dtype)
    if resolved != "auto":
        return resolved
    stored = getattr(config, "dtype", None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_portable_config(folder: Path) -> None:
    """Add the transformers-4.x form of the RoPE settings (``rope_scaling``, ``rope_theta``) to config.json."""
    def edit(cfg: dict) -> None:
        params = cfg.get("rope_parameters") or {}
        if "rope_theta" in params:
            cfg["rope_theta"] = params["rope_theta"]
        if params.get("rope_type", "default") != "default":
            # 'type' too: older vLLM and llama.cpp converters read that name
            scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
            cfg["rope_scaling"] = {**scaling, "type": scaling["rope_type"]}

    _edit_json(folder / "config.json", edit)


def write_portable_tokenizer(folder: Path) -> None:
    """tokenizer_config.json that 4.x reads too: a class it knows, special tokens under the old key."""
    def edit(cfg: dict) -> None:
        if cfg.get("tokenizer_class") == "TokenizersBackend":
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # 5.x reads it as TokenizersBackend
        extra = cfg.get("extra_special_tokens")
        if isinstance(extra, list):  # 4.x expects a dict there; its list is additional_special_tokens
            cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")

    if (folder / "tokenizer_config.json").is_file():
        _edit_json(folder / "tokenizer_config.json", edit)


def export_merged(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: Any = None,
    overwrite: bool = False,
) -> Path:
    """Merge ``adapter`` into ``base`` and save model + tokenizer to ``output``; returns ``output``.

    ``dtype``: None/'auto' keeps the base's stored dtype; else a torch.dtype or 'float32'/'bfloat16'/'float16'.
    Refuses a non-empty ``output`` unless ``overwrite``. The folder appears atomically once verified.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    output = Path(output).expanduser()
    if (problem := check_output(output, overwrite)) is not None:
        raise ValueError(problem)
    model, tokenizer = load_model(base, adapter=adapter, dtype=torch.float32)
    model.eval()
    ids = tokenizer(_PROBE_TEXT, return_tensors="pt").input_ids
    ids = ids if ids.numel() else torch.arange(8).unsqueeze(0)
    reference = _probe_logits(model, ids)

    target = _target_dtype(dtype, AutoConfig.from_pretrained(model.get_base_model().name_or_path))
    merged = model.merge_and_unload()
    in_memory = float((_probe_logits(merged, ids) - reference).abs().max())
    logger.info("merged in memory: max |logits - adapter logits| = %.3g", in_memory)
    merged = merged.to(target)

    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}-", dir=output.parent) as tmp:
        staged = Path(tmp) / "model"
        merged.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        write_portable_config(staged)
        write_portable_tokenizer(staged)
        reloaded = AutoModelForCausalLM.from_pretrained(staged, dtype=torch.float32)
        diff = float((_probe_logits(reloaded, ids) - reference).abs().max())
        logger.info(
            "saved %s (%s): max |logits - adapter logits| = %.3g on %d tokens", output, target, diff, ids.shape[1]
        )
        scale = float(reference.abs().max())
        if target == torch.float32 and not diff <= _FP32_TOLERANCE * max(1.0, scale):
            raise RuntimeError(
                f"export check failed: merged float32 logits differ from the adapter model's by {diff:.3g} "
                f"(logits up to {scale:.3g})"
            )
        saved, trained = rope_summary(reloaded.config), rope_summary(model.get_base_model().config)
        if saved != trained:
            raise RuntimeError(f"export check failed: the saved RoPE settings {saved} differ from the adapter "
                               f"model's {trained}")
        usual_permissions(staged, *staged.rglob("*"))
        if output.exists():  # overwrite=True was checked above
            shutil.rmtree(output)
        os.replace(staged, output)
    return output
