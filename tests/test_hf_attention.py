"""Sparse attention inside Hugging Face models: registration, masks, padding, packing, training."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from sinklora.attention import Pattern, build_mask
from sinklora.hf.attention import use_attention


def _eager_logits_with_mask(model, ids, mask):
    """Independent oracle: transformers' eager attention fed the dense per-head mask as a 4-D mask."""
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))[None].expand(ids.shape[0], -1, -1, -1)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        return model(ids, attention_mask=additive).logits
    finally:
        model.set_attn_implementation(previous)


@pytest.mark.parametrize("backend", [None, "grouped"])  # None: the device's rule (fused on CPU, s2_roll grouped)
@pytest.mark.parametrize("pattern", ["s2", "sf", "s2_roll"])
@pytest.mark.parametrize("heads", [(4, 2), (9, 3), (5, 5)])
def test_model_logits_match_eager_with_dense_mask(pattern, heads, backend, monkeypatch):
    if backend:
        monkeypatch.setenv("SINKLORA_ATTENTION_BACKEND", backend)
    hq, hkv = heads
    model = tiny_llama(num_attention_heads=hq, num_key_value_heads=hkv, hidden_size=hq * 8)
    ids = torch.randint(0, 256, (2, 23))
    with use_attention(model, pattern, group_size=6):
        got = model(ids).logits
    assert model.config._attn_implementation == "sdpa"  # restored on exit
    ref = _eager_logits_with_mask(model, ids, build_mask(pattern, 23, hq, group_size=6))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, model(ids).logits, atol=1e-3)  # and it is not full attention


def test_two_models_two_patterns_and_switch_back():
    a, b = tiny_llama(seed=1), tiny_llama(seed=1)
    ids = torch.randint(0, 256, (1, 20))
    full = a(ids).logits
    with use_attention(a, "sf", group_size=5), use_attention(b, "s2", group_size=5):
        la, lb = a(ids).logits, b(ids).logits
        with use_attention(a, "full"):  # nested: full attention inside, sf again after
            torch.testing.assert_close(a(ids).logits, full)
        torch.testing.assert_close(a(ids).logits, la)
    assert not torch.allclose(la, lb, atol=1e-4)
    torch.testing.assert_close(la, _eager_logits_with_mask(a, ids, build_mask("sf", 20, 4, group_size=5)))
    torch.testing.assert_close(a(ids).logits, full)
    assert a.config._attn_implementation == "sdpa"


def test_the_pattern_detaches_after_an_exception():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 20))
    full = model(ids).logits
    with pytest.raises(RuntimeError, match="boom"):
        with use_attention(model, Pattern("sf", group_size=5)):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert all(getattr(m, "_sinklora_state", None) is None for m in model.modules())
    torch.testing.assert_close(model(ids).logits, full)


def test_right_padding_keeps_meaning():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 19))
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, 12:] = 0
    with use_attention(model, "sf", group_size=5, sink_tokens=2):
        batch = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, :12]).logits
    torch.testing.assert_close(batch[1, :12], alone[0], rtol=1e-5, atol=1e-5)


def test_packed_sequences_restart_the_pattern():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 19))
    position_ids = torch.cat([torch.arange(7), torch.arange(12)])[None]
    with use_attention(model, "sf", group_size=4, sink_tokens=2):
        packed = model(ids, position_ids=position_ids).logits
        first, second = model(ids[:, :7]).logits, model(ids[:, 7:]).logits
    torch.testing.assert_close(packed, torch.cat([first, second], dim=1), rtol=1e-5, atol=1e-5)


def test_generation_with_a_training_pattern_says_what_to_do():
    model = tiny_llama()
    with use_attention(model, "sf", group_size=5):
        with pytest.raises(ValueError, match="use_attention\\(model, 'full'\\)"):
            model.generate(torch.randint(0, 256, (1, 10)), max_new_tokens=3, do_sample=False)


def test_unsupported_model_is_refused(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32))
    # what an architecture without AttentionInterface dispatch reports
    monkeypatch.setattr(GPT2LMHeadModel, "_supports_attention_backend", False)
    with pytest.raises(ValueError, match="Llama-family"):
        with use_attention(gpt2, "sf"):
            pass


def test_gradients_with_activation_checkpointing_match_plain_backward():
    model = tiny_llama()
    model.train()
    ids = torch.randint(0, 256, (2, 21))

    def grads(checkpointing: bool):
        model.zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        with use_attention(model, "sf", group_size=6):
            model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain, ckpt = grads(False), grads(True)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b)


def test_trainer_runs_with_sparse_attention(tmp_path):
    from transformers import Trainer

    from sinklora.hf.trainer import training_arguments

    model = tiny_llama()
    data = [{"input_ids": torch.arange(32) % 7 + 10, "labels": torch.arange(32) % 7 + 10} for _ in range(8)]
    args = training_arguments(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        activation_checkpointing=True,
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    with use_attention(model, "sf", group_size=8):
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] * 0.7


def _host_reads_of_a_training_step(model, batch: dict, pattern: str) -> tuple[int, dict]:
    from sinklora.counters import OpCounter

    with use_attention(model, pattern, **({} if pattern == "full" else {"group_size": 8})):
        with OpCounter() as c:
            model(**batch).loss.backward()
    return c.host_reads, dict(c.reads)


@pytest.mark.parametrize("pattern", ["full", "sf"])
def test_host_reads_are_per_batch_not_per_layer(pattern):
    """What reads device values back to the host (a GPU sync each) happens once per batch: the padding
    check, the packed-document lengths. The count must not grow with the layers, activation
    checkpointing's recomputation included."""
    ids = torch.randint(0, 256, (1, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 30:] = 0
    batches = {
        "plain": {"input_ids": ids, "labels": ids},
        "padded": {"input_ids": ids.expand(2, -1), "attention_mask": mask, "labels": ids.expand(2, -1)},
        "packed": {"input_ids": ids, "labels": ids, "position_ids": torch.cat([torch.arange(15), torch.arange(25)])[None]},
    }
    one, two = tiny_llama(num_hidden_layers=1), tiny_llama(num_hidden_layers=2)
    for model in (one, two):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for kind, batch in batches.items():
        _host_reads_of_a_training_step(one, batch, pattern)  # warm-up: per-shape tables are built once per process
        reads1 = _host_reads_of_a_training_step(one, batch, pattern)
        reads2 = _host_reads_of_a_training_step(two, batch, pattern)
        assert reads1 == reads2 and reads2[0] <= 2, (kind, reads1, reads2)
