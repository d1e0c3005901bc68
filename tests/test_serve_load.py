"""`sinklora serve` under load and when clients leave: a bounded queue (429 + Retry-After, nobody hangs),
cancellation on disconnect (prefill included), time limits. The model is slowed by a sleep before every
forward step, so a prefill of many chunks takes seconds whatever the machine; every wait is bounded."""

from __future__ import annotations

import http.client
import json
import threading
import time
from urllib.parse import urlsplit

import openai
from serving import events, health, request, tiny_server, wait_until

LONG_PROMPT = "x" * 800  # ~830 chat tokens: 104 prefill chunks of 8


def _open_stream(url: str, body: dict) -> http.client.HTTPConnection:
    """Send a request and leave it unread (close the connection to disconnect)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn


def _running(url: str) -> dict | None:
    return health(url)["running"]


def test_eight_concurrent_clients_are_answered_or_told_to_retry():
    with tiny_server(slow_s=0.02, max_queue=2) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        outcomes: dict[int, object] = {}
        start = threading.Barrier(8)

        def one(i: int) -> None:
            start.wait(timeout=30)
            try:
                if i % 2:
                    chunks = list(client.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": f"client {i}"}], max_tokens=6, stream=True))
                    outcomes[i] = "ok" if chunks[-1].choices[0].finish_reason else "truncated"
                else:
                    res = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"c{i}"}],
                                                         max_tokens=6)
                    outcomes[i] = "ok" if res.usage.completion_tokens == 6 else "short"
            except openai.RateLimitError as e:
                outcomes[i] = ("429", e.response.headers.get("retry-after"))

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert len(outcomes) == 8
        ok = [i for i, o in outcomes.items() if o == "ok"]
        refused = [o for o in outcomes.values() if o != "ok"]
        assert len(ok) >= 3, outcomes  # the running request and the two that waited
        assert refused and all(o[0] == "429" and int(o[1]) >= 1 for o in refused), outcomes
        stats = health(url)
        assert stats["running"] is None and stats["waiting"] == 0
        assert stats["finished"]["rejected"] == len(refused) and stats["finished"]["length"] == len(ok)


def test_disconnect_during_a_long_prefill_frees_the_worker():
    with tiny_server(slow_s=0.03, prefill_chunk=8) as (url, _):
        conn = _open_stream(url, {"messages": [{"role": "user", "content": LONG_PROMPT}], "stream": True})
        assert wait_until(lambda: (_running(url) or {}).get("cached_tokens", 0) >= 16, timeout=30)
        at_disconnect = _running(url)
        assert at_disconnect["cached_tokens"] < at_disconnect["prompt_tokens"] / 2  # >= 50 chunks (1.5 s) to go
        conn.close()
        t0 = time.monotonic()
        assert wait_until(lambda: _running(url) is None, timeout=10)
        freed_s = time.monotonic() - t0
        assert freed_s < 1.0, f"worker freed {freed_s:.2f} s after the disconnect"
        assert health(url)["finished"] == {"disconnected": 1}
        status, _, raw = request(url, "POST", "/v1/chat/completions",
                                 {"messages": [{"role": "user", "content": "next"}], "max_tokens": 2})
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2


def test_disconnect_while_decoding_or_waiting_cancels_without_running_the_waiting_one():
    with tiny_server(slow_s=0.03) as (url, _):
        body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 500}
        decoding = _open_stream(url, body)  # non-streaming: the disconnect is all the server hears
        assert wait_until(lambda: (_running(url) or {}).get("completion_tokens", 0) >= 2, timeout=30)
        waiting = _open_stream(url, body)
        assert wait_until(lambda: health(url)["waiting"] == 1, timeout=10)
        waiting.close()
        assert wait_until(lambda: health(url)["waiting"] == 0, timeout=5)
        decoding.close()
        assert wait_until(lambda: _running(url) is None, timeout=5)
        assert wait_until(lambda: health(url)["finished"] == {"disconnected": 2}, timeout=5)


def test_request_timeout_stops_generation_with_an_error():
    with tiny_server(slow_s=0.03, request_timeout=1.0) as (url, _):
        t0 = time.monotonic()
        status, _, raw = request(url, "POST", "/v1/chat/completions",
                                 {"messages": [{"role": "user", "content": "go"}], "max_tokens": 500})
        assert status == 504 and json.loads(raw)["error"]["code"] == "timeout" and time.monotonic() - t0 < 5
        status, _, raw = request(url, "POST", "/v1/chat/completions",
                                 {"messages": [{"role": "user", "content": "go"}], "max_tokens": 500, "stream": True})
        evs = events(raw)
        assert status == 200 and evs[-1] == "[DONE]" and evs[-2]["error"]["code"] == "timeout"
        assert wait_until(lambda: _running(url) is None, timeout=5)
        assert health(url)["finished"] == {"timeout": 2}
