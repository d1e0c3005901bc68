"""One greedy answer from a model under a KV-cache setting: the only place the long-context suites
(:mod:`sinklora.eval.ruler`, :mod:`sinklora.eval.longbench`) touch the model or its cache.

A :class:`CacheSetting` names a policy and its budget (``full``; ``h2o@0.2`` = H2O keeping 20% of the
prompt). :func:`generate_answer` builds a fresh cache for the call, decodes greedily and returns the new
token ids with the cache's statistics (tokens seen and kept, KV bytes), so a suite can report its
score next to the compression that produced it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CACHE_POLICIES = ("full", "local", "sink", "h2o", "snapkv")


@dataclass(frozen=True)
class CacheSetting:
    """A KV-cache policy for one generation: ``policy`` with ``budget`` (tokens, or a ratio of the prompt)."""

    policy: str = "full"
    budget: str | None = None
    sinks: int | None = None
    heavy_ratio: float | None = None
    positions: str = "absolute"

    @property
    def name(self) -> str:
        """``full``, ``h2o@0.2``, ``sink@512``: the setting's label in tables and file names."""
        return self.policy if self.budget is None else f"{self.policy}@{self.budget}"

    def check(self) -> None:
        """Raise ValueError (naming the setting) if the policy, budget or positions are invalid."""
        from sinklora.cache.policies import make_policy
        from sinklora.hf.cache import check_positions

        if self.policy not in CACHE_POLICIES:
            raise ValueError(f"cache policy {self.policy!r} is unknown; choose one of {', '.join(CACHE_POLICIES)}")
        make_policy(self.policy, self.budget, sinks=self.sinks, heavy_ratio=self.heavy_ratio)
        check_positions(self.positions, self.policy)


def parse_cache_spec(spec: str, **common: Any) -> CacheSetting:
    """``"full"`` / ``"h2o:0.2"`` / ``"snapkv:20%"`` / ``"sink:512"`` -> CacheSetting (``common``: sinks,
    heavy_ratio, positions shared by every setting of a run)."""
    policy, sep, budget = str(spec).strip().partition(":")
    if sep and not budget.strip():
        raise ValueError(f"cache setting {spec!r}: give a budget after the colon (e.g. h2o:0.2) or no colon for 'full'")
    return CacheSetting(policy.strip(), budget.strip() or None, **common)


@dataclass
class GeneratedAnswer:
    """New token ids (the prompt excluded) and the cache's statistics after the call."""

    ids: list[int]
    cache_stats: dict[str, Any] = field(default_factory=dict)


def generate_answer(model: Any, tokenizer: Any, prompt_ids: Sequence[int], max_new_tokens: int,
                    cache: CacheSetting | None = None, *, stop_ids: Sequence[int] = (),
                    min_new_tokens: int = 0) -> GeneratedAnswer:
    """Greedy decoding of at most ``max_new_tokens`` after ``prompt_ids`` (one prompt, no padding) with a
    fresh cache built from ``cache`` (default: the full cache). Generation stops at the model's EOS
    token(s) or any of ``stop_ids``, not before ``min_new_tokens``."""
    import torch

    from sinklora.hf.cache import cache_kwargs, make_cache

    setting = cache or CacheSetting()
    device = getattr(model, "device", None) or next(model.parameters()).device
    kv = make_cache(model, setting.policy, setting.budget, sinks=setting.sinks, heavy_ratio=setting.heavy_ratio,
                    positions=setting.positions)
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    eos += [int(i) for i in stop_ids if int(i) not in eos]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # (1, N)
    extra = {"min_new_tokens": min_new_tokens} if min_new_tokens > 0 else {}
    with torch.inference_mode():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, num_beams=1,
                             max_new_tokens=max_new_tokens, eos_token_id=eos or None, pad_token_id=pad,
                             **extra, **cache_kwargs(kv))
    sequences = getattr(out, "sequences", out)  # (1, N + new)
    return GeneratedAnswer(sequences[0, prompt.shape[1]:].tolist(), kv.stats())
