"""KV-cache policies on tiny random Llama models (CPU): exactness at full budget, budget and sink
invariants after every step, H2O heavy hitters against a dense eager recompute, invalid budgets."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from sinklora.cache.policies import SlotState, Split, make_policy, parse_budget
from sinklora.cache.scores import accumulated_attention, dense_accumulated_attention
from sinklora.hf.cache import PolicyCache, cache_kwargs, make_cache

EVICTING = [("local", {}), ("sink", {}), ("h2o", {}), ("h2o", {"sinks": 2}), ("h2o", {"heavy_ratio": 0.25})]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


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
    extra = cache_kwargs(cache) if cache is not None else {}
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=256, **extra)


@pytest.mark.parametrize("name", ["full", "local", "sink", "h2o"])
def test_budget_at_least_sequence_generates_like_full(model, name):
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    ref = _greedy(model, ids)
    cache = make_cache(model, name, budget=None if name == "full" else 42)  # 30 + 12 tokens fit exactly
    out = _greedy(model, ids, cache)
    assert torch.equal(out, ref)
    assert cache.stats()["evicted_tokens"] == 0 and cache.stats()["kept_tokens"] == 41  # last token not fed back


@pytest.mark.parametrize("name,kw", EVICTING)
def test_budget_sinks_and_order_hold_after_every_step(model, name, kw):
    budget, prompt = 12, 25
    cache = make_cache(model, name, budget=budget, **kw)
    ids = torch.randint(0, 256, (2, prompt), generator=torch.Generator().manual_seed(2))
    seen = 0
    with torch.inference_mode():
        for step in range(10):
            out = model(ids, **cache_kwargs(cache))
            seen += ids.shape[1]
            split = cache.split
            assert split.total == budget
            for layer in cache.layers:
                pos = layer.positions  # (B, Hkv, kept)
                assert layer.seen == seen and layer.keys.shape[-2] == pos.shape[-1] == min(seen, budget)
                assert layer.keys.shape[-2] <= budget
                assert (pos[..., 1:] > pos[..., :-1]).all(), "kept tokens out of order"
                s = min(split.sinks, seen)
                assert torch.equal(pos[..., :s], torch.arange(s).expand_as(pos[..., :s])), "a sink was evicted"
                w = min(split.recent, seen)
                recent = torch.arange(seen - w, seen).expand_as(pos[..., pos.shape[-1] - w:])
                assert torch.equal(pos[..., pos.shape[-1] - w:], recent), "a recent token was evicted"
            ids = out.logits[:, -1:].argmax(-1)
    assert cache.stats()["max_kept_tokens"] == budget


def test_h2o_keeps_largest_accumulated_attention_of_the_prompt():
    """After the prompt step, each layer and KV head keeps its top-K column sums of the (dense, eager)
    attention probabilities, summed over the GQA group, plus sinks and recent tokens."""
    n, budget, sinks = 40, 16, 2
    ids = torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(3))
    model, eager = _sharp(), _sharp("eager")
    with torch.inference_mode():
        attn = eager(ids, output_attentions=True).attentions  # per layer (B, Hq, n, n)
        cache = make_cache(model, "h2o", budget=budget, sinks=sinks)
        model(ids, **cache_kwargs(cache))
    split = cache.split
    assert split == Split(sinks=2, heavy=7, recent=7)
    for layer, probs in zip(cache.layers, attn):
        b, hq = probs.shape[:2]
        hkv = layer.keys.shape[1]
        scores = probs.double().sum(dim=2).view(b, hkv, hq // hkv, n).sum(dim=2)  # (B, Hkv, n)
        middle = scores[..., sinks:n - split.recent]
        heavy = middle.topk(split.heavy, dim=-1).indices.sort(dim=-1).values + sinks
        expected = torch.cat([torch.arange(sinks).expand(b, hkv, -1), heavy,
                              torch.arange(n - split.recent, n).expand(b, hkv, -1)], dim=-1)
        assert torch.equal(layer.positions, expected)
        torch.testing.assert_close(layer.attention.double(), scores.gather(2, expected), atol=1e-4, rtol=1e-4)
    kept = cache.layers[0].positions
    assert not torch.equal(kept[0, 0], kept[0, 1]) and not torch.equal(kept[0], kept[1]), "per head and row"


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
    ("h2o", 4, {"sinks": 8}, "raise the budget"),
    ("local", 0.0, {}, "(0, 1]"),
    ("h2o", 1.5, {}, "(0, 1]"),
    ("sink", -0.2, {}, "(0, 1]"),
    ("h2o", 0.2, {"heavy_ratio": 1.5}, "[0, 1]"),
    ("local", 10, {"sinks": 4}, "policy 'sink'"),
    ("sink", None, {}, "budget=512"),
    ("full", 10, {}, "drop the budget"),
    ("sink", "abc", {}, "token count"),
])
def test_invalid_budgets_raise_with_the_fix(name, budget, kw, fix):
    with pytest.raises(ValueError, match="budget|sinks|heavy_ratio") as err:
        make_policy(name, budget, **kw)
    assert fix in str(err.value)


def test_ratio_budget_resolves_on_the_prompt():
    assert make_policy("h2o", 0.25).split(40) == Split(0, 5, 5)
    assert make_policy("sink", "50%").split(40) == Split(4, 0, 16)
    with pytest.raises(ValueError, match="fewer than sinks"):
        make_policy("sink", 0.05).split(40)  # 2 tokens < 4 sinks
    assert parse_budget("512") == 512 and parse_budget("0.2") == 0.2 and parse_budget("1.0") == 1.0
    assert parse_budget(None) is None and parse_budget("") is None


def test_ratio_budget_in_generation(model):
    cache = make_cache(model, "sink", budget=0.5, sinks=2)
    _greedy(model, torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(5)), cache, n=5)
    assert cache.split == Split(2, 0, 8) and cache.stats()["kept_tokens"] == 10


def test_keep_indices_without_model():
    keys = torch.zeros(1, 2, 10, 4)
    pos = torch.arange(10).expand(1, 2, 10)
    attention = torch.tensor([[[0, 0, 9, 1, 8, 0, 0, 0, 0, 0], [0, 0, 0, 7, 0, 6, 0, 0, 0, 0.]]])
    policy = make_policy("h2o", 5, sinks=1, heavy_ratio=0.5)
    keep = policy.keep_indices(SlotState(keys, keys, pos, attention), policy.split(10))
    assert keep.tolist() == [[[0, 2, 4, 8, 9], [0, 3, 5, 8, 9]]]
    local = make_policy("local", 3)
    assert local.keep_indices(SlotState(keys, keys, pos), local.split(10)).tolist() == [7, 8, 9]


def test_padded_batch_is_refused_and_full_accepts_it(model):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # right padding
    with pytest.raises(ValueError, match="padded batch"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=256,
                       **cache_kwargs(make_cache(model, "h2o", budget=8)))
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=256,
                   **cache_kwargs(make_cache(model, "full")))


def test_evicting_cache_needs_the_cache_attention():
    plain = tiny_llama(seed=0)  # plain SDPA: the cache never sees its attention step
    cache = PolicyCache(make_policy("sink", 8), 2)
    with pytest.raises(RuntimeError, match="make_cache"):
        plain.generate(torch.randint(0, 256, (1, 12)), max_new_tokens=3, do_sample=False, pad_token_id=256,
                       **cache_kwargs(cache))


def test_beam_search_reorders_policy_state(model):
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(7))
    cache = make_cache(model, "h2o", budget=10)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=256, **cache_kwargs(cache))
    layer = cache.layers[0]
    assert layer.keys.shape[0] == layer.positions.shape[0] == layer.attention.shape[0] == 3
    assert layer.keys.shape[-2] == 10
