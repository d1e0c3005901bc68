"""Eval: perplexity protocols against independent plain-forward computations, the passkey prompt against
LongLoRA's format byte for byte, passkey length search and scoring, result files and plots."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import tiny_llama, tiny_tokenizer

from sinklora.eval import passkey, perplexity, plots, results
from sinklora.hf.cache import cache_kwargs


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


def _doc(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def _token_nll(model, context: torch.Tensor, target: int) -> float:
    """NLL of ``target`` after ``context`` with one plain forward and full logits."""
    with torch.no_grad():
        logits = model(context.unsqueeze(0)).logits[0, -1].double()
    return float(-F.log_softmax(logits, -1)[target])


def test_ppl_equals_plain_forward_loss(model):
    doc = _doc(40)
    with torch.no_grad():
        loss = model(doc.unsqueeze(0), labels=doc.unsqueeze(0)).loss.item()
    out = perplexity.evaluate_perplexity(model, [doc.tolist()], [40], progress=False)
    row = out["by_length"][0]
    assert row["tokens"] == 39 and row["docs_used"] == 1
    assert row["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_stride_equal_context_is_independent_chunks(model):
    doc, L = _doc(100, seed=2), 32
    expected, count = 0.0, 0
    for start in range(0, 99, L):  # each chunk of L inputs predicts its next L tokens
        chunk = doc[start : min(start + L, 99)]
        with torch.no_grad():
            logp = F.log_softmax(model(chunk.unsqueeze(0)).logits[0].double(), -1)
        targets = doc[start + 1 : start + 1 + chunk.numel()]
        expected -= float(logp.gather(1, targets[:, None]).sum())
        count += targets.numel()
    nll, n = perplexity.document_nll(model, doc, L)
    assert n == count == 99
    assert nll == pytest.approx(expected, rel=1e-5)


def test_stride_below_context_scores_each_token_once_with_its_window(model):
    doc, L, s = _doc(60, seed=3), 16, 6
    expected = 0.0
    for t in range(1, 60):
        k = max(0, -(-(t - L) // s))  # window k = ceil((t - L) / s) scores t; its inputs start at k * s
        expected += _token_nll(model, doc[k * s : t], int(doc[t]))
    windows = list(perplexity.sliding_windows(60, L, s))
    scored = [t for _, end, first in windows for t in range(first, end + 1)]
    assert scored == list(range(1, 60))
    assert all(end - begin <= L for begin, end, _ in windows)
    nll, n = perplexity.document_nll(model, doc, L, s)
    assert n == 59
    assert nll == pytest.approx(expected, rel=1e-5)


def test_chunked_loss_equals_unchunked(model):
    doc = _doc(70, seed=4)
    a = perplexity.document_nll(model, doc, 32, 8, chunk_tokens=3)
    b = perplexity.document_nll(model, doc, 32, 8, chunk_tokens=10**6)
    assert a[1] == b[1] and a[0] == pytest.approx(b[0], rel=1e-6)


def test_peft_wrapped_model_uses_its_adapter(model):
    from peft import LoraConfig, get_peft_model

    doc = _doc(48, seed=5)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = get_peft_model(tiny_llama(seed=0), lora)
    with torch.no_grad():
        loss = wrapped(input_ids=doc.unsqueeze(0), labels=doc.unsqueeze(0)).loss.item()
    nll, n = perplexity.document_nll(wrapped, doc, 48)
    assert nll / n == pytest.approx(loss, rel=1e-5)
    assert nll / n != pytest.approx(perplexity.document_nll(model, doc, 48)[0] / n, rel=1e-4)


def test_longlora_protocol_is_mean_of_window_losses(model):
    doc, L, step = _doc(100, seed=6), 32, 16
    losses = []
    for start in range(0, 100 - L + 1, step):
        window = doc[start : start + L].unsqueeze(0)
        with torch.no_grad():
            losses.append(model(window, labels=window).loss.item())
    total, windows = perplexity.longlora_window_nll(model, doc, L, step)
    assert windows == len(losses) == 5
    assert total / windows == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    out = perplexity.evaluate_perplexity(model, [doc], [L], stride=step, protocol="longlora", progress=False)
    assert out["by_length"][0]["ppl"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_short_documents_are_skipped_with_a_count(model, caplog):
    docs = [_doc(20, 7).tolist(), _doc(50, 8).tolist(), _doc(300, 9).tolist()]
    out = perplexity.evaluate_perplexity(model, docs, [30, 260], max_tokens=280, progress=False)
    short, long = out["by_length"]
    assert (short["docs_used"], short["docs_skipped"], short["tokens"]) == (2, 1, 49 + 279)
    assert (long["docs_used"], long["docs_skipped"]) == (1, 2)
    assert long["beyond_trained_range"] and not short["beyond_trained_range"]
    assert "max_position_embeddings=256" in caplog.text
    with pytest.raises(ValueError, match="no document has >= 400 tokens"):
        perplexity.evaluate_perplexity(model, docs, [400], progress=False)


# LongLoRA's generate_prompt_landmark with n_garbage_prefix=10, n_garbage_suffix=95, key 4242: the filler is
# " ".join([garbage] * 5000) cut to characters; the suffix crosses one repetition (89 chars + " ").
EXPECTED_PROMPT = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n"
    "The grass \n"
    "The pass key is 4242. Remember it. 4242 is the pass key.\n"
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. The g\n"
    "What is the pass key? The pass key is"
)


def test_passkey_prompt_matches_longlora_format():
    assert passkey.make_prompt(10, 95, 4242) == EXPECTED_PROMPT
    key_only = ["", "The pass key is 7. Remember it. 7 is the pass key.", ""]
    assert passkey.make_prompt(0, 0, 7).split("\n")[1:4] == key_only


class _WordTokenizer:
    """Whitespace-word tokenizer: a coarse tokenizer where one filler sentence is several tokens."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return SimpleNamespace(input_ids=[len(w) for w in re.findall(r"\S+|\n", text)])


@pytest.mark.parametrize("tok", [tiny_tokenizer(), _WordTokenizer()], ids=["bytes", "words"])
@pytest.mark.parametrize("target,depth", [(300, 0.0), (517, 0.5), (1000, 1.0)])
def test_length_search_hits_target_without_exceeding(tok, target, depth):
    text, ids = passkey.build_passkey_prompt(tok, target, depth, 31337)
    assert ids.numel() == len(tok(text).input_ids) <= target
    sentence = len(tok("The grass is green. ").input_ids)  # one filler sentence
    assert target - ids.numel() <= sentence
    lines = text.split("\n")
    assert lines[0] == passkey.TASK_DESCRIPTION and lines[2] == passkey.key_line(31337) and lines[4] == passkey.QUESTION
    if depth == 0.0:
        assert lines[1] == ""
    with pytest.raises(ValueError, match="target_tokens=50"):
        passkey.build_passkey_prompt(tok, 50, depth, 1)


def test_key_tokens_include_the_leading_space():
    tok = tiny_tokenizer()
    assert passkey.key_token_ids(tok, "The pass key is", 123) == list(b" 123")


class _FakeModel:
    """generate() answers with fixed text chosen from the key found in the prompt."""

    config = None
    device = torch.device("cpu")

    def __init__(self, tokenizer, answer):
        self.tokenizer, self.answer, self.calls = tokenizer, answer, []

    def generate(self, input_ids, max_new_tokens, **kwargs):
        self.calls.append(kwargs)
        key = re.search(r"The pass key is (\d+)", self.tokenizer.decode(input_ids[0])).group(1)
        new = self.tokenizer(self.answer(key), add_special_tokens=False).input_ids[:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


@pytest.mark.parametrize("answer,exact,digits", [
    (lambda k: f" {k}. Remember", 1.0, 1.0),
    (lambda k: f"{k}.", 0.0, 1.0),  # no leading space: not the key's tokens
    (lambda k: f" {k}1", 1.0, 0.0),  # starts with the key's tokens (LongLoRA's rule), but another number
    (lambda k: " 1.", 0.0, 0.0),
])
def test_passkey_scoring_exact_token_match(answer, exact, digits):
    tok = tiny_tokenizer()
    fake = _FakeModel(tok, answer)
    sentinel = object()
    out = passkey.run_passkey(fake, tok, [300, 400], [0.0, 1.0], trials=2, seed=3, progress=False,
                              cache_factory=lambda: sentinel, output_scores=False)
    assert out["accuracy"] == [[exact] * 2] * 2 and out["digit_accuracy"] == [[digits] * 2] * 2
    assert len(fake.calls) == 8
    (cache_key,) = cache_kwargs(sentinel)  # "cache" or "past_key_values", by transformers version
    assert all(c[cache_key] is sentinel and c["do_sample"] is False for c in fake.calls)
    keys = [d["key"] for d in out["trials_detail"]]
    assert len(set(keys)) == 8 and all(1 <= k <= 50000 for k in keys)
    again = passkey.run_passkey(fake, tok, [300, 400], [0.0, 1.0], 2, 3, progress=False)
    assert keys == [d["key"] for d in again["trials_detail"]]
    assert all(d["prompt_tokens"] <= d["length"] for d in out["trials_detail"])


def _greedy(model, ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding by full forward passes (no cache, no generate): the reference continuation."""
    out = ids[None]
    with torch.no_grad():
        for _ in range(steps):
            out = torch.cat([out, model(out).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out[0, ids.numel():].tolist()


class _ForceTokens:
    """A logits processor that makes generate() emit ``tokens`` after the prompt."""

    def __init__(self, prompt_len: int, tokens: list[int]):
        self.prompt_len, self.tokens = prompt_len, tokens

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        if step < len(self.tokens):
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.tokens[step]] = 0.0
        return scores


def test_run_passkey_with_a_real_tiny_model():
    from transformers import DynamicCache, LogitsProcessorList

    tok, model = tiny_tokenizer(), tiny_llama(max_position_embeddings=512)
    key = passkey.passkey_key(0, 280, 0.5, 0)
    text, ids = passkey.build_passkey_prompt(tok, 280, 0.5, key)
    key_ids = passkey.key_token_ids(tok, text, key)
    expected = _greedy(model, ids, len(key_ids) + 4)  # extra_new_tokens=4

    out = passkey.run_passkey(model, tok, [280], [0.5], trials=1, seed=0, progress=False, cache_factory=DynamicCache)
    detail = out["trials_detail"][0]
    assert detail["key"] == key and detail["prompt_tokens"] == ids.numel() == 280
    assert detail["generated"] == tok.decode(expected)  # generate() + cache == plain greedy forward passes
    assert out["accuracy"] == [[float(expected[:len(key_ids)] == key_ids)]]

    # the same real model made to answer the key: scored as retrieved
    forced = passkey.run_passkey(model, tok, [280], [0.5], trials=1, seed=0, progress=False, cache_factory=DynamicCache,
                                 logits_processor=LogitsProcessorList([_ForceTokens(280, key_ids + list(b". "))]))
    assert forced["accuracy"] == [[1.0]] and forced["digit_accuracy"] == [[1.0]]
    assert out["accuracy"] == [[0.0]]  # the random model does not find it (so the two runs differ)


def test_results_and_plots(tmp_path, model):
    ppl = perplexity.evaluate_perplexity(model, [_doc(80).tolist()], [16, 32], progress=False)
    meta = results.run_metadata(model="tiny", lengths=[16, 32], loaded_model=model)
    payload = {"kind": "perplexity", "metadata": meta, **ppl}
    path = results.write_results(payload, tmp_path / "r" / "results.json")
    back = results.read_results(path)
    assert back["by_length"][1]["ppl"] == pytest.approx(ppl["by_length"][1]["ppl"])
    assert back["metadata"]["versions"]["transformers"] == transformers.__version__
    assert back["metadata"]["model_info"]["max_position_embeddings"] == 256
    other = json.loads(json.dumps(back)) | {"label": "other"}
    heat = {"lengths": [100, 200], "depths": [0.0, 1.0], "accuracy": [[1.0, 0.5], [0.0, 1.0]], "label": "x"}
    log = [{"step": s, "loss": 5 - s / 10} for s in range(1, 30)] + [{"step": 29, "eval_loss": 2.5}]
    for made in (plots.plot_perplexity([back, other], tmp_path / "ppl.png"),
                 plots.plot_passkey_heatmap(heat, tmp_path / "heat.png"),
                 plots.plot_loss(log, tmp_path / "loss.png")):
        assert made.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and made.stat().st_size > 2000
    assert plots.smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
