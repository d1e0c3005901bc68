"""Chat in the terminal with a model (or model + adapter), streaming tokens, with an optional KV-cache policy.

Interactive: type a message; ``/reset`` starts over, ``/stats`` shows the cache and speed, ``/quit`` leaves.
Non-interactive (scripts): ``prompt="..."``, or ``prompt=-`` / a pipe on stdin, prints one reply and exits.
``context=FILE`` puts a long document before the first question (LongLoRA's inference format).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from sinklora.config import option

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
CONTEXT_TEMPLATE = ("Below is a document. Read it and answer the question after it.\n"
                    "The document begins.\n{document}\nThe document ends.\n{question}")
HELP = "commands: /reset (new conversation), /stats (cache and speed), /help, /quit"


@dataclass
class SessionOptions:
    """What a chat session needs: model, cache policy, decoding (shared by ``chat`` and ``serve``)."""

    model: str = option("smollm2-135m-instruct", "model alias, local HF folder or hub id")
    adapter: str | None = option(None, "LoRA/LoRA+ adapter folder to apply on top of the model")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "weights dtype; auto = as the loader decides")
    device: str = option("auto", "torch device (cpu, cuda, cuda:1); auto = cuda when available, else cpu")
    system_prompt: str = option(DEFAULT_SYSTEM_PROMPT, "system message; empty for none")
    context: str | None = option(None, "text file (a long document) put before the first question")
    cache: Literal["full", "local", "sink", "h2o", "snapkv"] = option("full", "KV-cache policy (method.md section 3)")
    budget: str | None = option(None, "KV budget: tokens (512) or a ratio of the first prompt (0.2, 20%)")
    sinks: int | None = option(None, "sink tokens always kept (default: 4 for sink, 0 for h2o/snapkv)")
    heavy_ratio: float | None = option(None, "h2o/snapkv: share of the non-sink budget for heavy hitters (default 0.5)")
    positions: Literal["absolute", "rank"] = option("absolute", "RoPE positions of kept tokens: absolute, or rank "
                                                    "within the cache (StreamingLLM: streams past the trained length)")
    max_new_tokens: int = option(256, "most tokens per reply")
    temperature: float = option(0.0, "0 = greedy; > 0 samples")
    top_p: float = option(1.0, "nucleus sampling mass (with temperature > 0)")
    seed: int = option(0, "sampling seed")

    def validate(self) -> list[str]:
        from sinklora.cache.policies import make_policy
        from sinklora.hf.cache import check_positions

        errors = []
        if self.context is not None and not Path(self.context).is_file():
            errors.append(f"context={self.context!r}: no such file; give a text file or omit it")
        if self.max_new_tokens < 1:
            errors.append(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            errors.append(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            errors.append(f"top_p={self.top_p}: must be in (0, 1]")
        try:
            make_policy(self.cache, self.budget, sinks=self.sinks, heavy_ratio=self.heavy_ratio)
        except ValueError as e:
            errors.append(f"cache={self.cache!r}: {e}")
        try:
            check_positions(self.positions, self.cache)
        except ValueError as e:
            errors.append(f"positions={self.positions!r} with cache={self.cache!r}: {e}")
        return errors


@dataclass
class ChatConfig(SessionOptions):
    prompt: str | None = option(None, "non-interactive: answer this ('-' reads stdin) and exit")


CONFIG = ChatConfig


def _stop_criteria():
    """A StoppingCriteria flag: Ctrl-C, or a closed web page, stops generation between two tokens."""
    from transformers import StoppingCriteria

    class Stop(StoppingCriteria):
        def __init__(self) -> None:
            self.event = threading.Event()

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)

    return Stop()


class ChatSession:
    """A conversation with a persistent KV cache: each turn feeds only the tokens the cache has not seen.

    The conversation's canonical input is the chat template of all messages; the cache is reused when
    its tokens are a prefix of that input, otherwise (re-tokenised reply, /reset) it starts afresh.
    """

    def __init__(self, model: Any, tokenizer: Any, opts: SessionOptions):
        self.model, self.tokenizer, self.opts = model, tokenizer, opts
        self.document = Path(opts.context).read_text(errors="replace") if opts.context else None
        self.stop = _stop_criteria()
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        from sinklora.hf.cache import make_cache

        self.messages: list[dict[str, str]] = []
        if self.opts.system_prompt:
            self.messages.append({"role": "system", "content": self.opts.system_prompt})
        self.ids: list[int] = []  # every token the cache has seen
        self.cache = make_cache(self.model, self.opts.cache, self.opts.budget, sinks=self.opts.sinks,
                                heavy_ratio=self.opts.heavy_ratio, positions=self.opts.positions)
        self.last: dict[str, Any] = {}

    def _user_content(self, text: str) -> str:
        first = not any(m["role"] == "user" for m in self.messages)
        if first and self.document is not None:
            return CONTEXT_TEMPLATE.format(document=self.document, question=text)
        return text

    def _input_ids(self) -> list[int]:
        ids = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in some versions
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def stream(self, text: str) -> Iterator[str]:
        """Add a user message, yield the reply's text as it is generated, then record it."""
        from transformers import TextIteratorStreamer

        from sinklora.hf.cache import cache_kwargs

        self.messages.append({"role": "user", "content": self._user_content(text)})
        ids = self._input_ids()
        if self.ids and ids[: len(self.ids)] != self.ids:
            logger.info("conversation is not a continuation of the cached tokens: starting a fresh cache")
            self.reset_cache_only()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        opts, device = self.opts, self._device()
        sampling = {"do_sample": True, "temperature": opts.temperature, "top_p": opts.top_p} \
            if opts.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.tensor([ids], device=device)
        self.stop.event.clear()
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                if opts.temperature > 0:
                    torch.manual_seed(opts.seed)
                with torch.inference_mode():
                    result["out"] = self.model.generate(
                        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=opts.max_new_tokens,
                        streamer=streamer, stopping_criteria=[self.stop], pad_token_id=pad,
                        **sampling, **cache_kwargs(self.cache))
            except BaseException as e:  # surfaced in the caller's thread below
                result["error"] = e
                streamer.end()

        t0 = time.perf_counter()
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        first = None
        pieces = []
        try:
            for piece in streamer:
                first = first or time.perf_counter()
                pieces.append(piece)
                yield piece
        finally:  # also when the consumer stops early (Ctrl-C, closed page): stop, then record what was said
            self.stop.event.set()
            thread.join()
            self._record(ids, result.get("out"), "".join(pieces), t0, first)
        if "error" in result:
            raise result["error"]

    def _record(self, ids: list[int], out: torch.Tensor | None, reply: str, t0: float, first: float | None) -> None:
        if out is None:  # generation failed: forget the question and the half-fed cache
            self.messages.pop()
            self.reset_cache_only()
            return
        # the cache has seen every token of `out` but the last; the next turn's input starts with `out`
        self.ids = out[0].tolist()
        self.messages.append({"role": "assistant", "content": reply})
        new, now = len(self.ids) - len(ids), time.perf_counter()
        decode_s = now - (first or t0)
        self.last = {"prompt_tokens": len(ids), "new_tokens": new, "seconds": round(now - t0, 3),
                     "first_token_s": round((first or t0) - t0, 3),
                     "decode_tokens_per_s": round((new - 1) / decode_s, 2) if new > 1 and decode_s > 0 else None}

    def reset_cache_only(self) -> None:
        """Drop the cache (keep the messages): the next turn re-reads the whole conversation."""
        messages = self.messages
        self.reset()
        self.messages = messages

    def stats(self) -> dict[str, Any]:
        return {"cache": self.cache.stats(), "last_reply": self.last,
                "turns": sum(m["role"] == "user" for m in self.messages)}


def load_session(opts: SessionOptions) -> ChatSession:
    from sinklora.eval.results import DTYPES
    from sinklora.models.loading import load_model

    device = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else None)
    model, tokenizer = load_model(opts.model, adapter=opts.adapter, dtype=DTYPES.get(opts.dtype), device=device)
    return ChatSession(model.eval(), tokenizer, opts)


def format_stats(stats: dict[str, Any]) -> str:
    c, last = stats["cache"], stats["last_reply"]
    split = c["split"]
    policy = f" budget={c['budget']} split={split} positions={c['positions']}" if split else ""
    lines = [f"cache: {c['policy']}{policy}",
             f"  tokens seen {c['seen_tokens']}, kept {c['kept_tokens']} (max {c['max_kept_tokens']}), "
             f"evicted {c['evicted_tokens']} (summed over layers)",
             f"  KV memory {c['kv_bytes'] / 2**20:.2f} MiB (max after a step {c['max_kv_bytes'] / 2**20:.2f} MiB)"]
    if last:
        lines.append(f"last reply: {last['new_tokens']} tokens for a {last['prompt_tokens']}-token prompt in "
                     f"{last['seconds']} s (first token {last['first_token_s']} s, "
                     f"{last['decode_tokens_per_s']} tokens/s after it)")
    return "\n".join(lines)


def _reply(session: ChatSession, text: str) -> None:
    try:
        for piece in session.stream(text):
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print(flush=True)


def main(cfg: ChatConfig) -> int:
    prompt = cfg.prompt
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise ValueError("prompt: stdin was empty; give prompt='...' or type interactively")
    session = load_session(cfg)
    if prompt is not None:
        _reply(session, prompt)
        return 0
    print(f"sinklora chat: {cfg.model}" + (f" + {cfg.adapter}" if cfg.adapter else "") + f", cache {cfg.cache}"
          + (f", context {cfg.context}" if cfg.context else "") + f". {HELP}")
    while True:
        try:
            text = input("\n> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(new conversation)")
        elif text == "/stats":
            print(format_stats(session.stats()))
        elif text == "/help" or (text.startswith("/") and " " not in text):
            print(HELP)
        else:
            _reply(session, text)
