"""`sinklora chat` (non-interactive, stdin, multi-turn with a persistent cache) and `sinklora serve`
(a request to 127.0.0.1 on an ephemeral port), with a tiny random model saved to tmp_path."""

from __future__ import annotations

import http.client
import io
import json
import threading

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from sinklora.commands import chat
from sinklora.commands.serve import ServeConfig
from sinklora.serve import server
from sinklora.serve.session import ChatSession

N_NEW = 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_chat_model")
    tiny_llama(seed=3, max_position_embeddings=512).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def _opts(model_dir, cls=chat.ChatConfig, **kw):
    base = dict(model=model_dir, system_prompt="Be brief.", max_new_tokens=N_NEW, dtype="float32", device="cpu")
    return cls(**{**base, **kw})


def _reference(model_dir, messages):
    """Independent greedy reply: chat template -> generate with the default cache -> decode."""
    model, tok = tiny_llama(seed=3, max_position_embeddings=512), tiny_tokenizer()
    ids = torch.tensor([tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                         pad_token_id=256)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_non_interactive_prompt_prints_the_greedy_reply(model_dir, capsys):
    assert chat.main(_opts(model_dir, prompt="hello there")) == 0
    want = _reference(model_dir, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}])
    assert capsys.readouterr().out == want + "\n"


def test_prompt_from_stdin_with_a_compressed_cache(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("what is up?\n"))
    assert chat.main(_opts(model_dir, cache="h2o", budget="1000")) == 0  # budget > sequence: same reply as full
    want = _reference(model_dir, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is up?"}])
    assert capsys.readouterr().out == want + "\n"


def test_multi_turn_reuses_the_cache_and_matches_a_fresh_run(model_dir):
    cfg = _opts(model_dir)
    session = ChatSession.load(cfg)
    first = "".join(session.stream("one"))
    assert session.cache.get_seq_length() == len(session.ids) - 1  # every token but the last generated one
    cache = session.cache
    second = "".join(session.stream("two"))
    assert session.cache is cache, "the second turn should continue the first turn's cache"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"},
                {"role": "assistant", "content": first}, {"role": "user", "content": "two"}]
    assert second == _reference(model_dir, messages)
    assert session.cache.get_seq_length() == len(session.ids) - 1  # one cache across both turns
    stats = session.stats()
    assert stats["turns"] == 2 and stats["last_reply"]["new_tokens"] == N_NEW
    assert "tokens seen" in chat.format_stats(stats)
    session.reset()
    assert session.cache.get_seq_length() == 0 and session.stats()["turns"] == 0


@pytest.mark.parametrize("positions", ["absolute", "rank"])
def test_context_file_and_a_small_budget(model_dir, tmp_path, positions):
    doc = tmp_path / "doc.txt"
    doc.write_text("The secret word is plum. " * 8)
    session = ChatSession.load(_opts(model_dir, context=str(doc), cache="sink", budget="40", sink_tokens=4,
                                      positions=positions, slack=0))  # evict every step: 40 kept exactly
    "".join(session.stream("What is the secret word?"))
    assert "The secret word is plum." in session.messages[1]["content"]
    assert session.messages[1]["content"].endswith("What is the secret word?")
    stats = session.stats()["cache"]
    assert stats["seen_tokens"] > 200 and stats["kept_tokens"] == stats["max_kept_tokens"] == 40
    "".join(session.stream("And again?"))  # a second turn appended to an evicted cache
    assert session.stats()["cache"]["kept_tokens"] == 40 and session.stats()["cache"]["positions"] == positions


def test_config_errors_name_the_field_and_fix(model_dir):
    errors = chat.ChatConfig(model=model_dir, cache="sink", budget="2", sink_tokens=4).validate()
    assert any("budget=2" in e and "sink_tokens=4" in e for e in errors)
    assert any("host=" in e and "allow_remote" in e for e in ServeConfig(host="0.0.0.0").validate())
    assert not ServeConfig(host="0.0.0.0", allow_remote=True).validate()
    assert any("context=" in e for e in chat.ChatConfig(context="/no/such/file").validate())
    assert any("positions='rank'" in e for e in chat.ChatConfig(positions="rank").validate())


def _sse(body: bytes) -> list[dict]:
    return [json.loads(ev[len("data: "):]) for ev in body.decode().split("\n\n") if ev.startswith("data: ")]


def test_server_streams_a_reply_on_loopback(model_dir):
    session = ChatSession.load(_opts(model_dir, ServeConfig, cache="h2o", budget="1000"))
    srv = server.make_server(session, "127.0.0.1", 0, title="tiny")
    port = srv.server_address[1]
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/")
        page = conn.getresponse()
        assert page.status == 200 and b"sinklora chat" in page.read()
        conn.request("POST", "/api/chat", body=json.dumps({"message": "hi"}), headers={"Content-Type": "application/json"})
        res = conn.getresponse()
        assert res.status == 200 and res.getheader("Content-Type") == "text/event-stream"
        events = _sse(res.read())
        assert events[-1]["done"] and events[-1]["stats"]["cache"]["policy"] == "h2o"
        text = "".join(e.get("token", "") for e in events)
        assert text == _reference(model_dir, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
        conn.request("POST", "/api/chat", body=b"{}", headers={"Content-Type": "application/json"})
        bad = conn.getresponse()
        assert bad.status == 400 and b"message" in bad.read()
        conn.request("POST", "/api/reset", body=b"")
        assert json.loads(conn.getresponse().read()) == {"ok": True}
        conn.request("GET", "/api/stats")
        assert json.loads(conn.getresponse().read())["turns"] == 0
        conn.close()
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()
