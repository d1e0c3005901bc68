"""Who `sinklora serve` answers: Host allow-list (DNS rebinding), Origin (other sites' pages), the API key,
and the config rules for binding beyond loopback."""

from __future__ import annotations

import json
import socket

import openai
import pytest
from serving import health, request, tiny_server

from sinklora.commands.serve import ServeConfig
from sinklora.serve.server import bind

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def server():
    with tiny_server(allowed_origins=["http://localhost:3000"], allowed_hosts=["chat.example"]) as (url, service):
        yield url, service


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""])
def test_foreign_host_header_is_refused(server, host):
    status, _, raw = request(server[0], "GET", "/v1/models", headers={"Host": host})
    assert status == 403 and json.loads(raw)["error"]["code"] == "host_not_allowed"
    status, _, page = request(server[0], "GET", "/", headers={"Host": host})
    assert status == 403 and b"sinklora chat" not in page


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1", "[::1]:1234", "chat.example:80"])
def test_loopback_and_allowed_hosts_are_served(server, host):
    assert request(server[0], "GET", "/v1/models", headers={"Host": host})[0] == 200


def test_cross_origin_posts_are_refused_before_reaching_the_model(server):
    url, _ = server
    before = health(url)["finished"]
    for origin in ("http://evil.example", "null", "http://localhost:3001"):
        # what a page elsewhere can send without a preflight: no-cors, text/plain
        status, _, raw = request(url, "POST", "/v1/chat/completions", json.dumps(CHAT),
                                 {"Origin": origin, "Content-Type": "text/plain"})
        assert status == 403 and json.loads(raw)["error"]["code"] == "origin_not_allowed"
        status, _, _ = request(url, "POST", "/v1/chat/completions", CHAT, {"Origin": origin})
        assert status == 403
    assert health(url)["finished"] == before


def test_same_origin_and_allowed_origins_are_served_with_cors_for_the_latter(server):
    url, _ = server
    own = url.replace("http://", "")
    status, headers, _ = request(url, "POST", "/v1/chat/completions", CHAT, {"Origin": url, "Host": own})
    assert status == 200 and "access-control-allow-origin" not in headers
    status, headers, _ = request(url, "POST", "/v1/chat/completions", CHAT, {"Origin": "http://localhost:3000"})
    assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
    status, headers, _ = request(url, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 200 and "POST" in headers["access-control-allow-methods"]


def test_api_key_is_required_on_v1_routes(monkeypatch):
    monkeypatch.delenv("SINKLORA_API_KEY", raising=False)
    with tiny_server(api_key="s3cret") as (url, _):
        for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, headers, raw = request(url, "POST", "/v1/chat/completions", CHAT, auth)
            assert status == 401 and headers["www-authenticate"] == "Bearer"
            assert json.loads(raw)["error"]["code"] == "invalid_api_key"
            assert request(url, "GET", "/v1/models", headers=auth)[0] == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert good.chat.completions.create(model="tiny", **CHAT).usage.completion_tokens == 2
        assert request(url, "GET", "/")[0] == 200 and request(url, "GET", "/health")[0] == 200  # the page asks for it


def test_binding_beyond_loopback_needs_allow_remote_an_api_key_and_host_names(monkeypatch):
    monkeypatch.delenv("SINKLORA_API_KEY", raising=False)
    errors = ServeConfig(host="0.0.0.0").validate()
    assert any("allow_remote" in e for e in errors) and any("api_key" in e for e in errors)
    assert any("allowed_hosts" in e for e in errors)
    assert not ServeConfig(host="0.0.0.0", allow_remote=True, api_key="k", allowed_hosts=["box.lan"]).validate()
    monkeypatch.setenv("SINKLORA_API_KEY", "from-env")
    assert not ServeConfig(host="192.0.2.7", allow_remote=True).validate()
    for loopback in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert not ServeConfig(host=loopback).validate(), loopback
    assert any("context=" in e for e in ServeConfig(context="doc.txt").validate())
    assert any("allowed_origins" in e for e in ServeConfig(allowed_origins=["*"]).validate())


def test_bind_checks_the_address_before_the_model_loads():
    with pytest.raises(ValueError, match="host='no such host!'"):
        bind("no such host!", 0)
    taken = bind("127.0.0.1", 0)
    try:
        with pytest.raises(ValueError, match="cannot listen"):
            bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
    if socket.has_ipv6:
        try:
            six = bind("::1", 0)
        except ValueError:
            pytest.skip("no IPv6 loopback on this machine")
        assert six.family == socket.AF_INET6
        six.close()
