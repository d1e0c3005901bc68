"""Beam search with an evicting KV cache: every returned beam scores exactly as that token sequence does when
decoded alone with a fresh cache of the same policy. Beam search reorders the cache rows at every step;
a policy whose state (accumulated attention, positions, kept slots) were not reordered with them would
evict other tokens for a beam than its own history implies, and its log-probabilities would differ."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from sinklora.hf.attention import attach_cache
from sinklora.hf.cache import make_cache

PROMPT, NEW, BEAMS = 20, 6, 3


def _sharp_model():
    """A tiny model with 8x sharper attention, so the policies' choices depend on the history."""
    model = tiny_llama(seed=0)
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.q_proj.weight *= 8
            block.self_attn.k_proj.weight *= 8
    return model


class _Force:
    """Logits processor: generate() emits ``tokens`` after the prompt (teacher forcing through generate)."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - PROMPT
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.tokens[step]] = 0.0
        return forced


def _alone(model, prompt, tokens: list[int], policy: str, budget: int, slack: int) -> torch.Tensor:
    """log p(token_t | prompt, tokens_<t) of one sequence decoded alone (batch 1, greedy, a fresh cache)."""
    from transformers import LogitsProcessorList

    cache = make_cache(model, policy, budget=budget, slack=slack)
    with torch.inference_mode(), attach_cache(model, cache) as kw:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(tokens),
                             do_sample=False, num_beams=1, pad_token_id=256, output_logits=True,
                             return_dict_in_generate=True, logits_processor=LogitsProcessorList([_Force(tokens)]), **kw)
    assert out.sequences[0, PROMPT:].tolist() == tokens
    logp = torch.log_softmax(torch.stack(out.logits)[:, 0].float(), dim=-1)  # (steps, V)
    return logp[torch.arange(len(tokens)), torch.tensor(tokens)]


@pytest.mark.parametrize("policy, budget, slack", [("h2o", 10, 0), ("h2o", 10, 3), ("snapkv", 12, 0),
                                                   ("snapkv", 12, 3), ("adakv", 12, 3), ("sink", 8, 0), ("sink", 8, 3)])
def test_each_beam_scores_as_its_sequence_decoded_alone(policy, budget, slack):
    """slack 3: evictions at the prompt and every 4 steps, beams reordered with tokens pending in between."""
    model = _sharp_model()
    prompt = torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(7))
    cache = make_cache(model, policy, budget=budget, slack=slack)
    with torch.inference_mode(), attach_cache(model, cache) as kw:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, min_new_tokens=NEW,
                             num_beams=BEAMS, num_return_sequences=BEAMS, do_sample=False, pad_token_id=256,
                             output_scores=True, return_dict_in_generate=True, **kw)
    assert cache.stats()["evicted_tokens"] > 0  # the policy did evict: its state decides the logits
    # log p of each chosen token along each final beam (beam_indices follow the reordering)
    transition = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
    sequences = out.sequences[:, PROMPT:].tolist()
    assert len({tuple(s) for s in sequences}) == BEAMS
    for beam, tokens in enumerate(sequences):
        torch.testing.assert_close(transition[beam].float(), _alone(model, prompt, tokens, policy, budget, slack),
                                   atol=1e-4, rtol=0)
