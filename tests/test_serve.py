"""`sinklora serve`: the OpenAI-compatible API against the official `openai` client and raw HTTP, on
127.0.0.1 with a tiny random model (answers checked against an independent greedy `generate`)."""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from serving import SYSTEM, events, health, reference, request, tiny_server

N = 8  # max_new_tokens of the test server


@pytest.fixture(scope="module")
def server():
    with tiny_server() as (url, service):
        yield url, service


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _messages(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def test_openai_client_non_streaming_matches_greedy_generate(client):
    res = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}])
    assert res.choices[0].message.content == reference(_messages("hello"), N)
    assert res.choices[0].finish_reason in ("length", "stop") and res.object == "chat.completion"
    assert res.usage.completion_tokens == N and res.usage.total_tokens == res.usage.prompt_tokens + N
    cache = res.sinklora["cache"]
    assert cache["policy"] == "full" and cache["kept_tokens"] == cache["seen_tokens"] == res.usage.total_tokens - 1


@pytest.mark.parametrize("policy", [{"cache": "h2o", "budget": 1000}, {"cache": "snapkv", "budget": "0.9", "budget_floor": 0},
                                    {"cache": "sink", "budget": 40, "sink_tokens": 4, "positions": "rank"}])
def test_openai_client_streaming_with_a_cache_policy_in_extra_body(client, policy):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi there"}],
                                            stream=True, stream_options={"include_usage": True}, extra_body=policy)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    last, usage = chunks[-2], chunks[-1]
    assert last.choices[0].finish_reason in ("length", "stop") and usage.choices == []
    assert usage.usage.completion_tokens == N
    stats = last.sinklora["cache"]
    assert stats["policy"] == policy["cache"] and stats["seen_tokens"] == usage.usage.total_tokens - 1
    if policy["budget"] == 1000:  # a budget above the sequence keeps everything: the full cache's reply
        assert text == reference(_messages("hi there"), N)
    elif policy["cache"] == "sink":
        assert stats["kept_tokens"] == 40 and stats["positions"] == "rank"
    else:  # a ratio is a share of the whole prompt, though the prompt reaches the cache in chunks
        assert stats["budget"] == round(0.9 * usage.usage.prompt_tokens)


def test_raw_stream_is_server_sent_events_without_empty_pieces(server):
    status, headers, body = request(server[0], "POST", "/v1/chat/completions",
                                    {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    evs = events(body)
    assert evs[-1] == "[DONE]" and all(e["object"] == "chat.completion.chunk" for e in evs[:-1])
    pieces = [e["choices"][0]["delta"]["content"] for e in evs[:-2]]
    assert all(pieces) and "".join(pieces) == reference(_messages("hi"), 5)
    assert evs[-2]["choices"][0]["finish_reason"] and evs[-2]["usage"] is None  # no include_usage: no usage chunk


def test_completions_route_and_stop_strings(client, server):
    res = client.completions.create(model="tiny", prompt="abc", max_tokens=6)
    assert res.object == "text_completion" and res.usage.prompt_tokens == 3 and res.choices[0].text == "cccccc"
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "cccccc" and chunks[-1].choices[0].finish_reason == "length"
    whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "q"}], max_tokens=N)
    text = whole.choices[0].message.content
    stop = text[2:4]
    cut = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "q"}], stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_models_and_health(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].context_length == 1024
    assert health(server[0])["status"] == "ok" and health(server[0])["running"] is None


BAD_BODIES = [
    (b"{not json", "json"),
    (json.dumps({"messages": []}), "messages"),
    (json.dumps({"messages": [{"role": "user", "content": None}]}), "messages.0.content"),
    (json.dumps({"messages": [{"role": "tool", "content": "x"}]}), "messages.0.role"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 2}), "n"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "buget": 5}), "buget"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": -1}), "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "cache": "sink", "budget": 2}), "cache"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "cache": "lru"}), "cache"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}), "max_tokens"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES)
def test_bad_requests_get_openai_error_objects_naming_the_field(server, body, param):
    status, _, raw = request(server[0], "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    error = json.loads(raw)["error"]
    assert status == 400 and error["type"] == "invalid_request_error" and param in (error["param"] or error["message"].lower())


def test_oversize_prompt_is_refused_naming_both_numbers(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 1000}], max_tokens=100)
    message = e.value.body["message"]
    assert e.value.body["code"] == "context_length_exceeded" and "max_tokens=100" in message and "1024" in message
    status, _, _ = request(server[0], "POST", "/v1/completions", {"prompt": "y" * 5000})
    assert status == 400
    t0 = time.monotonic()  # the 1 MB message: refused after tokenising, the model never runs
    status, _, raw = request(server[0], "POST", "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "z" * 2**20}]})
    assert status == 400 and "1024" in json.loads(raw)["error"]["message"] and time.monotonic() - t0 < 30
    assert health(server[0])["running"] is None


def test_body_limits_and_content_types():
    with tiny_server(max_body_bytes=2048) as (url, _):
        status, _, raw = request(url, "POST", "/v1/chat/completions", b"{}",
                                 {"Content-Type": "application/json", "Content-Length": str(10**12)}, timeout=10)
        assert status == 413 and json.loads(raw)["error"]["code"] == "request_too_large"
        chunked = iter([b"x" * 1500, b"x" * 1500])  # an iterator body goes out chunked, with no length given
        status, _, _ = request(url, "POST", "/v1/chat/completions", chunked, {"Content-Type": "application/json"})
        assert status == 413
        status, _, _ = request(url, "POST", "/v1/chat/completions", b"{}",
                               {"Content-Type": "application/json", "Content-Length": "-1"}, timeout=10)
        assert status == 400
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        status, _, raw = request(url, "POST", "/v1/chat/completions", body, {"Content-Type": "text/plain"})
        assert status == 415 and "application/json" in json.loads(raw)["error"]["message"]
        assert health(url)["finished"] == {}  # none of them reached the model


def test_routes_the_page_and_path_traversal(server):
    url = server[0]
    status, headers, page = request(url, "GET", "/")
    assert status == 200 and b"sinklora chat" in page and "default-src 'self'" in headers["content-security-policy"]
    assert request(url, "GET", "/static/chat.js")[0] == 200 and request(url, "GET", "/static/markdown.js")[0] == 200
    for path in ("/../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd", "/static/../server.py", "/static/..%2fserver.py",
                 "/v1/nothing"):
        status, _, raw = request(url, "GET", path)
        assert status == 404 and b"root:" not in raw
    assert request(url, "GET", "/v1/chat/completions")[0] == 405


def test_serve_command_listens_answers_and_stops_after_max_requests(tmp_path):
    from conftest import tiny_llama, tiny_tokenizer

    tiny_llama(seed=3, max_position_embeddings=256).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    cmd = [sys.executable, "-m", "sinklora.cli", "serve", f"model={tmp_path}", "port=0", "max_requests=2",
           "device=cpu", "max_new_tokens=3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines, match, deadline = [], None, time.monotonic() + 120
        while match is None and len(lines) < 100 and time.monotonic() < deadline:  # log lines come first
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            lines.append(proc.stdout.readline() if ready else "")
            match = re.search(r"sinklora serve: (http://127\.0\.0\.1:\d+)/", lines[-1])
        assert match, f"no URL printed: {lines!r}"
        url = match.group(1)
        assert json.loads(request(url, "GET", "/health")[2])["status"] == "ok"
        status, _, raw = request(url, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 3
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.stdout.close()


def test_readme_client_example_runs_as_written(server):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = re.findall(r"```py\n(.*?)```", readme, flags=re.S)
    assert "http://127.0.0.1:8000/v1" in block
    scope = {"document": "The secret word is plum. " * 30}
    exec(compile(block.replace("http://127.0.0.1:8000", server[0]), "README.md", "exec"), scope)
    stats = scope["reply"].sinklora["cache"]
    assert stats["policy"] == "h2o" and 512 <= stats["kept_tokens"] <= 512 + stats["slack"] < stats["seen_tokens"]
