"""Helpers of the server tests: a tiny-model server on 127.0.0.1 in a thread, raw HTTP, SSE parsing, and
the independent greedy reference (transformers' ``generate`` with its own cache)."""

from __future__ import annotations

import contextlib
import http.client
import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import torch
from conftest import tiny_llama, tiny_tokenizer

from sinklora.commands.serve import ServeConfig
from sinklora.serve.server import Service, make_app, serve_in_thread

SYSTEM = "Be brief."
CONTEXT = 1024


def tiny_model(slow_s: float = 0.0) -> Any:
    """The tiny model of the server tests; ``slow_s`` sleeps before every forward (a long prefill on demand)."""
    model = tiny_llama(seed=3, max_position_embeddings=CONTEXT)
    if slow_s:
        model.register_forward_pre_hook(lambda module, args: time.sleep(slow_s))
    return model


@contextlib.contextmanager
def tiny_server(slow_s: float = 0.0, **options: Any) -> Iterator[tuple[str, Service]]:
    """``(url, service)`` of a server on an ephemeral loopback port; stopped on exit."""
    cfg = ServeConfig(**{"model": "tiny", "system_prompt": SYSTEM, "max_new_tokens": 8, "device": "cpu", **options})
    service = Service(tiny_model(slow_s), tiny_tokenizer(), cfg, cfg, model_id="tiny")
    with serve_in_thread(make_app(service)) as url:
        yield url, service


def reference(messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """Greedy reply of an independent model copy through ``generate`` (transformers' own cache)."""
    tok = tiny_tokenizer()
    ids = torch.tensor([tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)])
    out = tiny_model().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=256)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def request(url: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
            timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request: ``(status, headers with lower-case names, body)``; a dict body is sent as JSON."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    headers = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
        headers.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=body, headers=headers)
        res = conn.getresponse()
        return res.status, {k.lower(): v for k, v in res.getheaders()}, res.read()
    finally:
        conn.close()


def events(body: bytes) -> list[Any]:
    """The ``data:`` payloads of a server-sent event stream (JSON decoded; ``[DONE]`` kept as the string)."""
    out = []
    for event in body.decode().split("\n\n"):
        if event.startswith("data: "):
            data = event[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def health(url: str) -> dict[str, Any]:
    return json.loads(request(url, "GET", "/health")[2])


def wait_until(check: Any, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``check()`` until it is true or ``timeout`` seconds pass (bounded in time and count)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        if check():
            return True
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    return bool(check())
