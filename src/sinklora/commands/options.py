"""Option groups shared by the long-context eval commands, declared once and free of torch (importing a
command module stays instant): the model to evaluate and the KV-cache settings to evaluate it under."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sinklora.config import option
from sinklora.eval.generation import CACHE_POLICIES, CacheSetting, parse_cache_spec


@dataclass
class ModelFields:
    """The fields of :class:`sinklora.eval.results.EvalModelOptions` (same names, defaults and meaning)."""

    model: str = option("smollm2-135m-instruct", "model alias, local HF folder (an export) or hub id")
    adapter: str | None = option(None, "LoRA/LoRA+ adapter folder to apply on top of the model")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "weights dtype; auto = as the checkpoint stores it")
    device: str = option("auto", "torch device (cpu, cuda, cuda:1); auto = cuda when available, else cpu")
    context_len: int | None = option(
        None, "extend RoPE to this length by linear position interpolation before evaluating (the untrained "
        "baseline); an adapter's own RoPE record is applied without it")
    output_dir: str = option("outputs/eval", "folder for results.json, the table, the plot and config.yaml")
    label: str | None = option(None, "name of the run in tables and plots; default: model (+ adapter)")
    chat_template: Literal["auto", "always", "never"] = option(
        "auto", "wrap prompts in the tokenizer's chat template: auto = when the tokenizer has one")

    def model_errors(self) -> list[str]:
        errors = []
        if not self.model:
            errors.append("model='': give a model alias, a local folder or a hub id")
        if self.adapter is not None and not Path(self.adapter).exists():
            errors.append(f"adapter={self.adapter!r}: no such folder; give a trained adapter folder or omit it")
        if self.context_len is not None and self.context_len < 1:
            errors.append(f"context_len={self.context_len}: must be a positive token count, or omit it")
        return errors

    def load(self) -> tuple[Any, Any]:
        """-> (model, tokenizer) in eval mode, as every eval command loads them."""
        from sinklora.eval.results import EvalModelOptions, load_eval_model

        return load_eval_model(EvalModelOptions(model=self.model, adapter=self.adapter, dtype=self.dtype,
                                                device=self.device, context_len=self.context_len,
                                                output_dir=self.output_dir, label=self.label))

    def use_chat(self, tokenizer: Any) -> bool:
        has = bool(getattr(tokenizer, "chat_template", None))
        if self.chat_template == "always" and not has:
            raise ValueError("chat_template='always' but the tokenizer has no chat template; use chat_template=never")
        return self.chat_template == "always" or (self.chat_template == "auto" and has)

    def run_label(self) -> str:
        return self.label or (self.model + (f" + {Path(self.adapter).name}" if self.adapter else ""))


@dataclass
class CacheFields:
    """One KV-cache setting (``cache``/``budget``, as ``sinklora chat``) or several (``caches``)."""

    cache: Literal["full", "local", "sink", "h2o", "snapkv"] = option("full", "KV-cache policy (method.md section 3)")
    budget: str | None = option(None, "KV budget: tokens (512) or a ratio of each prompt (0.2, 20%)")
    caches: list[str] = option(help="several settings in one run, POLICY[:BUDGET] each (e.g. full,h2o:0.5,"
                               "snapkv:0.2); every sample is answered under each; replaces cache/budget",
                               factory=list)
    sinks: int | None = option(None, "sink tokens always kept (default: 4 for sink, 0 for h2o/snapkv)")
    heavy_ratio: float | None = option(None, "h2o/snapkv: share of the non-sink budget for heavy hitters (default 0.5)")
    positions: Literal["absolute", "rank"] = option("absolute", "RoPE positions of kept tokens: absolute, or rank "
                                                    "within the cache (StreamingLLM)")

    def cache_settings(self) -> list[CacheSetting]:
        common = {"sinks": self.sinks, "heavy_ratio": self.heavy_ratio, "positions": self.positions}
        if self.caches:
            return [parse_cache_spec(spec, **common) for spec in self.caches]
        return [CacheSetting(self.cache, None if self.budget is None else str(self.budget), **common)]

    def cache_errors(self) -> list[str]:
        if self.caches and (self.cache != "full" or self.budget is not None):
            return [f"caches={self.caches} with cache={self.cache!r} budget={self.budget!r}: give either "
                    "cache/budget (one setting) or caches (several), not both"]
        errors, names = [], []
        try:
            settings = self.cache_settings()
        except ValueError as e:
            return [f"caches={self.caches}: {e}"]
        for s in settings:
            try:
                s.check()
            except ValueError as e:
                where = f"caches entry {s.name!r}" if self.caches else f"cache={self.cache!r} budget={self.budget!r}"
                errors.append(f"{where}: {e} (policies: {', '.join(CACHE_POLICIES)})")
            names.append(s.name)
        if len(set(names)) != len(names):
            errors.append(f"caches={self.caches}: a setting appears twice")
        return errors
