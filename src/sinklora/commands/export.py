"""Merge a LoRA+ adapter (with its trained embeddings and norms) into a plain Hugging Face model folder.

The folder's config carries the extended context, so ``AutoModelForCausalLM.from_pretrained(folder)``
needs no sinklora code; the export is reloaded and its logits checked against the adapter's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sinklora.config import option
from sinklora.defaults import DEFAULT_MODEL
from sinklora.settings import Dtype


@dataclass
class ExportConfig:
    adapter: str = option("", "adapter folder saved by training (required)")
    output: str = option("", "folder to write the merged model to (required)")
    base: str = option(DEFAULT_MODEL, "base model the adapter was trained on (alias, hub id or folder)")
    dtype: Dtype = option("auto", "saved weights' dtype (auto: as the base stores them)")
    overwrite: bool = option(False, "replace a non-empty output folder")

    def validate(self) -> list[str]:
        from sinklora.models.export import check_output

        errors = []
        if not self.adapter:
            errors.append("adapter='': give the adapter folder written by `sinklora train` or `sinklora sft`")
        elif not (Path(self.adapter).expanduser() / "adapter_config.json").is_file():
            errors.append(f"adapter={self.adapter!r}: no adapter_config.json there; give a peft adapter folder")
        if not self.output:
            errors.append("output='': give a folder to write the merged model to")
        elif (problem := check_output(Path(self.output).expanduser(), self.overwrite)) is not None:
            errors.append(problem)
        return errors


CONFIG = ExportConfig


def main(cfg: ExportConfig) -> int:
    from sinklora.models.export import export_merged

    print(export_merged(cfg.base, cfg.adapter, cfg.output, dtype=cfg.dtype, overwrite=cfg.overwrite))
    return 0
