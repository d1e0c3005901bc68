"""The terminal chat (``sinklora chat``): a conversation whose KV cache carries over from turn to turn,
on the generation core of the server (:mod:`sinklora.serve.engine`).

``context=FILE`` puts a long document before the first question (LongLoRA's inference format).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sinklora.serve.engine import Generation, Sampling, chat_prompt_ids, resolve_budget
from sinklora.settings import SessionOptions

logger = logging.getLogger(__name__)

CONTEXT_TEMPLATE = ("Below is a document. Read it and answer the question after it.\n"
                    "The document begins.\n{document}\nThe document ends.\n{question}")


class ChatSession:
    """A conversation with one KV cache: each turn feeds only the tokens the cache has not seen.

    The conversation's canonical input is the chat template of all messages; the cache is continued when
    the tokens it has seen are a prefix of that input, otherwise (a reply that re-tokenises differently,
    an interrupted step) the turn starts a fresh cache. A ratio budget is a share of the first prompt.
    """

    def __init__(self, model: Any, tokenizer: Any, opts: SessionOptions):
        self.model, self.tokenizer, self.opts = model, tokenizer, opts
        self.document = Path(opts.context).read_text(errors="replace") if opts.context else None
        self.reset()

    @classmethod
    def load(cls, opts: SessionOptions) -> ChatSession:
        """Load the model of ``opts`` and open a session on it."""
        model, tokenizer = opts.load()
        return cls(model, tokenizer, opts)

    def reset(self) -> None:
        """A new conversation (the system prompt only) and no cache."""
        self.messages: list[dict[str, str]] = []
        if self.opts.system_prompt:
            self.messages.append({"role": "system", "content": self.opts.system_prompt})
        self.cache: Any = None
        self.cached_ids: list[int] = []  # the tokens the cache has seen, in order
        self.last: Generation | None = None

    def _user_content(self, text: str) -> str:
        first = not any(m["role"] == "user" for m in self.messages)
        if first and self.document is not None:
            return CONTEXT_TEMPLATE.format(document=self.document, question=text)
        return text

    def stream(self, text: str) -> Iterator[str]:
        """Add a user message, yield the reply's text as it is generated, then record it."""
        self.messages.append({"role": "user", "content": self._user_content(text)})
        ids = chat_prompt_ids(self.tokenizer, self.messages)
        n = len(self.cached_ids)
        if self.cache is None or ids[:n] != self.cached_ids or len(ids) <= n:
            if self.cache is not None:
                logger.info("the conversation does not continue the cached tokens: starting a fresh cache")
            self.cache, n = resolve_budget(self.opts, len(ids)).make(self.model), 0
        opts = self.opts
        sampling = Sampling(max_tokens=opts.max_new_tokens, temperature=opts.temperature, top_p=opts.top_p,
                            seed=opts.seed)
        gen = self.last = Generation(self.model, self.tokenizer, ids, self.cache, sampling,
                                     prefill_chunk=opts.prefill_chunk, fed=n)
        try:
            yield from gen
        except BaseException:  # Ctrl-C or an error, perhaps inside a step: the cache is not trusted
            self.cache, self.cached_ids = None, []
            raise
        finally:  # also when the consumer stops early: record what was said
            if gen.token_ids:
                self.messages.append({"role": "assistant", "content": gen.text})
            else:  # stopped before any reply: forget the question
                self.messages.pop()
            if self.cache is not None:
                self.cached_ids = (ids + gen.token_ids)[: gen.cached]

    def stats(self) -> dict[str, Any]:
        return {"cache": None if self.cache is None else self.cache.stats(),
                "last_reply": None if self.last is None else self.last.stats(),
                "turns": sum(m["role"] == "user" for m in self.messages)}
