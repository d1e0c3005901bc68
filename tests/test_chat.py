"""`sinklora chat` (non-interactive, stdin, multi-turn with a persistent cache) and the generation core it
shares with `sinklora serve` (chunked prefill, sampling, stop strings, incremental text), with a tiny
random model saved to tmp_path; replies are checked against transformers' own greedy `generate`."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

from sinklora.commands import chat
from sinklora.serve.engine import Generation, Sampling, TextStream
from sinklora.serve.session import ChatSession
from sinklora.settings import CacheOptions

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
    cfg = _opts(model_dir, prefill_chunk=5)  # turns arrive in several chunks
    session = ChatSession.load(cfg)
    first = "".join(session.stream("one"))
    cache = session.cache
    assert cache.get_seq_length() == len(session.cached_ids)  # every token but the last generated one
    second = "".join(session.stream("two"))
    assert session.cache is cache, "the second turn should continue the first turn's cache"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"},
                {"role": "assistant", "content": first}, {"role": "user", "content": "two"}]
    assert second == _reference(model_dir, messages)
    assert session.cache.get_seq_length() == len(session.cached_ids)  # one cache across both turns
    stats = session.stats()
    assert stats["turns"] == 2 and stats["last_reply"]["completion_tokens"] == N_NEW
    assert "tokens seen" in chat.format_stats(stats)
    session.reset()
    assert session.cache is None and session.stats()["turns"] == 0


def test_an_interrupted_turn_keeps_what_was_said_and_drops_the_cache(model_dir):
    session = ChatSession.load(_opts(model_dir))
    pieces = session.stream("one")
    said = next(pieces)
    pieces.close()  # the consumer stops (Ctrl-C in the terminal)
    assert session.messages[-1] == {"role": "assistant", "content": said} and session.cache is None
    "".join(session.stream("two"))  # the next turn re-reads the conversation into a fresh cache
    assert session.cache.get_seq_length() == len(session.cached_ids) and session.stats()["turns"] == 2


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
    assert any("context=" in e for e in chat.ChatConfig(context="/no/such/file").validate())
    assert any("positions='rank'" in e for e in chat.ChatConfig(positions="rank").validate())
    assert any("prefill_chunk=0" in e for e in chat.ChatConfig(prefill_chunk=0).validate())


# ---- the generation core ---------------------------------------------------------------------------------


def _generate(model, ids, cache="full", chunk=512, **sampling):
    gen = Generation(model, tiny_tokenizer(), ids, CacheOptions(cache=cache, budget=sampling.pop("budget", None))
                     .make(model), Sampling(**{"max_tokens": N_NEW, **sampling}), prefill_chunk=chunk)
    text = "".join(gen)
    assert text == gen.text
    return gen


@pytest.mark.parametrize("cache,budget", [("full", None), ("h2o", "1000"), ("snapkv", "1000")])
def test_chunked_prefill_decodes_as_generate(cache, budget):
    model = tiny_llama(seed=3, max_position_embeddings=512)
    ids = [int(i) for i in torch.randint(0, 256, (45,), generator=torch.Generator().manual_seed(0))]
    want = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, 45, dtype=torch.long),
                          max_new_tokens=N_NEW, do_sample=False, pad_token_id=256)[0, 45:].tolist()
    for chunk in (512, 7, 1):
        gen = _generate(model, ids, cache, chunk, budget=budget)
        assert gen.token_ids == want[: len(gen.token_ids)] and gen.finish_reason in ("length", "stop"), chunk
        assert gen.cached == 45 + len(gen.token_ids) - 1 and gen.cache_stats["seen_tokens"] == gen.cached
        assert gen.text == tiny_tokenizer().decode(gen.token_ids, skip_special_tokens=True)


def test_cancellation_is_checked_between_prefill_chunks():
    model = tiny_llama(seed=3, max_position_embeddings=512)
    calls = []
    gen = Generation(model, tiny_tokenizer(), list(range(100)), CacheOptions().make(model), Sampling(max_tokens=4),
                     prefill_chunk=10, should_stop=lambda: calls.append(1) or len(calls) > 3)
    assert list(gen) == [] and gen.finish_reason == "cancelled"
    assert gen.cached == 30 and gen.token_ids == [] and gen.cache_stats["seen_tokens"] == 30


def test_text_stream_never_splits_a_character_and_holds_back_stop_strings():
    tok = tiny_tokenizer()
    text = "héllo wörld ✓ 日本, then STOP here"
    ids = tok(text)["input_ids"]
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    cases = [(["STOP"], "héllo wörld ✓ 日本, then "), (["本, t"], "héllo wörld ✓ 日"), (["STOPPED"], text)]
    for stop, want in cases:
        stream = TextStream(tok, stop)
        out = "".join(stream.push(i) for i in ids) + stream.flush()
        assert out == want and stream.stopped == (want != text), stop


def test_sampling_keeps_the_nucleus_and_is_reproducible_with_a_seed():
    from sinklora.serve.engine import next_token

    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    draws = {p: {next_token(logits, Sampling(1, temperature=1.0, top_p=p), torch.Generator().manual_seed(s))
                 for s in range(200)} for p in (0.5, 0.7, 1.0)}
    assert draws == {0.5: {0}, 0.7: {0, 1}, 1.0: {0, 1, 2}}
    model = tiny_llama(seed=3, max_position_embeddings=512)
    a, b = (_generate(model, list(range(20)), temperature=1.0, seed=7).token_ids for _ in range(2))
    assert a == b
    assert _generate(model, list(range(20)), temperature=1.0, top_p=1e-6).token_ids == \
        _generate(model, list(range(20))).token_ids  # a vanishing nucleus is greedy


@pytest.mark.parametrize("cache", ["snapkv", "h2o", "sink"])
def test_chunked_prefill_under_an_evicting_budget_keeps_what_one_step_keeps(cache):
    """A 120-token prompt, a 40-token budget: prefill in chunks of 7 (eviction deferred to the last chunk,
    which holds at least snapkv's window) decodes the same tokens and keeps the same cache as one step."""
    model = tiny_llama(seed=3, max_position_embeddings=512)
    ids = [int(i) for i in torch.randint(0, 256, (120,), generator=torch.Generator().manual_seed(2))]
    whole, chunked = _generate(model, ids, cache, 512, budget="40"), _generate(model, ids, cache, 7, budget="40")
    assert whole.cache_stats["evicted_tokens"] > 0
    assert chunked.token_ids == whole.token_ids
    peaks = ("max_kept_tokens", "max_kv_bytes")  # after a step: a deferred chunk holds the prompt so far
    assert {k: v for k, v in chunked.cache_stats.items() if k not in peaks} == \
        {k: v for k, v in whole.cache_stats.items() if k not in peaks}
