"""Passkey retrieval: accuracy by prompt length and key depth (LongLoRA / Landmark Attention format).

The prompt is LongLoRA's ``passkey_retrivial.py`` (``generate_prompt_landmark``) byte for byte: five
lines joined by ``"\\n"``: the task description, a filler prefix, the key line, a filler suffix and
the question. The filler is ``" ".join([FILLER] * 5000)`` cut to a number of *characters* (so it may
end mid-word); prefix and suffix are both cut from the start of that same string.

Where we differ from LongLoRA, on purpose:
- depth is a parameter (``n_prefix = round(depth * n_filler)``) instead of ``randint(0, n_filler)``;
- the filler length is searched so the prompt has as many tokens as possible without exceeding the
  requested length (LongLoRA uses ``3.75 * length`` characters and reports the average length);
- keys are drawn uniformly from 1..50000 inclusive (LongLoRA's ``numpy.random.randint(1, 50000)``
  never draws 50000), from a seed fixed per (seed, length, depth, trial);
- the filler may be longer than 5000 repeats for very long prompts (its prefix is unchanged);
- we generate a few tokens more than the key needs and also record whether the first number in the
  generation equals the key.

Scoring (the documented rule): a trial passes when the generated tokens start with exactly the key's
tokens *as they appear after the prompt*: the ids that ``prompt + " " + key`` has beyond ``prompt``
(a space, as in natural text and in LongLoRA, whose SentencePiece tokenizer puts the word-start marker
on the key). If the tokenizer merges across that boundary we fall back to the ids of ``" " + key``.
A model that answers without the space fails the exact rule but passes ``digits``.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sinklora.eval.perplexity import warn_beyond_trained_range

logger = logging.getLogger(__name__)

TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
KEY_RANGE = (1, 50000)


def filler(n_chars: int) -> str:
    """The first ``n_chars`` characters of ``" ".join([FILLER] * many)`` (LongLoRA's ``garbage_inf``)."""
    unit = FILLER + " "
    return (unit * (n_chars // len(unit) + 1))[:n_chars]


def key_line(key: int | str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def make_prompt(n_garbage_prefix: int, n_garbage_suffix: int, key: int | str) -> str:
    """The passkey prompt with ``n_garbage_prefix`` filler characters before the key and ``n_garbage_suffix`` after."""
    if n_garbage_prefix < 0 or n_garbage_suffix < 0:
        raise ValueError(f"n_garbage_prefix={n_garbage_prefix}, n_garbage_suffix={n_garbage_suffix}: must be >= 0")
    return "\n".join([TASK_DESCRIPTION, filler(n_garbage_prefix), key_line(key), filler(n_garbage_suffix), QUESTION])


def _prompt_for(n_filler: int, depth: float, key: int | str) -> str:
    prefix = math.floor(depth * n_filler + 0.5)
    return make_prompt(prefix, n_filler - prefix, key)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # special tokens as the tokenizer adds them by default (a BOS for Llama, as in LongLoRA); verbose=False
    # silences the "longer than model_max_length" warning, which is the point of this eval
    return list(tokenizer(text, verbose=False).input_ids)


def build_passkey_prompt(tokenizer: Any, target_tokens: int, depth: float, key: int | str) -> tuple[str, torch.Tensor]:
    """-> (prompt, input_ids (1D LongTensor)) with as many tokens as possible, never more than ``target_tokens``.

    The filler length (in characters) is found by doubling + bisection on the token count, then the
    characters up to one filler sentence beyond are scanned (the count is not strictly monotone when
    the cut falls inside a word). ``input_ids.numel()`` is the actual length.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth}: must be between 0.0 (key first) and 1.0 (key last)")

    def count(n: int) -> int:
        return len(_encode(tokenizer, _prompt_for(n, depth, key)))

    if count(0) > target_tokens:
        raise ValueError(f"target_tokens={target_tokens}: the prompt without filler already has {count(0)} tokens; "
                         "ask for a longer length")
    lo, hi = 0, max(64, target_tokens)
    while count(hi) <= target_tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: count(lo) <= target < count(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= target_tokens else (lo, mid)
    best_n, best = lo, count(lo)
    for n in range(lo + 1, lo + len(FILLER) + 2):
        if best == target_tokens:
            break
        c = count(n)
        if best < c <= target_tokens:
            best_n, best = n, c
    text = _prompt_for(best_n, depth, key)
    return text, torch.tensor(_encode(tokenizer, text), dtype=torch.long)


def key_token_ids(tokenizer: Any, prompt: str, key: int | str) -> list[int]:
    """The ids the key occupies right after ``prompt`` (see the module docstring's scoring rule)."""
    base = _encode(tokenizer, prompt)
    full = _encode(tokenizer, f"{prompt} {key}")
    if full[: len(base)] == base and len(full) > len(base):
        return list(full[len(base):])
    return list(tokenizer(f" {key}", add_special_tokens=False).input_ids)


def score_generation(tokenizer: Any, new_ids: Sequence[int], key_ids: Sequence[int], key: int | str) -> dict[str, Any]:
    """-> {"exact": generation starts with key_ids, "digits": its first number == key, "answer", "generated"}."""
    new_ids = [int(i) for i in new_ids]
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    match = re.search(r"\d+", text)
    answer = match.group(0) if match else None
    return {"exact": new_ids[: len(key_ids)] == list(key_ids), "digits": answer == str(key), "answer": answer,
            "generated": text}


def passkey_key(seed: int, length: int, depth: float, trial: int) -> int:
    """The key of one trial: uniform in 1..50000, fixed by (seed, length, depth, trial)."""
    return random.Random(f"passkey:{seed}:{length}:{depth!r}:{trial}").randint(*KEY_RANGE)


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def run_passkey(model: Any, tokenizer: Any, lengths: Sequence[int], depths: Sequence[float], trials: int = 2,
                seed: int = 0, *, cache_factory: Callable[[], Any] | None = None, extra_new_tokens: int = 4,
                progress: bool = True, **generate_kwargs: Any) -> dict[str, Any]:
    """Greedy passkey retrieval for every (length, depth, trial).

    ``cache_factory`` (optional) makes a fresh ``past_key_values`` cache for each generation (a KV
    policy); ``generate_kwargs`` go to ``model.generate`` unchanged. -> ``{"lengths", "depths",
    "trials", "seed", "accuracy" (len(lengths) x len(depths), exact rule), "digit_accuracy",
    "accuracy_by_length", "prompt_tokens" (mean actual length per cell), "trials_detail"}``.
    """
    from tqdm.auto import tqdm

    from sinklora.hf.attention import attach_cache

    if trials < 1:
        raise ValueError(f"trials={trials}: must be >= 1")
    if not lengths or not depths:
        raise ValueError(f"lengths={list(lengths)}, depths={list(depths)}: give at least one of each")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depths contains {d}: every depth must be between 0.0 and 1.0")
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for length in lengths:
        warn_beyond_trained_range(model, length, "passkey prompt length")
    exact = torch.zeros(len(lengths), len(depths))
    digits = torch.zeros(len(lengths), len(depths))
    tokens = torch.zeros(len(lengths), len(depths))
    details = []
    bar = tqdm(total=len(lengths) * len(depths) * trials, desc="passkey", disable=not progress)
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            for trial in range(trials):
                key = passkey_key(seed, length, depth, trial)
                text, ids = build_passkey_prompt(tokenizer, length, depth, key)
                key_ids = key_token_ids(tokenizer, text, key)
                cache = cache_factory() if cache_factory is not None else None
                prompt = ids.unsqueeze(0).to(device)  # (1, N)
                t0 = time.perf_counter()
                with torch.inference_mode(), attach_cache(model, cache) as cache_kw:
                    out = model.generate(
                        input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, num_beams=1,
                        max_new_tokens=len(key_ids) + extra_new_tokens, pad_token_id=pad_id, **cache_kw,
                        **generate_kwargs,
                    )
                sequences = getattr(out, "sequences", out)  # (1, prompt + new)
                score = score_generation(tokenizer, sequences[0, ids.numel():].tolist(), key_ids, key)
                exact[i, j] += score["exact"] / trials
                digits[i, j] += score["digits"] / trials
                tokens[i, j] += ids.numel() / trials
                details.append({"length": length, "depth": depth, "trial": trial, "key": key,
                                "prompt_tokens": ids.numel(), "seconds": round(time.perf_counter() - t0, 3), **score})
                bar.update(1)
                bar.set_postfix(acc=f"{sum(d['exact'] for d in details) / len(details):.2f}")
    bar.close()
    return {
        "lengths": [int(n) for n in lengths], "depths": [float(d) for d in depths], "trials": trials, "seed": seed,
        "scoring": "exact: generation starts with the key's tokens after the prompt; digits: first number == key",
        "accuracy": exact.tolist(), "digit_accuracy": digits.tolist(),
        "accuracy_by_length": exact.mean(dim=1).tolist(), "prompt_tokens": tokens.tolist(),
        "trials_detail": details,
    }
