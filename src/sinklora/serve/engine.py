"""The generation core of ``sinklora chat`` and ``sinklora serve``: one reply under one request's KV cache.

A :class:`Generation` feeds the prompt through the model in chunks (``prefill_chunk`` tokens per forward
step), then decodes one token per step, checking ``should_stop`` between any two steps, so Ctrl-C, a
closed browser tab or a time limit stops it within one step, prefill included::

    cache = CacheOptions(cache="h2o", budget="0.2").make(model)     # one request's cache
    gen = Generation(model, tokenizer, prompt_ids, cache, Sampling(max_tokens=64), prefill_chunk=512)
    for piece in gen:                                                # text, as it is decoded
        print(piece, end="")
    gen.finish_reason, gen.token_ids, gen.stats()                    # "stop" | "length" | "cancelled"

Greedy decoding (``temperature=0``) is ``argmax``, as ``model.generate(do_sample=False)``; sampling
scales by ``temperature`` and keeps the smallest top set of mass ``top_p`` (nucleus), with a
per-request ``torch.Generator`` (no global seed). The cache is attached only while the generation
runs (``attach_cache``), so one model instance serves requests one after another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sinklora.hf.attention import attach_cache
from sinklora.hf.cache import deferred_eviction
from sinklora.models.loading import eos_ids
from sinklora.settings import CacheOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens and when to stop (OpenAI's ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def context_length(model: Any) -> int:
    """Positions the model was trained (or extended) for: ``max_position_embeddings`` of its text config."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.max_position_embeddings)


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """The chat template of ``messages`` with the assistant's turn opened, as token ids."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # a BatchEncoding in some transformers versions
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def resolve_budget(options: CacheOptions, prompt_len: int) -> CacheOptions:
    """``options`` with a ratio budget turned into tokens of a ``prompt_len``-token prompt.

    A ratio is a share of the prompt, resolved by the policy at the cache's first forward step; the
    prompt reaches the cache in chunks, so the share is taken here, of the whole prompt, by the policy's
    own split (docs/method.md §3)."""
    policy = options.policy()
    if not isinstance(policy.budget, float):
        return options
    split = policy.split(prompt_len)
    return dataclasses.replace(options, budget=None if split is None else str(split.total))


def prefill_chunks(start: int, stop: int, chunk: int, last_at_least: int = 1) -> list[tuple[int, int]]:
    """``[start, stop)`` in steps of ``chunk`` tokens, the last step at least ``last_at_least`` long (a
    policy's score window: the queries of the prompt's end must be in the step that evicts); a shorter
    last step joins the ones before."""
    bounds = list(range(start, stop, chunk)) + [stop]
    while len(bounds) > 2 and stop - bounds[-2] < last_at_least:
        del bounds[-2]
    return list(zip(bounds, bounds[1:]))


class TextStream:
    """Token ids in, text out, piece by piece: a piece never ends inside a multi-byte character, a
    word-start space is decided with the previous tokens in view (SentencePiece), and text is held back
    while it could be the start of a stop string (the stop string itself is never emitted)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] were decoded before; ids[read:] are new
        self.pending = ""
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) <= len(before) or text.endswith("\ufffd"):  # nothing yet, or half a character
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return self._release(text[len(before) :], final=False)

    def flush(self) -> str:
        """What is left at the end (held-back text, a trailing partial character as decoded)."""
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return self._release(text[len(before) :], final=True)

    def _release(self, new: str, final: bool) -> str:
        if self.stopped:
            return ""
        self.pending += new
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        hold = 0 if final else max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])),
                                   default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token from last-position logits (V,): argmax when greedy, else temperature + nucleus sampling."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = (logits.float() / sampling.temperature).softmax(-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # drop a token once the tokens before it already hold top_p of the mass (the first always stays)
        sorted_probs[sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class Generation:
    """One reply: iterate it for its text pieces; its fields fill in as it runs.

    ``prompt_ids[:fed]`` are already in ``cache`` (a chat turn continuing its conversation); the rest is
    fed ``prefill_chunk`` tokens per step. ``should_stop`` is checked between any two forward steps.
    After the loop: ``finish_reason`` ("stop": an end-of-sequence token or a stop string, "length":
    ``max_tokens``, "cancelled"), ``token_ids`` (generated, the end token included), ``text``,
    ``cached`` (tokens of ``prompt_ids + token_ids`` the cache has seen) and :meth:`stats`.
    """

    def __init__(self, model: Any, tokenizer: Any, prompt_ids: Sequence[int], cache: Any, sampling: Sampling, *,
                 prefill_chunk: int, fed: int = 0, should_stop: Callable[[], bool] | None = None):
        if not 0 <= fed < len(prompt_ids):
            raise ValueError(f"fed={fed}: the cache must leave at least one of the {len(prompt_ids)} prompt tokens "
                             "to feed (the last one's logits pick the first new token)")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk}: must be >= 1 token")
        self.model, self.tokenizer, self.cache, self.sampling = model, tokenizer, cache, sampling
        self.prompt_ids, self.prefill_chunk = list(prompt_ids), prefill_chunk
        self.should_stop = should_stop or (lambda: False)
        self.cached = fed
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.first_token_s: float | None = None
        self.seconds = 0.0
        self.cache_stats: dict[str, Any] = {}

    def _forward(self, ids: list[int], cache_kw: dict[str, Any]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = self.model(input_ids=torch.tensor([ids], device=device), logits_to_keep=1, use_cache=True, **cache_kw)
        self.cached += len(ids)
        return out.logits[0, -1]  # (V,)

    def __iter__(self) -> Iterator[str]:
        started = time.perf_counter()
        device = next(self.model.parameters()).device
        generator = None
        if self.sampling.temperature > 0:
            generator = torch.Generator(device=device)
            if self.sampling.seed is None:
                generator.seed()  # a fresh random seed, per request
            else:
                generator.manual_seed(self.sampling.seed)
        stream, ends = TextStream(self.tokenizer, self.sampling.stop), set(eos_ids(self.model, self.tokenizer))
        try:
            with torch.inference_mode(), attach_cache(self.model, self.cache) as cache_kw:
                window = getattr(getattr(self.cache, "policy", None), "score_window", None) or 1
                for start, stop in prefill_chunks(self.cached, len(self.prompt_ids), self.prefill_chunk, window):
                    if self.should_stop():
                        self.finish_reason = "cancelled"
                        return
                    # evict once, at the last chunk: the cache keeps what the whole prompt in one step keeps
                    last = stop == len(self.prompt_ids)
                    with contextlib.nullcontext() if last else deferred_eviction(self.cache):
                        logits = self._forward(self.prompt_ids[start:stop], cache_kw)
                while self.finish_reason is None:  # decode, token by token
                    token = next_token(logits, self.sampling, generator)
                    self.token_ids.append(token)
                    self.first_token_s = self.first_token_s or time.perf_counter() - started
                    piece = "" if token in ends else stream.push(token)
                    if piece:
                        self.text += piece
                        yield piece
                    if token in ends or stream.stopped:
                        self.finish_reason = "stop"
                    elif len(self.token_ids) >= self.sampling.max_tokens:
                        self.finish_reason = "length"
                    elif self.should_stop():
                        self.finish_reason = "cancelled"
                    else:
                        logits = self._forward([token], cache_kw)
            piece = stream.flush()
            if piece:
                self.text += piece
                yield piece
        finally:
            self.seconds = time.perf_counter() - started
            self.cache_stats = self.cache.stats() if hasattr(self.cache, "stats") else {}

    def stats(self) -> dict[str, Any]:
        """Token counts, timings (seconds; time to first token includes the prefill) and the cache's stats."""
        n, decode_s = len(self.token_ids), self.seconds - (self.first_token_s or self.seconds)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": n, "finish_reason": self.finish_reason,
                "seconds": round(self.seconds, 4),
                "time_to_first_token_s": None if self.first_token_s is None else round(self.first_token_s, 4),
                "decode_tokens_per_s": round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else None,
                "cache": self.cache_stats}
