"""`sinklora sft` on a tiny model: learning + exact-match evaluation, the batches the model receives
(labels -100 on prompts and pads, packed rows), bad records, refusals, resume, continuing a
`sinklora train` adapter, and reloading the result."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

from sinklora.config import ConfigError, load_config
from sinklora.data.instruct import IGNORE_INDEX
from sinklora.train.configs import SFTConfig
from sinklora.train.sft import SFTCollator, normalize_answer, pack_examples, run

QUESTION = "What is the capital of France?"


def _records(n: int = 8) -> list[dict]:
    # one instruction, inputs of different lengths (so batches need padding)
    return [{"instruction": QUESTION, "input": "x " * (5 * i), "output": "Paris"} for i in range(n)]


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    model, tok = tiny_llama(), tiny_tokenizer()  # 256 positions, ChatML template
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    _write_jsonl(root / "data.jsonl", _records())
    _write_jsonl(root / "tasks.jsonl", [{**r, "task": "capital", "answer": "Paris"} for r in _records(3)])
    return root


def _cfg(assets, out, **over) -> SFTConfig:
    base = {
        "model": str(assets / "model"), "data": str(assets / "data.jsonl"), "output_dir": str(out),
        "train": {"batch_size": 4, "learning_rate": 5e-3, "warmup_steps": 0, "seed": 3,
                  "activation_checkpointing": False, "logging_steps": 1},
    }
    for key, value in over.items():
        section, _, name = key.rpartition(".")
        (base.setdefault(section, {}) if section else base)[name] = value
    return load_config(SFTConfig, overrides=base)


def _capture():
    """A Trainer callback that records every batch exactly as the model's forward receives it."""
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        def __init__(self):
            self.batches: list[dict] = []

        def on_train_begin(self, args, state, control, model=None, **kw):
            def hook(module, args, kwargs):
                self.batches.append({k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)})

            model.register_forward_pre_hook(hook, with_kwargs=True)

    return Capture()


def _expected(tokenizer, record: dict) -> tuple[list[int], int]:
    """(token ids of the whole conversation, number of prompt tokens), from the chat template directly."""
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": record["instruction"] + ("\n\n" + record["input"] if record["input"] else "")}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": record["output"]}], tokenize=False)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(full), len(encode(prompt))


def test_sft_learns_the_answer_and_the_adapter_reloads(assets, tmp_path):
    out = tmp_path / "run"
    result = run(_cfg(assets, out, **{"train.max_steps": 40, "train.logging_steps": 5},
                      **{"eval.tasks": str(assets / "tasks.jsonl")}))
    summary, before, after = result["train"], result["before"], result["after"]
    assert summary["steps"] == 40 and summary["last_loss"] < summary["first_loss"] - 2.0
    assert before["accuracy"] == 0.0 and before["n"] == 3
    assert after["accuracy"] == 1.0 and after["by_task"] == {"capital": 1.0}
    assert json.loads((out / "results.json").read_text())["after"]["correct"] == 3
    assert "| capital | 0% | 100% |" in (out / "results.md").read_text()

    # the saved adapter reproduces the answers through the ordinary loader
    from sinklora.models.loading import load_model
    from sinklora.train.sft import evaluate_tasks

    model, tokenizer = load_model(assets / "model", adapter=out)
    again = evaluate_tasks(model, tokenizer, [json.loads(x) for x in (assets / "tasks.jsonl").read_text().split("\n")
                                              if x], system_prompt="You are a helpful assistant.", max_len=256)
    assert [r["prediction"] for r in again["records"]] == [r["prediction"] for r in after["records"]]


def test_padded_batches_mask_prompts_and_pads(assets, tmp_path):
    capture = _capture()
    run(_cfg(assets, tmp_path / "run", **{"train.max_steps": 2}), callbacks=[capture])
    tok = tiny_tokenizer()
    expected = [_expected(tok, r) for r in _records()]
    seen = []
    assert len(capture.batches) == 2
    for batch in capture.batches:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        assert ids.shape == labels.shape == mask.shape and ids.shape[0] == 4
        assert (mask == 0).any()  # lengths differ: some rows are padded
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
            assert (labels[row, n:] == IGNORE_INDEX).all() and (ids[row, n:] == tok.pad_token_id).all()
            full, n_prompt = next(e for e in expected if e[0] == ids[row, :n].tolist())
            assert (labels[row, :n_prompt] == IGNORE_INDEX).all()
            assert labels[row, n_prompt:n].tolist() == full[n_prompt:]
            seen.append(n)
    assert sorted(seen) == sorted(len(e[0]) for e in expected)  # one epoch: every example exactly once


def test_packed_rows_keep_examples_apart(assets, tmp_path):
    capture = _capture()
    result = run(_cfg(assets, tmp_path / "run", batching="packed", max_len=256, **{"train.batch_size": 1}),
                 callbacks=[capture])
    tok = tiny_tokenizer()
    expected = {tuple(full): n for full, n in (_expected(tok, r) for r in _records())}
    rows = result["data"]["micro_batches"]
    assert len(capture.batches) == rows < 8  # one epoch: fewer rows than examples
    seen = 0
    for batch in capture.batches:
        assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
        ids, labels, pos = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
        assert len(ids) <= 256
        starts = (pos == 0).nonzero().flatten().tolist() + [len(ids)]
        seen += len(starts) - 1
        for a, b in zip(starts, starts[1:]):
            n_prompt = expected[tuple(ids[a:b].tolist())]
            assert pos[a:b].tolist() == list(range(b - a))
            assert (labels[a:a + n_prompt] == IGNORE_INDEX).all() and labels[a + n_prompt:b].tolist() == ids[a + n_prompt:b].tolist()
    assert seen == 8


@pytest.mark.parametrize("pattern, params", [("full", {}), ("sf", {"group_size": 16})])
def test_packed_forward_equals_separate_forwards(pattern, params):
    from sinklora.hf.attention import use_attention

    model, tok = tiny_llama(), tiny_tokenizer()
    examples = [{"input_ids": list(range(10 + 7 * i, 50 + 9 * i)), "labels": [IGNORE_INDEX] * 40 + [5] * (9 * i - 7 * i)}
                for i in range(3)]
    batch = SFTCollator(tok.pad_token_id, packed=True)([examples])
    with use_attention(model, pattern, **params), torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([ex["input_ids"]]), use_cache=False).logits[0] for ex in examples])
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)


def test_pack_examples_fills_rows_without_overflow():
    lengths = [90, 60, 50, 40, 30, 20, 10, 100]
    rows = pack_examples(lengths, 100, seed=1)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 100 for r in rows)
    assert len(rows) == 4  # 400 tokens in rows of 100: best-fit packs them perfectly
    with pytest.raises(ValueError, match="max_len=50"):
        pack_examples(lengths, 50)


@pytest.mark.parametrize("text, answer, same", [
    ("Paris", "paris", True), ("  Act 2, Scene 1.\nmore", "Act 2, Scene 1", True),
    ("\"Paris.\"", "Paris", True), ("Paris is the capital", "Paris", False), ("12345", "1234", False),
])
def test_normalize_answer(text, answer, same):
    assert (normalize_answer(text) == normalize_answer(answer)) is same


def test_bad_records_fail_or_are_skipped(assets, tmp_path, caplog):
    good = _records(4)
    as_list = tmp_path / "data.json"
    as_list.write_text(json.dumps(good[:2] + [{"instruction": "Q", "input": ""}] + good[2:]))
    with pytest.raises(ValueError, match=r"data\.json: record 3: missing field 'output'"):
        run(_cfg(assets, tmp_path / "a", data=str(as_list)))
    lines = _write_jsonl(tmp_path / "data.jsonl", good[:1] + [{"instruction": 3, "output": "x"}] + good[1:])
    with pytest.raises(ValueError, match=r"data\.jsonl: record 2 \(line 2\): field 'instruction' must be a string"):
        run(_cfg(assets, tmp_path / "b", data=str(lines)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before any output
    with caplog.at_level(logging.WARNING):
        result = run(_cfg(assets, tmp_path / "c", data=str(lines), on_error="skip", **{"train.max_steps": 1}))
    assert result["data"]["examples"] == 4 and "skipped 1 invalid record(s) of 5" in caplog.text
    # other column names, mapped
    renamed = _write_jsonl(tmp_path / "qa.jsonl", [{"question": r["instruction"], "context": r["input"],
                                                    "answer": r["output"]} for r in good])
    result = run(_cfg(assets, tmp_path / "d", data=str(renamed), **{"train.max_steps": 1},
                      columns={"instruction": "question", "input": "context", "output": "answer"}))
    assert result["data"]["examples"] == 4


def test_refusals_name_the_problem(assets, tmp_path):
    cases = [
        ({"data": "/nonexistent.jsonl"}, "data='/nonexistent.jsonl'"),
        ({"columns": {"question": "q"}}, "keys must be among instruction, input, output"),
        ({"batching": "packed"}, "train.batch_size=4 with batching=packed"),
        ({"max_len": 512, "target_len": 256}, "max_len=512 > target_len=256"),
        ({"max_len": 64, "attention.group_size": 64}, "would be full attention"),
        ({"adapter": str(tmp_path)}, "no adapter_config.json"),
        ({"eval.tasks": "/missing.jsonl"}, "tasks='/missing.jsonl'"),
        ({"on_error": "ignore"}, "must be one of 'fail', 'skip'"),
    ]
    for over, message in cases:
        with pytest.raises(ConfigError, match=message):
            _cfg(assets, tmp_path / "x", **over)
    with pytest.raises(ConfigError, match="max_len=512 > target_len=256"):  # target_len from the model's config
        run(_cfg(assets, tmp_path / "x", max_len=512))
    with pytest.raises(ValueError, match="exceeds max_len=40"):  # an example that cannot fit, on_error=fail
        run(_cfg(assets, tmp_path / "x", max_len=40, **{"attention.group_size": 8}))


def test_resume_refuses_then_continues(assets, tmp_path):
    out = tmp_path / "run"
    run(_cfg(assets, out, **{"train.max_steps": 2, "train.save_steps": 2}))
    with pytest.raises(ValueError, match="resume=true"):
        run(_cfg(assets, out, **{"train.max_steps": 2}))
    result = run(_cfg(assets, out, resume=True, **{"train.max_steps": 4, "train.save_steps": 2}))
    assert result["train"]["steps"] == 4
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]


def test_continues_a_context_extension_adapter(assets, tmp_path):
    from safetensors.torch import load_file

    from sinklora.models.loading import load_model
    from sinklora.train.configs import ExtendConfig
    from sinklora.train.extend import run as run_extend

    data = tmp_path / "docs"
    data.mkdir()
    (data / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 30)
    extended = tmp_path / "extended"
    run_extend(load_config(ExtendConfig, overrides={
        "model": str(assets / "model"), "data": str(data), "output_dir": str(extended), "target_len": 512,
        "train_len": 128, "attention": {"group_size": 32}, "eval": {"enabled": False},
        "train": {"max_steps": 1, "learning_rate": 5e-3, "warmup_steps": 0, "activation_checkpointing": False}}))
    out = tmp_path / "sft"
    result = run(_cfg(assets, out, adapter=str(extended), **{"train.max_steps": 1}))
    assert result["config"]["target_len"] == 512 and result["config"]["max_len"] == 512  # from the RoPE record
    assert result["budget"]["factor"] == 2.0
    a, b = load_file(extended / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()  # the same LoRA+ adapter, trained further
    assert any(not torch.equal(a[k], b[k]) for k in a)
    model, tokenizer = load_model(assets / "model", adapter=out)
    assert model.config.rope_parameters["factor"] == 2.0 and model.config.max_position_embeddings == 512
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           tokenize=False)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids.shape[1] and torch.equal(generated[0, :ids.shape[1]], ids[0])

    # `sinklora export` merges it; the merged folder (extended RoPE inside) is a valid `model=` for more SFT
    from sinklora.models.export import export_merged

    merged = export_merged(assets / "model", out, tmp_path / "merged")
    again = run(_cfg(assets, tmp_path / "sft2", model=str(merged), **{"train.max_steps": 1}))
    assert again["config"]["target_len"] == 512 and again["budget"]["factor"] == 2.0
