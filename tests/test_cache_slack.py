"""Amortised eviction (slack), scoring without recomputation, per-layer and per-head budgets, the op
counter, and the cache settings (CPU, tiny random models). The shared invariants of every policy, with
and without slack, are in tests/test_cache.py."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from sinklora.cache.policies import SlotState, Split, make_policy
from sinklora.cache.scores import accumulated_attention, dense_accumulated_attention, prompt_attention_with_scores
from sinklora.counters import OpCounter
from sinklora.hf.attention import attach_cache
from sinklora.hf.cache import PolicyCache, make_cache
from sinklora.hf.slack import SlackLayer

SCORED = ("h2o", "snapkv", "pyramidkv", "adakv")


def _sharp(layers: int = 2):
    """Attention 8x sharper than a random tiny model's, so heads and rows rank tokens differently."""
    m = tiny_llama(seed=0, num_hidden_layers=layers)
    with torch.no_grad():
        for block in m.model.layers:
            block.self_attn.q_proj.weight *= 8
            block.self_attn.k_proj.weight *= 8
    return m


def _forward(model, ids, cache):
    with torch.inference_mode(), attach_cache(model, cache) as cache_kw:
        return model(ids, **cache_kw)


def test_op_counter_counts_what_runs():
    x = torch.ones(3)
    with OpCounter() as ops:
        y = (x + 1) * 2
        y[:2].sum()
    names = ops.by_name()
    assert names["aten.add.Tensor"] == names["aten.mul.Tensor"] == names["aten.slice.Tensor"] == 1
    assert ops.ops == 4 and ops.kernels == 3  # the slice is a view


@pytest.mark.parametrize("name", ["sink", "local", "h2o", "snapkv", "pyramidkv", "adakv"])
def test_between_evictions_a_decode_step_does_the_full_caches_work_plus_its_query(name):
    """The full cache concatenates each layer's new key and value; a slack cache writes them in place
    and (policies with scores) keeps the query: no sort, gather, scatter, top-k or concatenation, and at
    most one more operation per layer than the full cache, counted op by op."""
    model = tiny_llama(seed=0)
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(1))
    counts = {}
    for policy, budget in (("full", None), (name, 40)):
        cache = make_cache(model, policy, budget=budget, slack=8)
        out = _forward(model, ids, cache)  # the prompt evicts down to the budget (100 > 40 + 8)
        with OpCounter() as ops:
            _forward(model, out.logits[:, -1:].argmax(-1), cache)
        counts[policy] = ops.by_name()
        assert cache.stats()["kept_tokens"] == (101 if budget is None else cache.layers[0].width + 1)
    more = counts[name] - counts["full"]  # ops the policy's step runs more often than the full cache's
    layers = model.config.num_hidden_layers
    assert set(more) == {"aten.index_copy_.default"}, more
    assert more["aten.index_copy_.default"] == layers * (3 if name in SCORED else 2)
    assert counts["full"]["aten.cat.default"] - counts[name]["aten.cat.default"] == 2 * layers
    assert counts[name].total() <= counts["full"].total() + layers


def test_kept_queries_score_like_per_step_accumulation():
    """Scores of the decoding queries kept since the last eviction (scored in one pass when needed)
    equal the per-step accumulation of the slack=0 cache: a short prompt, so the query buffer (slack + 1
    queries) fills and is scored twice before anything is evicted; same tokens fed to both."""
    model = _sharp()
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    per_step, slack = make_cache(model, "h2o", budget=40, slack=0), make_cache(model, "h2o", budget=40, slack=2)
    with torch.inference_mode():
        for _ in range(16):
            out = _forward(model, ids, per_step)
            _forward(model, ids, slack)
            ids = out.logits[:, -1:].argmax(-1)
    for a, b in zip(per_step.layers, slack.layers):
        assert isinstance(b, SlackLayer) and b.pending == 3 and b.evicted == 0 and b.kept == 25
        torch.testing.assert_close(b.attention, a.attention, atol=1e-5, rtol=1e-5)  # reading it scores the 3
        assert b.pending == 0
        assert torch.equal(b.positions, a.positions)


@pytest.mark.parametrize("name", ["sink", "h2o", "snapkv", "adakv"])
def test_eviction_keeps_what_the_policy_ranks_highest_at_that_step(name):
    """A slack cache evicts at the step where it would keep more than budget + slack tokens, and keeps
    exactly what the policy picks from a never-evicting cache's state (its scores included) at that step
    (adakv: per head, dead slots last)."""
    model = _sharp()
    budget, slack, prompt = 20, 6, 24  # no eviction at the prompt (24 <= 26); at the third decoding step (27)
    ids = torch.randint(0, 256, (2, prompt), generator=torch.Generator().manual_seed(4))
    cache = make_cache(model, name, budget=budget, slack=slack)
    never = make_cache(model, "snapkv" if name == "adakv" else name, budget=10**6, slack=0)  # adakv scores as snapkv
    with torch.inference_mode():
        for step in range(4):  # the prompt, then 3 tokens
            out = _forward(model, ids, cache)
            _forward(model, ids, never)
            ids = out.logits[:, -1:].argmax(-1)
            assert (cache.stats()["evicted_tokens"] > 0) == (step == 3)
    policy = make_policy(name, budget)
    for i, (layer, ref) in enumerate(zip(cache.layers, never.layers)):
        split = policy.split(prompt, i, len(cache.layers))
        state = SlotState(ref.keys, ref.values, ref.positions, ref.seen, ref.attention)
        keep = policy.keep_indices(state, split)
        assert layer.kept == keep.shape[-1] and layer.seen == ref.seen == prompt + 3
        expected = ref.positions.gather(-1, keep.clamp(min=0)).masked_fill(keep < 0, -1)
        assert torch.equal(layer.positions.sort(dim=-1).values, expected.sort(dim=-1).values)


def test_adakv_shares_heavy_hitters_between_heads():
    """Head 0's attention is concentrated on one token, head 1's spread over many: of the 2 * 4 heavy
    hitters, head 1 gets more than 4, head 0 keeps at least its safeguard share (1), and the layer
    keeps 2 * total slots in all, each head's in slot order, padded with -1."""
    policy = make_policy("adakv", 7, sink_tokens=1)  # 1 sink + 3 heavy hitters + 3 recent
    policy.pool = 1  # scores as given (pooling is tested with snapkv)
    split = policy.split(20)
    assert split == Split(1, 3, 3) and policy.safeguard * split.heavy >= 0.6
    n = 20
    scores = torch.zeros(1, 2, n)
    scores[0, 0, 5] = 9.0
    scores[0, 0, 6:14] = torch.linspace(0.01, 0.02, 8)
    scores[0, 1, 2:14] = torch.linspace(0.5, 1.0, 12)
    pos = torch.arange(n).expand(1, 2, n)
    keep = policy.keep_indices(SlotState(torch.zeros(1, 2, n, 4), torch.zeros(1, 2, n, 4), pos, n, scores), split)
    counts = (keep >= 0).sum(dim=-1)[0]
    assert counts.sum() == 2 * split.total and counts[1] > counts[0] >= split.sink_tokens + split.recent + 1
    for h in range(2):
        kept = keep[0, h][keep[0, h] >= 0]
        assert (kept[1:] > kept[:-1]).all() and (keep[0, h][len(kept):] == -1).all()
    assert 5 in keep[0, 0] and {0, 17, 18, 19} <= set(keep[0, 0].tolist()) & set(keep[0, 1].tolist())
    assert set(keep[0, 1].tolist()) >= {10, 11, 12, 13}  # head 1's highest scores


def test_dead_slots_are_masked_out_of_attention():
    """After a ragged eviction, a decoding step attends, per KV head, to exactly its live slots (a
    per-head dense reference over those slots), and the step's query is kept for scoring."""
    layer = PolicyCache(make_policy("adakv", 6, sink_tokens=1), 1, slack=1).layers[0]
    g = torch.Generator().manual_seed(5)
    k, v, q = torch.randn(1, 2, 12, 4, generator=g), torch.randn(1, 2, 12, 4, generator=g), torch.randn(1, 4, 12, 4, generator=g)
    layer.update(k, v)
    probs = torch.zeros(1, 2, 12)
    probs[0, 0, 4] = 5.0  # head 0: one token matters; head 1: many
    probs[0, 1, 1:9] = torch.arange(1.0, 9.0)
    layer.finish(q, k, 0.5, probs)
    alive = layer.positions >= 0
    assert layer.evicted > 0 and not alive.all() and (alive.sum(dim=-1) != alive.sum(dim=-1)[0, 0]).any()
    k1, v1, q1 = torch.randn(1, 2, 1, 4, generator=g), torch.randn(1, 2, 1, 4, generator=g), torch.randn(1, 4, 1, 4, generator=g)
    keys, values = layer.update(k1, v1)
    out = layer.attend(None, q1, keys, values, None, 0.5)  # (1, 1, Hq, D)
    live = torch.cat([alive, torch.ones(1, 2, 1, dtype=torch.bool)], dim=-1)[0]
    for head in range(4):
        kv = head // 2  # repeat_kv's layout: query head j * G + g reads KV head j
        kk, vv = keys[0, kv][live[kv]], values[0, kv][live[kv]]
        ref = ((q1[0, head] @ kk.T) * 0.5).softmax(dim=-1) @ vv
        torch.testing.assert_close(out[0, 0, head], ref[0], atol=1e-6, rtol=1e-6)
    assert layer.pending == 1 and torch.equal(layer.queries[:, :, :1], q1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_attention_with_scores_matches_sdpa_and_dense(dtype):
    """One flash pass gives the prompt's output (bit-identical to SDPA's) and its log-sum-exp; a second
    pass with keys and queries swapped gives every key's column sum, against the float64 oracle."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, h, 53, 16, generator=g).to(dtype) for h in (6, 2, 2))
    out, scores = prompt_attention_with_scores(q, k, v, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    assert torch.equal(out, ref.transpose(1, 2))
    dense = dense_accumulated_attention(q.float(), k.float(), scaling=0.25, past=0)
    torch.testing.assert_close(scores, dense, atol=1e-4, rtol=1e-4)


def test_accumulated_attention_skips_masked_keys():
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 6, 5, 16, generator=g), torch.randn(2, 2, 30, 16, generator=g)
    mask = torch.rand(2, 2, 30, generator=g) > 0.3
    got = accumulated_attention(q, k, scaling=0.25, past=25, key_mask=mask, chunk=2)
    big = torch.where(mask[:, :, None, :].expand(-1, -1, 1, -1), 0.0, -1e9)  # dense oracle, masked keys at -inf
    logits = (q.double().view(2, 2, 3, 5, 16) @ k.double()[:, :, None].transpose(-1, -2)) * 0.25 + big[:, :, None]
    visible = torch.arange(30) <= torch.arange(25, 30)[:, None]
    probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    torch.testing.assert_close(got, probs.sum(dim=(2, 3)).float(), atol=1e-5, rtol=1e-5)
    assert (got[~mask] == 0).all()


def test_pyramidkv_spreads_heavy_hitters_over_layers():
    policy = make_policy("pyramidkv", 400, sink_tokens=4)
    base = make_policy("snapkv", 400, sink_tokens=4).split(1000)
    splits = [policy.split(1000, i, 30) for i in range(30)]
    heavy = [s.heavy for s in splits]
    assert heavy[0] == round(2 * base.heavy - base.heavy / 20) and heavy[-1] == round(base.heavy / 20)
    assert all(a >= b for a, b in zip(heavy, heavy[1:])) and abs(sum(heavy) - 30 * base.heavy) <= 15
    assert {(s.sink_tokens, s.recent) for s in splits} == {(base.sink_tokens, base.recent)}
    assert policy.split(1000, 0, 1) == base  # one layer: nothing to spread


def test_slack_settings_are_checked_and_cache_auto_picks_the_policy():
    from sinklora.commands.chat import ChatConfig
    from sinklora.config import describe
    from sinklora.defaults import CACHE_AUTO_POLICY, CACHE_SLACK
    from sinklora.settings import CacheOptions

    assert CacheOptions().policy().name == "full"
    assert CacheOptions(budget="0.2").policy().name == CACHE_AUTO_POLICY
    assert CacheOptions(cache="sink", budget="64").policy().name == "sink"
    model = tiny_llama(seed=0)
    assert CacheOptions(budget="64").make(model).slack == CACHE_SLACK
    assert not isinstance(CacheOptions(budget="64", slack=0).make(model).layers[0], SlackLayer)
    for kw, fix in (({"slack": -1}, "integer >= 0"), ({"cache": "adakv", "slack": 0}, "slack >= 1"),
                    ({"cache": "sink", "positions": "rank", "slack": 8}, "slack=0"),
                    ({"cache": "sink", "budget": "4", "sink_tokens": 4}, "no room for recent tokens")):
        errors = ChatConfig(**{"budget": "64", **kw}).validate()
        assert len(errors) == 1 and fix in errors[0], errors
    rows = {key: (default, text) for key, default, text in describe(ChatConfig)}
    assert rows["cache"][0] == "'auto'" and f"auto = full without a budget, {CACHE_AUTO_POLICY} with one" in rows["cache"][1]
    assert f"default {CACHE_SLACK}" in rows["slack"][1] and rows["budget_floor"][0] == "256"


@pytest.mark.parametrize("slack", [0, 8])
@pytest.mark.parametrize("name", ["h2o", "snapkv", "adakv", "sink"])
def test_a_prompt_fed_in_chunks_under_deferred_eviction_keeps_what_one_step_keeps(name, slack):
    """Chunks of 16 tokens, eviction deferred until the last (at least snapkv's 32-query window): the same
    kept tokens, scores (to float error) and next-token logits as the whole prompt in one step. Without
    the deferral, snapkv scores each chunk by its own end and keeps other tokens."""
    from sinklora.hf.cache import deferred_eviction
    from sinklora.serve.engine import prefill_chunks

    if name == "adakv" and not slack:
        pytest.skip("a ragged policy needs slack")
    model = _sharp()
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(8))
    whole = make_cache(model, name, budget=30, slack=slack)
    want = _forward(model, ids, whole).logits[:, -1]
    chunked = make_cache(model, name, budget=30, slack=slack)
    with pytest.raises(ValueError, match="ratio"):
        with deferred_eviction(make_cache(model, name, budget=0.5, slack=slack)):
            pass
    pieces = prefill_chunks(0, 90, 16, 32)
    assert pieces[-1] == (48, 90) and pieces[0] == (0, 16)
    for start, stop in pieces:
        if stop < 90:
            with deferred_eviction(chunked):
                _forward(model, ids[:, start:stop], chunked)
            assert chunked.stats()["evicted_tokens"] == 0 and chunked.layers[0].kept == stop
        else:
            got = _forward(model, ids[:, start:stop], chunked).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(whole.layers, chunked.layers):
        assert torch.equal(a.positions.sort(dim=-1).values, b.positions.sort(dim=-1).values)
        if a.attention is not None:
            order_a, order_b = a.positions.argsort(dim=-1), b.positions.argsort(dim=-1)
            torch.testing.assert_close(a.attention.gather(-1, order_a), b.attention.gather(-1, order_b),
                                       atol=1e-4, rtol=1e-4)
    if name == "snapkv":  # the deferral matters: chunk by chunk, each chunk's end picks the heavy hitters
        eager = make_cache(model, name, budget=30, slack=slack)
        for start, stop in pieces:
            _forward(model, ids[:, start:stop], eager)
        assert any(not torch.equal(a.positions.sort(dim=-1).values, c.positions.sort(dim=-1).values)
                   for a, c in zip(whole.layers, eager.layers))
