"""Option groups of the long-context suites (``eval ruler``, ``eval longbench``): the model to evaluate
(:class:`sinklora.settings.EvalModelOptions` plus the chat template) and the KV-cache settings to
evaluate it under (:class:`sinklora.settings.CacheOptions`, or several at once). Torch-free."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sinklora.config import option
from sinklora.settings import CacheOptions, EvalModelOptions


@dataclass
class SuiteModelOptions(EvalModelOptions):
    chat_template: Literal["auto", "always", "never"] = option(
        "auto", "wrap prompts in the tokenizer's chat template: auto = when the tokenizer has one")

    def use_chat(self, tokenizer: Any) -> bool:
        has = bool(getattr(tokenizer, "chat_template", None))
        if self.chat_template == "always" and not has:
            raise ValueError("chat_template='always' but the tokenizer has no chat template; use chat_template=never")
        return self.chat_template == "always" or (self.chat_template == "auto" and has)

    def run_label(self) -> str:
        return self.label or (self.model + (f" + {Path(self.adapter).name}" if self.adapter else ""))


@dataclass
class SuiteCacheOptions(CacheOptions):
    """One KV-cache setting (``cache``/``budget``, as ``sinklora chat``) or several (``caches``)."""

    budget_floor: int = option(0, "a ratio budget keeps at least this many tokens (0: the exact ratio, so "
                                  "that 20% means 20% at every length)")
    caches: list[str] = option(help="several settings in one run, POLICY[:BUDGET] each (e.g. full,h2o:0.5,"
                               "snapkv:0.2); every sample is answered under each; replaces cache/budget",
                               factory=list)

    def cache_settings(self) -> list[CacheOptions]:
        """Every setting of the run, each a :class:`CacheOptions` (everything but ``cache``/``budget``
        shared)."""
        shared = CacheOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(CacheOptions)})
        if not self.caches:
            return [shared]
        settings = []
        for spec in self.caches:
            policy, sep, budget = str(spec).strip().partition(":")
            if sep and not budget.strip():
                raise ValueError(f"cache setting {spec!r}: give a budget after the colon (e.g. h2o:0.2) or no colon "
                                 "for 'full'")
            settings.append(dataclasses.replace(shared, cache=policy.strip(), budget=budget.strip() or None))
        return settings

    def validate(self) -> list[str]:
        if not self.caches:
            return super().validate()
        if self.cache != CacheOptions().cache or self.budget is not None:  # one setting given besides caches
            return [f"caches={self.caches} with cache={self.cache!r} budget={self.budget!r}: give either "
                    "cache/budget (one setting) or caches (several), not both"]
        try:
            settings = self.cache_settings()
        except ValueError as e:
            return [f"caches={self.caches}: {e}"]
        errors = [f"caches entry {s.name!r}: {e}" for s in settings for e in s.validate()]
        labels = [s.name for s in settings]
        if len(set(labels)) != len(labels):
            errors.append(f"caches={self.caches}: a setting appears twice")
        return errors
