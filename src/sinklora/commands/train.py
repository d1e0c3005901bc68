"""Extend a model's context window: position interpolation + LoRA+ + SF-Attn on long documents.

The recipe (docs/method.md §1): linear RoPE interpolation to ``target_len``, LoRA on q/k/v/o with
trainable embeddings and norms, sparse training attention (``sf`` by default), continued pretraining on
long documents packed into rows of ``train_len`` tokens; perplexity and passkey retrieval with full
attention before and after. ``preset=auto`` picks ``gpu`` (8k -> 32k, 200 steps) on a CUDA device,
``cpu-smoke`` (a smoke-scale run in minutes) otherwise. Results, the adapter and ``loss.png`` land in
``output_dir``.
"""

from __future__ import annotations

from sinklora.train.configs import ExtendConfig

CONFIG = ExtendConfig


def main(cfg: ExtendConfig) -> int:
    from sinklora.train.extend import run

    run(cfg)
    return 0
