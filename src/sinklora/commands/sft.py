"""Instruction-tune a base or context-extended model on long instruction data (LongAlpaca format).

Data: a JSON list or JSONL of ``{"instruction", "input" (optional), "output"}`` records, a saved dataset
folder or ``hf:NAME[:split]`` (``columns`` renames fields). Each record goes through the tokenizer's chat
template with the loss on the response only; over-long inputs are cut in the middle. LoRA+ with sparse
attention (``sf``), the paper's SFT recipe for unset ``train.*`` values, one epoch by default;
``adapter=`` continues a ``sinklora train`` adapter. ``eval.tasks=test.jsonl`` scores exact-match
answers before and after.
"""

from __future__ import annotations

from sinklora.train.configs import SFTConfig

CONFIG = SFTConfig


def main(cfg: SFTConfig) -> int:
    from sinklora.train.sft import run

    run(cfg)
    return 0
