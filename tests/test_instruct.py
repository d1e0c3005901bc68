"""Instruction data: loss masking through the chat template, truncation, validation, collation,
mixtures and the generated long-context tasks."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from sinklora.commands import data_mix, data_tasks
from sinklora.data import instruct, mix, tasks
from sinklora.data.corpora import Document
from sinklora.data.instruct import (
    IGNORE_INDEX,
    InstructCollator,
    build_example,
    length_grouped_batches,
    load_instructions,
)
from sinklora.defaults import LONGALPACA_PLUS

RECORD = {"instruction": "Summarise the text.", "input": "It was a dark and stormy night.", "output": "Rain fell."}


def chat_ids(tokenizer, messages, **kw) -> list[int]:
    """Token ids exactly as the tokenizer's own chat template produces them."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_labels_mask_exactly_the_prompt(tokenizer, system):
    ex = build_example(RECORD, tokenizer, max_len=512, system_prompt=system)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "Summarise the text.\n\nIt was a dark and stormy night."}]
    prompt = chat_ids(tokenizer, messages, add_generation_prompt=True)
    full = chat_ids(tokenizer, messages + [{"role": "assistant", "content": "Rain fell."}])
    assert ex["input_ids"] == full
    n = len(prompt)
    assert ex["input_ids"][:n] == prompt
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert ex["labels"][n:] == ex["input_ids"][n:] and IGNORE_INDEX not in ex["labels"][n:]
    assert tokenizer.decode(ex["input_ids"][n:]) == "Rain fell.<|im_end|>\n"


def test_fallback_template_without_chat_template(tokenizer):
    tokenizer.chat_template = None
    ex = build_example(RECORD, tokenizer, max_len=512)
    prompt = (f"{instruct.ALPACA_SYSTEM}\n\n### Instruction:\nSummarise the text.\n\nIt was a dark and stormy night."
              "\n\n### Response:\n")
    n = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert tokenizer.decode(ex["input_ids"][:n]) == prompt and ex["labels"][:n] == [IGNORE_INDEX] * n
    assert ex["input_ids"][n:] == tokenizer.encode("Rain fell.", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert ex["labels"][n:] == ex["input_ids"][n:]


def test_truncation_cuts_the_middle_of_the_input_only(tokenizer):
    words = " ".join(f"w{i}" for i in range(400))  # 1,889 byte tokens
    rec = {"instruction": "Find the first and last word.", "input": words, "output": "w0 and w399, " * 5}
    ex = build_example(rec, tokenizer, max_len=300)
    assert len(ex["input_ids"]) <= 300
    n = ex["labels"].count(IGNORE_INDEX)
    response = chat_ids(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": rec["output"]}])
    assert ex["labels"][n:] == response[-(len(ex["input_ids"]) - n):]  # the whole response survives
    assert tokenizer.decode(ex["input_ids"][n:]) == rec["output"] + "<|im_end|>\n"
    prompt = tokenizer.decode(ex["input_ids"][:n])
    assert "Find the first and last word.\n\nw0 w1 w2" in prompt and prompt.count(instruct.TRUNCATION_MARK) == 1
    head, tail = prompt.split(instruct.TRUNCATION_MARK)
    assert tail.rstrip().endswith("w398 w399<|im_end|>\n<|im_start|>assistant".rstrip())
    assert len(tokenizer.encode(head)) - len(tokenizer.encode(tail)) in range(-60, 61)  # a middle cut


@pytest.mark.parametrize("rec, truncate, pattern", [
    ({"instruction": "Q", "input": "short", "output": "x" * 400}, "middle", "without its input the prompt needs"),
    ({"instruction": "Q" * 400, "input": "", "output": "x"}, "middle", "there is no input to cut"),
    ({"instruction": "Q", "input": "y" * 400, "output": "x"}, "none", "truncate='none'"),
])
def test_examples_that_cannot_fit_raise(tokenizer, rec, truncate, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_example(rec, tokenizer, max_len=200, truncate=truncate)
    assert instruct.build_examples([rec, RECORD], tokenizer, 200, truncate=truncate)[0] == \
        build_example(RECORD, tokenizer, 200)  # skipped, the good one kept


def test_validation_names_file_record_and_field(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([RECORD, {"instruction": "a"}, {**RECORD, "input": 3}, "text", {**RECORD, "output": " "}]))
    with pytest.raises(ValueError) as err:
        load_instructions(path)
    msg = str(err.value)
    assert f"{path}: record 2: missing field 'output'" in msg
    assert f"{path}: record 3: field 'input' must be a string, got int" in msg
    assert f"{path}: record 4: expected an object" in msg and f"{path}: record 5: field 'output' is empty" in msg
    assert load_instructions(path, on_error="skip") == [RECORD]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(RECORD) + "\n\n" + json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl: record 2 \(line 3\): missing field 'instruction'"):
        load_instructions(jsonl)
    mapped = load_instructions(jsonl, columns={"instruction": "question", "output": "answer"}, on_error="skip")
    assert mapped == [RECORD, {"instruction": "q", "output": "a", "input": ""}]


def test_hf_instructions_with_column_mapping(monkeypatch):
    calls, rows = [], [{"q": "Why?", "ctx": "Because.", "a": "So."}, {"q": "How?"}]
    fake = types.SimpleNamespace(DatasetDict=dict, load_dataset=lambda name, split: calls.append((name, split)) or rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    recs = load_instructions("hf:org/qa:test", columns={"instruction": "q", "input": "ctx", "output": "a"},
                             on_error="skip")
    assert calls == [("org/qa", "test")] and recs == [{"instruction": "Why?", "input": "Because.", "output": "So."}]
    with pytest.raises(ValueError, match=r"org/qa\[test\]: record 2: missing field 'output'"):
        load_instructions("hf:org/qa:test", columns={"instruction": "q", "output": "a"})


def test_collator_pads_right():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = InstructCollator(pad_id=0, pad_to_multiple_of=4)(feats)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_length_grouped_batches():
    lengths = [(i * 37) % 101 for i in range(203)]
    batches = length_grouped_batches(lengths, batch_size=4, seed=1, mega_batches=5)
    assert sorted(i for b in batches for i in b) == list(range(203))
    assert batches == length_grouped_batches(lengths, batch_size=4, seed=1, mega_batches=5)
    assert all(lengths[b[k]] >= lengths[b[k + 1]] for b in batches for k in range(len(b) - 1))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 20  # random batches of 4 from 0..100 spread ~60


# ----------------------------------------------------------------------------- mixtures

def test_mixture_counts_are_exact_within_rounding():
    assert mix.mixture_counts(LONGALPACA_PLUS, 28000) == {
        "nq.jsonl": 12320, "redpajama.jsonl": 7560, "book_summarization.jsonl": 5040, "long_qa.jsonl": 3080}
    for total in (1, 7, 1001, 9999):
        ratios = {"a": 1, "b": 1, "c": 1, "d": 0.5}
        counts = mix.mixture_counts(ratios, total)
        assert sum(counts.values()) == total
        assert all(abs(counts[k] - total * v / 3.5) < 1 for k, v in ratios.items())
    with pytest.raises(ValueError, match="ratios must be numbers >= 0"):
        mix.mixture_counts({"a": -1}, 10)


def _write_source(path: Path, n: int, tag: str) -> str:
    path.write_text("\n".join(json.dumps({"instruction": f"{tag} {i}", "output": f"out {i}"}) for i in range(n)))
    return str(path)


def test_mix_sources(tmp_path, tokenizer):
    a, b = _write_source(tmp_path / "a.jsonl", 50, "A"), _write_source(tmp_path / "b.jsonl", 50, "B")
    recs = mix.mix_sources({a: 0.7, b: 0.3}, total=40, seed=3)
    assert sum(r["source"] == a for r in recs) == 28 and sum(r["source"] == b for r in recs) == 12
    assert all(r["instruction"].startswith("A" if r["source"] == a else "B") for r in recs)
    assert len({r["instruction"] for r in recs}) == 40  # no repeats without replacement
    assert recs == mix.mix_sources({a: 0.7, b: 0.3}, total=40, seed=3)
    assert [r["source"] for r in recs] != sorted(r["source"] for r in recs)  # shuffled
    small = _write_source(tmp_path / "s.jsonl", 5, "S")
    with pytest.raises(ValueError, match=r"s.jsonl' has 5 records but the mix needs 10"):
        mix.mix_sources({a: 0.5, small: 0.5}, total=20)
    rep = mix.mix_sources({small: 1.0}, total=12, allow_replacement=True)
    assert sorted(r["instruction"] for r in rep).count("S 0") >= 2 and len(rep) == 12
    table = mix.length_report(recs, mix.record_tokens(recs, tokenizer), tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000
    assert re.search(r"all\s+40\s+100.0%", table)


def test_mix_command(tmp_path, tokenizer, monkeypatch):
    from sinklora.config import load_config
    from sinklora.models import loading

    monkeypatch.setattr(loading, "load_tokenizer", lambda name: tokenizer)
    a = _write_source(tmp_path / "a.jsonl", 30, "A")
    cfg = load_config(data_mix.CONFIG, overrides={"sources": {a: 1.0}, "total": 10, "out": str(tmp_path / "m.jsonl")})
    assert data_mix.main(cfg) == 0
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 10 and (tmp_path / "m.png").is_file()


def test_mix_command_never_loses_data(tmp_path, tokenizer, monkeypatch, capsys):
    from sinklora.cli import main
    from sinklora.models import loading

    victim = _write_source(tmp_path / "victim.jsonl", 6, "V")
    before = (tmp_path / "victim.jsonl").read_text()
    # out is a source, or the report beside out would overwrite one
    assert main(["data", "mix", f"sources={{{victim}: 1.0}}", "total=2", f"out={victim}"]) == 2
    assert "would overwrite the source" in capsys.readouterr().err
    report = _write_source(tmp_path / "mix.txt", 6, "T")  # mix.jsonl's report would be mix.txt
    assert main(["data", "mix", f"sources={{{report}: 1.0}}", "total=2", f"out={tmp_path / 'mix.jsonl'}"]) == 2
    assert (tmp_path / "victim.jsonl").read_text() == before and not (tmp_path / "mix.jsonl").exists()
    # an existing out needs overwrite=true
    (tmp_path / "old.jsonl").write_text("keep me\n")
    assert main(["data", "mix", f"sources={{{victim}: 1.0}}", "total=2", f"out={tmp_path / 'old.jsonl'}"]) == 2
    assert "already exists; choose a new file or set overwrite=true" in capsys.readouterr().err
    assert (tmp_path / "old.jsonl").read_text() == "keep me\n"
    # a bad tokenizer is found before anything is written: one line naming the field
    out = tmp_path / "new.jsonl"
    assert main(["data", "mix", f"sources={{{victim}: 1.0}}", "total=2", f"out={out}",
                 f"tokenizer={tmp_path / 'no-such-model'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sinklora data mix: error: tokenizer=") and len(err.splitlines()) == 1
    assert not out.exists() and not out.with_suffix(".png").exists()
    monkeypatch.setattr(loading, "load_tokenizer", lambda name: tokenizer)
    assert main(["data", "mix", f"sources={{{victim}: 1.0}}", "total=2", f"out={tmp_path / 'old.jsonl'}",
                 "overwrite=true"]) == 0
    assert len((tmp_path / "old.jsonl").read_text().splitlines()) == 2
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed into place


# ----------------------------------------------------------------------------- generated tasks

ROMAN = ["I", "II", "III", "IV", "V"]


def fake_play(k: int) -> Document:
    lines = [f"THE PLAY NUMBER {k}", ""]
    for a in range(3):
        lines += [f"ACT {ROMAN[a]}.", ""]
        for s in range(3):
            lines += [f"Scene {ROMAN[s]}. A room.", ""]
            for j in range(6):
                lines += ["Ham.", f"In act {a} scene {s} speech {j} of play {k} we see Horatio,",
                          f"and this second line {j} follows the first in {k}.", ""]
    text = "\n".join(lines)
    return Document(f"play{k}", f"play{k}", text)


def test_next_line_act_scene_count_answers_match_the_source(tokenizer):
    docs = [fake_play(k) for k in range(3)]
    recs = tasks.generate_tasks(docs, tokenizer, list(tasks.TASKS), [900], per_task=4, seed=1)
    assert {r["task"] for r in recs} == set(tasks.TASKS) and all(r["output"] == r["answer"] for r in recs)
    by_work = {d.work: d.text.split("\n") for d in docs}
    for r in recs:
        assert 600 < r["tokens"] <= 900 - 64
        lines = by_work[r["work"]]
        if r["task"] == "next_line":
            quoted = re.search(r'after the line "(.*)"\?', r["instruction"]).group(1)
            assert lines[lines.index(quoted) + 1] == r["answer"] and quoted in r["input"]
        elif r["task"] == "act_scene":
            quoted = re.search(r'is the line "(.*)"\?', r["instruction"]).group(1)
            a, s, _ = re.match(r"In act (\d) scene (\d) speech (\d)", quoted).groups()
            assert r["answer"] == f"Act {int(a) + 1}, Scene {int(s) + 1}"
        elif r["task"] == "count_name":
            name = re.search(r'name "(\w+)"', r["instruction"]).group(1)
            assert r["answer"] == str(re.split(r"[^A-Za-z]+", r["input"]).count(name)) and int(r["answer"]) >= 2
        elif r["task"] == "passkey":
            assert r["input"].count(f"The pass key is {r['answer']}.") == 1
        else:
            assert f"is in the {r['answer']}." in r["input"]
    again = tasks.generate_tasks(docs, tokenizer, ["next_line"], [900], per_task=4, seed=1)
    assert again == [r for r in recs if r["task"] == "next_line"]


def test_tasks_command_splits_by_work(tmp_path, tokenizer, monkeypatch):
    from sinklora.config import load_config
    from sinklora.data.corpora import heldout_works
    from sinklora.models import loading

    monkeypatch.setattr(loading, "load_tokenizer", lambda name: tokenizer)
    folder = tmp_path / "plays"
    folder.mkdir()
    for k in range(12):
        (folder / f"play{k}.txt").write_text(fake_play(k).text)
    cfg = load_config(data_tasks.CONFIG, overrides={
        "source": str(folder), "out_dir": str(tmp_path / "out"), "lengths": [900], "tasks": ["passkey", "next_line"],
        "train_per_task": 3, "test_per_task": 2})
    assert data_tasks.main(cfg) == 0
    train = [json.loads(ln) for ln in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(ln) for ln in (tmp_path / "out" / "test.jsonl").read_text().splitlines()]
    assert len(train) == 6 and len(test) == 4
    held = heldout_works(f"play{k}.txt" for k in range(12))
    assert {r["work"] for r in test} <= held and not {r["work"] for r in train} & held
    assert all({"instruction", "input", "output", "task", "answer"} <= set(r) for r in train + test)
