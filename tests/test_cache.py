"""KV-cache policies on tiny random Llama models (CPU): exactness at full budget, budget and sink
invariants after every step (evicting every step, and with slack), H2O heavy hitters against a dense
eager recompute, invalid budgets. Amortised eviction on its own: tests/test_cache_slack.py."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from sinklora.cache.policies import SlotState, Split, make_policy, parse_budget
from sinklora.cache.scores import accumulated_attention, dense_accumulated_attention
from sinklora.hf.attention import attach_cache
from sinklora.hf.cache import PolicyCache, cache_kwargs, make_cache

EVICTING = [("local", {}), ("sink", {}), ("h2o", {}), ("h2o", {"sink_tokens": 2}), ("h2o", {"heavy_ratio": 0.25}),
            ("snapkv", {}), ("pyramidkv", {}), ("adakv", {"sink_tokens": 1})]
RAGGED = {"adakv"}  # heads keep different numbers of slots: needs slack >= 1


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def sharp():
    return _sharp()


def _sharp(attn_implementation: str = "sdpa"):
    """A tiny model with 8x sharper attention, so heavy hitters differ by head and row (a random tiny
    model attends almost uniformly, and then the earliest tokens always win)."""
    m = tiny_llama(seed=0)
    with torch.no_grad():
        for block in m.model.layers:
            block.self_attn.q_proj.weight *= 8
            block.self_attn.k_proj.weight *= 8
    m.set_attn_implementation(attn_implementation)
    return m


def _greedy(model, ids, cache=None, n=12):
    with torch.inference_mode(), attach_cache(model, cache) as cache_kw:
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=256, **cache_kw)


def _forward(model, ids, cache):
    with torch.inference_mode(), attach_cache(model, cache) as cache_kw:
        return model(ids, **cache_kw)


@pytest.mark.parametrize("slack", [0, 3])
@pytest.mark.parametrize("name", ["full", "local", "sink", "h2o", "snapkv", "pyramidkv", "adakv"])
def test_budget_at_least_sequence_generates_like_full(model, name, slack):
    if name in RAGGED and not slack:
        pytest.skip("a ragged policy needs slack")
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    ref = _greedy(model, ids)
    budget = {"full": None, "pyramidkv": 84}.get(name, 42)  # 30 + 12 tokens fit exactly (pyramidkv: in its top layer)
    cache = make_cache(model, name, budget=budget, slack=slack)
    out = _greedy(model, ids, cache)
    assert torch.equal(out, ref)
    assert cache.stats()["evicted_tokens"] == 0 and cache.stats()["kept_tokens"] == 41  # last token not fed back


def _held(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Hkv, kept) slot indices, oldest first, and their token positions (-1: a dead slot of a ragged
    policy; the scratch slot of an evicted token is left out)."""
    slots = layer.token_order()
    return slots, layer.positions.gather(-1, slots)


@pytest.mark.parametrize("slack", [0, 4])
@pytest.mark.parametrize("name,kw", EVICTING)
def test_budget_sinks_recent_and_slot_contents_hold_after_every_step(sharp, name, kw, slack):
    """Prompt, one-token steps, a 3-token step in the middle of decoding, more one-token steps: after
    every step each layer holds what its budget and slack allow (evicting down to the budget whenever
    more than budget + slack are kept), each token once; the sinks and the W most recent survive;
    every kept slot still holds its own token's key and value (layer 0, whose keys depend only on the
    token and its position, against a full cache fed the same tokens). Sharp attention, so H2O frees
    different slots in different rows and heads; ragged policies keep budget * heads per layer."""
    if name in RAGGED and not slack:
        pytest.skip("a ragged policy needs slack")
    model, budget, prompt = sharp, 12, 25
    cache, full = make_cache(model, name, budget=budget, slack=slack, **kw), make_cache(model, "full")
    ids = torch.randint(0, 256, (2, prompt), generator=torch.Generator().manual_seed(2))
    seen, held = 0, [0] * len(cache.layers)  # tokens each (row, KV head) holds, on average over heads
    with torch.inference_mode():
        for step in range(14):
            # slots in use after the last eviction: the budget (a ragged policy: its widest head)
            widths = [max(layer.split.total, getattr(layer, "width", 0)) if layer.split else None for layer in cache.layers]
            out = _forward(model, ids, cache)
            _forward(model, ids, full)
            seen += ids.shape[1]
            assert sum(layer.split.total for layer in cache.layers) == budget * len(cache.layers)
            for i, layer in enumerate(cache.layers):
                split = layer.split
                width = split.total if widths[i] is None else widths[i]
                held[i] += ids.shape[1]
                if width - split.total + held[i] > width + slack:  # slots in use: evict down to the budget
                    held[i] = split.total
                heads = layer.positions.shape[1]
                assert layer.seen == seen and layer.max_kept <= split.total + slack + (heads - 1) * split.heavy
                _, positions = _held(layer)
                assert ((positions >= 0).sum(dim=(1, 2)) == heads * held[i]).all()
                if name not in RAGGED:
                    assert layer.kept == held[i]
                for b in range(2):
                    for h in range(heads):
                        pos = positions[b, h][positions[b, h] >= 0]
                        assert (pos[1:] > pos[:-1]).all() and (pos < seen).all(), "a token kept twice"
                        s, w = min(split.sink_tokens, seen), min(split.recent, seen)
                        assert torch.equal(pos[:s], torch.arange(s)), "a sink was evicted"
                        assert torch.equal(pos[len(pos) - w:], torch.arange(seen - w, seen)), "a recent token was evicted"
            layer, ref = cache.layers[0], full.layers[0]
            slots, pos = _held(layer)
            live = (pos >= 0).unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
            rows = lambda i: i.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])  # noqa: E731
            for got, want in ((layer.keys, ref.keys), (layer.values, ref.values)):
                torch.testing.assert_close(got.gather(2, rows(slots))[live], want.gather(2, rows(pos))[live], rtol=0,
                                           atol=1e-6)
            ids = out.logits[:, -1:].argmax(-1)
            if step == 5:  # a multi-token step after one-token eviction (a new chat turn)
                ids = torch.cat([ids, ids + 1, ids + 2], dim=1)
    assert cache.stats()["evicted_tokens"] > 0


def test_h2o_decoding_evicts_the_lowest_accumulated_attention():
    """One token at a time: the slot H2O frees is never protected and never scores above a kept
    heavy-hitter candidate, and the next token is written into exactly that slot."""
    model = _sharp()
    cache = make_cache(model, "h2o", budget=10, sink_tokens=2, slack=0)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        out = _forward(model, ids, cache)
        for _ in range(8):
            before = [(layer.free, layer.seen) for layer in cache.layers]
            out = _forward(model, out.logits[:, -1:].argmax(-1), cache)
            split = cache.split
            for layer, (free_before, seen_before) in zip(cache.layers, before):
                if free_before is not None:
                    new_slot = layer.positions.gather(-1, free_before)
                    assert (new_slot == seen_before).all(), "the new token went elsewhere"
                free, pos, score = layer.free, layer.positions, layer.attention
                assert free is not None and layer.kept == split.total
                freed_pos = pos.gather(-1, free)
                assert (freed_pos >= split.sink_tokens).all() and (freed_pos < layer.seen - split.recent).all()
                middle = (pos >= split.sink_tokens) & (pos < layer.seen - split.recent)
                middle.scatter_(-1, free, False)
                lowest_kept = score.masked_fill(~middle, float("inf")).amin(dim=-1, keepdim=True)
                assert (score.gather(-1, free) <= lowest_kept).all()


def test_one_token_step_writes_into_each_heads_freed_slot():
    """Without a model: the prompt step leaves budget + 1 slots, each head frees its own lowest-scored
    middle slot, and the next token's key/value/position land exactly there (other slots untouched)."""
    layer = PolicyCache(make_policy("h2o", 4, sink_tokens=1), 1, slack=0).layers[0]  # split of 5 tokens: 1 sink, 1 heavy, 2 recent
    k = torch.randn(1, 2, 5, 3, generator=torch.Generator().manual_seed(10))
    layer.update(k, -k)
    layer.finish(None, None, 1.0, probs=torch.tensor([[[5.0, 1.0, 2.0, 0.0, 0.0], [5.0, 2.0, 1.0, 0.0, 0.0]]]))
    assert layer.free.tolist() == [[[1], [2]]] and layer.kept == 4 and layer.evicted == 1
    new = torch.randn(1, 2, 1, 3, generator=torch.Generator().manual_seed(11))
    keys, values = layer.update(new, -new)
    expected = k.clone()
    expected[0, 0, 1], expected[0, 1, 2] = new[0, 0, 0], new[0, 1, 0]
    assert torch.equal(keys, expected) and torch.equal(values, -expected)
    assert layer.positions.tolist() == [[[0, 5, 2, 3, 4], [0, 1, 5, 3, 4]]]
    assert layer.attention[0, 0, 1] == 0 and layer.attention[0, 1, 2] == 0 and layer.free is None


@pytest.mark.parametrize("positions,slack", [("absolute", 0), ("rank", 0), ("absolute", 3)])
@pytest.mark.parametrize("name,kw", [("sink", {}), ("local", {}), ("h2o", {"sink_tokens": 1}), ("snapkv", {}),
                                     ("adakv", {})])
def test_one_layer_step_equals_a_fresh_pass_over_the_kept_tokens(name, kw, positions, slack):
    """A one-layer model's keys and values depend only on each token and its position, so after any
    eviction the next logits must equal a fresh forward over just the kept tokens plus the new one: at
    their absolute positions, or (``rank``, StreamingLLM) at positions 0, 1, ... within the cache. One
    KV head and batch 1, so every head keeps the same tokens."""
    if name in RAGGED and not slack or name in ("snapkv", "adakv") and positions == "rank":
        pytest.skip("ragged policies need slack; rank positions are covered by the other policies")
    model = tiny_llama(seed=1, num_hidden_layers=1, num_key_value_heads=1)
    cache = make_cache(model, name, budget=9, positions=positions, slack=slack, **kw)
    tokens = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(12)).tolist()
    with torch.inference_mode():
        out = _forward(model, torch.tensor([tokens]), cache)
        for _ in range(10):
            layer = cache.layers[0]
            kept = layer.positions[0, 0, layer.token_order()[0, 0]].tolist()
            tokens.append(int(out.logits[0, -1].argmax()))
            out = _forward(model, torch.tensor([tokens[-1:]]), cache)
            ids = [tokens[p] for p in kept] + tokens[-1:]
            pos = kept + [len(tokens) - 1] if positions == "absolute" else list(range(len(ids)))
            causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()[None, None]  # gaps are not new documents
            ref = model(torch.tensor([ids]), position_ids=torch.tensor([pos]), attention_mask=causal,
                        use_cache=False).logits[0, -1]
            torch.testing.assert_close(out.logits[0, -1], ref, atol=1e-5, rtol=1e-5)
    assert cache.stats()["evicted_tokens"] > 0 and cache.stats()["positions"] == positions


def test_rank_positions_need_a_composable_rope(model):
    with pytest.raises(ValueError, match="policy 'full' never evicts"):
        make_cache(model, "full", positions="rank")
    with pytest.raises(ValueError, match="'absolute' \\(default\\) or 'rank'"):
        make_cache(model, "sink", budget=8, positions="relative")
    yarn = tiny_llama(seed=0, rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                               "original_max_position_embeddings": 128})
    with pytest.raises(ValueError, match="'yarn'.*cannot be re-rotated"):
        make_cache(yarn, "sink", budget=8, positions="rank")
    assert make_cache(model, "sink", budget=8, positions="rank").slack == 0  # rank re-rotates every step anyway
    with pytest.raises(ValueError, match="slack=4 with positions='rank'.*slack=0"):
        make_cache(model, "sink", budget=8, positions="rank", slack=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_attention_matches_sdpa_and_dense_scores(dtype):
    from sinklora.hf.sdpa import one_query_attention

    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, h, n, 16, generator=g).to(dtype) for h, n in ((6, 1), (2, 23), (2, 23)))
    out, probs = one_query_attention(q, k, v, 0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.25,
                                                           enable_gqa=True).transpose(1, 2)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    dense = dense_accumulated_attention(q.float(), k.float(), scaling=0.25, past=22)
    torch.testing.assert_close(probs, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("slack", [0, 8])
@pytest.mark.parametrize("name,window,method", [("h2o", None, "auto"), ("h2o", None, "chunked"), ("snapkv", 6, "auto")])
def test_h2o_keeps_largest_accumulated_attention_of_the_prompt(name, window, method, slack):
    """After the prompt step, each layer and KV head keeps its top-K column sums of the (dense, eager)
    attention probabilities of every query (h2o: from the prompt's own attention pass on CPU, or
    recomputed in chunks) or of the last `window` queries (snapkv), summed over the GQA group, plus
    sinks and recent tokens; with or without slack (40 tokens > 16 + 8)."""
    n, budget, sinks = 40, 16, 2
    ids = torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(3))
    model, eager = _sharp(), _sharp("eager")
    policy = make_policy(name, budget, sink_tokens=sinks)
    if window is not None:
        policy.score_window, policy.pool = window, 1  # pooling makes ties: tested on its own below
    with torch.inference_mode():
        attn = eager(ids, output_attentions=True).attentions  # per layer (B, Hq, n, n)
        cache = make_cache(model, policy, slack=slack, score_method=method)
        _forward(model, ids, cache)
    split = cache.split
    assert split == Split(sink_tokens=2, heavy=7, recent=7)
    for layer, probs in zip(cache.layers, attn):
        b, hq = probs.shape[:2]
        hkv = layer.keys.shape[1]
        counted = probs[:, :, -window:] if window else probs  # (B, Hq, queries, n)
        scores = counted.double().sum(dim=2).view(b, hkv, hq // hkv, n).sum(dim=2)  # (B, Hkv, n)
        middle = scores[..., sinks:n - split.recent]
        heavy = middle.topk(split.heavy, dim=-1).indices.sort(dim=-1).values + sinks
        expected = torch.cat([torch.arange(sinks).expand(b, hkv, -1), heavy,
                              torch.arange(n - split.recent, n).expand(b, hkv, -1)], dim=-1)
        assert torch.equal(layer.positions, expected)
        torch.testing.assert_close(layer.attention.double(), scores.gather(2, expected), atol=1e-4, rtol=1e-4)
    kept = cache.layers[0].positions
    assert not torch.equal(kept[0, 0], kept[0, 1]) and not torch.equal(kept[0], kept[1]), "per head and row"


def test_snapkv_pools_scores_over_neighbouring_tokens_not_slots():
    policy = make_policy("snapkv", 4)
    policy.pool = 3
    positions = torch.tensor([[[3, 0, 4, 1, 2, 5]]])  # slot -> token, as after decoding steps
    by_token = torch.tensor([0.0, 0, 5, 0, 0, 1])  # token 2 scores high, token 5 a little
    state = SlotState(torch.zeros(1, 1, 6, 2), torch.zeros(1, 1, 6, 2), positions, 6, by_token[positions])
    pooled_by_token = torch.tensor([0.0, 5, 5, 5, 1, 1])  # tokens 1-3 are token 2's neighbours
    assert torch.equal(policy.score(state), pooled_by_token[positions])


@pytest.mark.parametrize("method", ["chunked", "sdpa_grad"])
@pytest.mark.parametrize("past,n_new", [(0, 37), (20, 9), (50, 1)])
def test_accumulated_attention_matches_dense(method, past, n_new):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, n_new, 16, generator=g)
    k = torch.randn(2, 2, past + n_new, 16, generator=g)
    ref = dense_accumulated_attention(q, k, scaling=0.25, past=past)
    got = accumulated_attention(q, k, scaling=0.25, past=past, method=method, chunk=5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # every query's probabilities sum to 1, per query head: total mass = Hq * L per row
    torch.testing.assert_close(got.sum(dim=(1, 2)), torch.full((2,), 6.0 * n_new), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,budget,kw,fix", [
    ("sink", -5, {}, "at least 1"),
    ("h2o", 0, {}, "at least 1"),
    ("sink", 3, {}, "raise the budget"),
    ("h2o", 4, {"sink_tokens": 8}, "raise the budget"),
    ("local", 0.0, {}, "(0, 1]"),
    ("h2o", 1.5, {}, "(0, 1]"),
    ("sink", -0.2, {}, "(0, 1]"),
    ("h2o", 0.2, {"heavy_ratio": 1.5}, "[0, 1)"),
    ("h2o", 0.2, {"heavy_ratio": 1.0}, "[0, 1)"),  # no recent window left
    ("sink", 4, {}, "no room for recent tokens"),  # issue 11: the sinks alone fill the budget
    ("h2o", 3, {"sink_tokens": 3}, "at least 4"),
    ("auto", 0.0, {}, "(0, 1]"),
    ("local", 10, {"sink_tokens": 4}, "policy 'sink'"),
    ("sink", None, {}, "budget=512"),
    ("full", 10, {}, "drop the budget"),
    ("sink", "abc", {}, "token count"),
])
def test_invalid_budgets_raise_with_the_fix(name, budget, kw, fix):
    with pytest.raises(ValueError, match="budget|sink_tokens|heavy_ratio") as err:
        make_policy(name, budget, **kw)
    assert fix in str(err.value)


def test_ratio_budget_resolves_on_the_prompt():
    assert make_policy("h2o", 0.25).split(4000) == Split(0, 500, 500)
    assert make_policy("sink", "50%").split(4000) == Split(4, 0, 1996)
    assert make_policy("h2o", 0.25).split(40) == Split(0, 5, 5)
    with pytest.raises(ValueError, match="no more than sink_tokens"):
        make_policy("sink", 0.05).split(40)  # 2 tokens <= 4 sinks
    assert parse_budget("512") == 512 and parse_budget("0.2") == 0.2 and parse_budget("1.0") == 1.0
    assert parse_budget(None) is None and parse_budget("") is None


def test_a_ratio_of_a_short_chat_prompt_keeps_the_question(model):
    """Issue 11: `chat prompt="What is 2+2?" cache=h2o budget=0.2` kept 6 of 30 tokens and evicted the
    question. The cache settings of chat and serve resolve a ratio budget to at least CACHE_BUDGET_FLOOR
    tokens, so the whole prompt and its reply stay; a long prompt still gets its ratio; integer budgets
    are taken as given; the library's policies (and the evaluation suites) take the exact ratio."""
    from sinklora.defaults import CACHE_BUDGET_FLOOR
    from sinklora.settings import CacheOptions

    floor = CacheOptions().budget_floor
    assert floor == CACHE_BUDGET_FLOOR
    assert make_policy("h2o", 0.2, budget_floor=floor).split(30).total == floor
    assert make_policy("h2o", 0.2, budget_floor=floor).split(10 * floor).total == 2 * floor
    assert make_policy("h2o", 6, budget_floor=floor).split(30).total == 6
    assert make_policy("h2o", 0.2).split(30).total == 6
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(5))
    cache = CacheOptions(cache="h2o", budget="0.2", slack=0).make(model)
    _greedy(model, ids, cache, n=10)
    assert cache.stats()["evicted_tokens"] == 0 and cache.stats()["kept_tokens"] == 39


def test_ratio_budget_in_generation(model):
    cache = make_cache(model, make_policy("sink", 0.5, sink_tokens=2), slack=0)
    _greedy(model, torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(5)), cache, n=5)
    assert cache.split == Split(2, 0, 8) and cache.stats()["kept_tokens"] == 10


def test_keep_indices_without_model():
    keys = torch.zeros(1, 2, 10, 4)
    pos = torch.arange(10).expand(1, 2, 10)
    attention = torch.tensor([[[0, 0, 9, 1, 8, 0, 0, 0, 0, 0], [0, 0, 0, 7, 0, 6, 0, 0, 0, 0.]]])
    policy = make_policy("h2o", 5, sink_tokens=1, heavy_ratio=0.5)
    state = SlotState(keys, keys, pos, 10, attention)
    assert policy.keep_indices(state, policy.split(10)).tolist() == [[[0, 2, 4, 8, 9], [0, 3, 5, 8, 9]]]
    local = make_policy("local", 3)
    assert local.keep_indices(state, local.split(10)).tolist() == [[[7, 8, 9], [7, 8, 9]]]
    # one over budget: the lowest-ranked slot is freed (roles come from positions, not slot order)
    shuffled = SlotState(keys[..., :6, :], keys[..., :6, :], torch.tensor([[[9, 0, 2, 8, 4, 3]] * 2]), 10,
                         torch.tensor([[[0, 0, 9, 0, 8, 1], [0, 0, 0, 0, 0, 7.]]]))
    assert policy.evict_slot(shuffled, policy.split(10)).tolist() == [[[5], [2]]]
    assert make_policy("sink", 4, sink_tokens=1).evict_slot(shuffled, Split(1, 0, 3)).tolist() == [[[2], [2]]]


def test_padded_batch_is_refused_and_full_accepts_it(model):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # right padding
    with pytest.raises(ValueError, match="padded batch"), attach_cache(model, make_cache(model, "h2o", budget=8)) as kw:
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=256, **kw)
    full = make_cache(model, "full")
    with attach_cache(model, full) as kw:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=256, **kw)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=256)
    assert torch.equal(out, ref)


def test_evicting_cache_needs_to_be_attached():
    plain = tiny_llama(seed=0)  # not attached: the cache never sees its attention step
    cache = PolicyCache(make_policy("sink", 8), 2)
    with pytest.raises(RuntimeError, match="attach_cache"):
        plain.generate(torch.randint(0, 256, (1, 12)), max_new_tokens=3, do_sample=False, pad_token_id=256,
                       **cache_kwargs(cache))


@pytest.mark.parametrize("slack", [0, 4])
def test_beam_search_reorders_policy_state(model, slack):
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(7))
    cache = make_cache(model, "h2o", budget=10, slack=slack)
    with torch.inference_mode(), attach_cache(model, cache) as kw:
        model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=256, **kw)
    layer = cache.layers[0]
    assert layer.keys.shape[0] == layer.positions.shape[0] == layer.attention.shape[0] == 3
    if slack:
        assert layer.queries.shape[0] == 3 and layer.kept == 10  # 5 steps: 15 > 10 + 4 evicted
    else:
        assert layer.kept == 10 and layer.free.shape[0] == 3


def test_two_threads_generate_on_two_models_as_each_does_alone():
    """A cache belongs to one request and its state lives on the model it is attached to: two model
    instances with different policies decode at once exactly as each does alone (every step's logits);
    two requests on one shared instance are refused with a clear error instead of mixing their caches."""
    import threading

    models = [_sharp(), _sharp()]
    policies = [("h2o", {"budget": 10, "slack": 2}), ("local", {"budget": 4, "slack": 0})]
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(9))

    def decode(i):
        model, (name, kw) = models[i], policies[i]
        with torch.inference_mode(), attach_cache(model, make_cache(model, name, **kw)) as cache_kw:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 pad_token_id=256, output_scores=True, return_dict_in_generate=True, **cache_kw)
        return torch.stack(out.scores)  # (steps, B, V)

    alone = [decode(0), decode(1)]
    assert not torch.allclose(alone[0], alone[1])
    results, errors, start = {}, [], threading.Barrier(2)

    def run(i):
        try:
            start.wait(timeout=10)
            results[i] = decode(i)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and all(torch.equal(results[i], alone[i]) for i in range(2))

    shared = models[0]
    with attach_cache(shared, make_cache(shared, "h2o", budget=10)):
        with pytest.raises(RuntimeError, match="another KV cache"):
            with attach_cache(shared, make_cache(shared, "local", budget=4)):
                pass
    assert torch.equal(decode(0), alone[0])  # the refused request left nothing behind
