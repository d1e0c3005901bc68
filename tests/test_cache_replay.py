"""bench/cache_replay.py, which the passkey figures of BENCHMARKS.md rest on: a cache built by replaying a
recorded prompt step is the cache a real prefill builds, and decodes the same tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from sinklora.hf.attention import attach_cache
from sinklora.hf.cache import make_cache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from cache_replay import greedy, record_prompt, replay  # noqa: E402


@pytest.mark.parametrize("name, slack", [("h2o", 0), ("snapkv", 8), ("adakv", 4), ("sink", 8)])
def test_a_replayed_prompt_builds_the_cache_a_prefill_builds(name, slack):
    model = tiny_llama(seed=0)
    with torch.no_grad():
        for block in model.model.layers:  # sharper attention: the policies' choices depend on the scores
            block.self_attn.q_proj.weight *= 8
    ids = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(9))
    real = make_cache(model, name, budget=20, slack=slack)
    with torch.inference_mode(), attach_cache(model, real) as kw:
        logits = model(input_ids=ids[None], logits_to_keep=1, **kw).logits[:, -1]
    recorded, steps = record_prompt(model, ids)
    replayed = make_cache(model, name, budget=20, slack=slack)
    replay(replayed, steps)
    torch.testing.assert_close(recorded, logits)
    assert replayed.stats() == real.stats() and real.stats()["evicted_tokens"] > 0
    for a, b in zip(real.layers, replayed.layers):
        assert torch.equal(a.positions, b.positions)
        if a.attention is not None:
            torch.testing.assert_close(a.attention, b.attention)
    first = logits.argmax(-1, keepdim=True)
    assert greedy(model, replayed, first, 8) == greedy(model, real, first, 8)
