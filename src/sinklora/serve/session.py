"""A chat session: a conversation with a persistent KV cache under a policy, streaming its replies
(the generation core of ``sinklora chat`` and ``sinklora serve``).

``context=FILE`` puts a long document before the first question (LongLoRA's inference format).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sinklora.hf.attention import attach_cache
from sinklora.settings import SessionOptions

logger = logging.getLogger(__name__)

CONTEXT_TEMPLATE = ("Below is a document. Read it and answer the question after it.\n"
                    "The document begins.\n{document}\nThe document ends.\n{question}")


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

    @classmethod
    def load(cls, opts: SessionOptions) -> ChatSession:
        """Load the model of ``opts`` and open a session on it."""
        model, tokenizer = opts.load()
        return cls(model, tokenizer, opts)

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = []
        if self.opts.system_prompt:
            self.messages.append({"role": "system", "content": self.opts.system_prompt})
        self.ids: list[int] = []  # every token the cache has seen
        self.cache = self.opts.make(self.model)
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
                with torch.inference_mode(), attach_cache(self.model, self.cache) as cache_kw:
                    result["out"] = self.model.generate(
                        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=opts.max_new_tokens,
                        streamer=streamer, stopping_criteria=[self.stop], pad_token_id=pad, **sampling, **cache_kw)
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


