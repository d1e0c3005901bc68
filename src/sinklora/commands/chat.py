"""Chat in the terminal with a model (or model + adapter), streaming tokens, with an optional KV-cache policy.

Interactive: type a message; ``/reset`` starts over, ``/stats`` shows the cache and speed, ``/quit`` leaves.
Non-interactive (scripts): ``prompt="..."``, or ``prompt=-`` / a pipe on stdin, prints one reply and exits.
``context=FILE`` puts a long document before the first question (LongLoRA's inference format).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from sinklora.config import option
from sinklora.settings import SessionOptions

HELP = "commands: /reset (new conversation), /stats (cache and speed), /help, /quit"


@dataclass
class ChatConfig(SessionOptions):
    prompt: str | None = option(None, "non-interactive: answer this ('-' reads stdin) and exit")


CONFIG = ChatConfig


def format_stats(stats: dict[str, Any]) -> str:
    c, last = stats["cache"], stats["last_reply"]
    if c is None:
        return "no reply yet"
    split = c["split"]
    policy = f" budget={c['budget']} split={split} positions={c['positions']}" if split else ""
    lines = [f"cache: {c['policy']}{policy}",
             f"  tokens seen {c['seen_tokens']}, kept {c['kept_tokens']} (max {c['max_kept_tokens']}), "
             f"evicted {c['evicted_tokens']} (summed over layers)",
             f"  KV memory {c['kv_bytes'] / 2**20:.2f} MiB (max after a step {c['max_kv_bytes'] / 2**20:.2f} MiB)"]
    if last:
        lines.append(f"last reply: {last['completion_tokens']} tokens for a {last['prompt_tokens']}-token prompt in "
                     f"{last['seconds']} s (first token {last['time_to_first_token_s']} s, "
                     f"{last['decode_tokens_per_s']} tokens/s after it)")
    return "\n".join(lines)


def _reply(session: Any, text: str) -> None:
    pieces = session.stream(text)
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    finally:
        pieces.close()  # records what was said, now rather than at garbage collection
    print(flush=True)


def main(cfg: ChatConfig) -> int:
    prompt = cfg.prompt
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise ValueError("prompt: stdin was empty; give prompt='...' or type interactively")
    from sinklora.serve.session import ChatSession

    session = ChatSession.load(cfg)
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
