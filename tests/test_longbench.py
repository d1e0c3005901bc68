"""`sinklora eval longbench`: each LongBench metric against values computed by hand, prompt assembly and
middle truncation on made-up records in LongBench's JSONL format, scoring and averages, loading, and the
command end to end on a tiny model (full cache, H2O at 50%, LongBench-E buckets)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

from sinklora.config import ConfigError, load_config
from sinklora.eval import longbench as lb
from sinklora.eval import metrics as m


def record(dataset: str = "hotpotqa", context: str = "Alice wrote the book in 1900.", question: str = "Who wrote it?",
           answers=("Alice",), length: int = 6, all_classes=None, _id: str = "id0") -> dict:
    """A record in LongBench's official JSONL layout (made up)."""
    return {"input": question, "context": context, "answers": list(answers), "length": length, "dataset": dataset,
            "language": "en", "all_classes": all_classes, "_id": _id}


# ----------------------------------------------------------------------------- metrics, by hand

def test_qa_f1_normalises_like_squad():
    # "The cat sat on the mat." -> [cat, sat, on, mat]; "a cat on mat" -> [cat, on, mat]: P 3/4, R 1
    assert m.qa_f1_score("The cat sat on the mat.", "a cat on mat") == pytest.approx(2 * 0.75 / 1.75)
    assert m.qa_f1_score("Paris!", "paris") == 1.0
    assert m.qa_f1_score("London", "Paris") == 0.0
    assert m.qa_f1_score("", "Paris") == 0.0
    # multiset overlap: [the] removed, [a, a] vs [a]: "b b c" vs "b c c" -> common b, c: P 2/3, R 2/3
    assert m.qa_f1_score("b b c", "b c c") == pytest.approx(2 / 3)


def test_qa_f1_zh_uses_jieba_words_and_chinese_punctuation():
    # jieba: 我爱北京 -> [我, 爱, 北京]; 北京。 -> [北京, 。] and 。 normalises away
    assert m.qa_f1_zh_score("我爱北京", "北京") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert m.qa_f1_zh_score("北京。", "北京") == 1.0
    assert m.normalize_zh_answer("Ａ 北京，“好” ") == "ａ北京好"


def test_rouge_is_the_rouge_package_summary_level_lcs():
    # rouge 1.0.1 ROUGE-L: LCS 3 over 5 distinct reference words (the, cat, sat, on, mat) and 3 hypothesis words:
    # R 3/5, P 1, F = 2PR / (P + R) = 0.75
    assert m.rouge_score("the cat sat", "the cat sat on the mat") == pytest.approx(0.75, abs=1e-6)
    assert m.rouge_score("", "the cat") == 0.0  # the package raises on an empty hypothesis: LongBench scores 0
    # jieba: 今天天气很好 -> [今天天气, 很, 好], 天气很好 -> [天气, 很, 好]: LCS 2 of 3 each -> F 2/3
    assert m.rouge_zh_score("今天天气很好", "天气很好") == pytest.approx(2 / 3, abs=1e-6)


def test_classification_keeps_longbench_quirks():
    classes = ["Location", "Person", "Number", "Description"]
    assert m.classification_score("Person", "Person", all_classes=classes) == 1.0
    assert m.classification_score("Person or Location", "Person", all_classes=classes) == 0.5
    assert m.classification_score("no idea", "Person", all_classes=classes) == 0.0  # no difflib fall-back
    # "A" is dropped as a substring of the answer while iterating, so "AB" is skipped and stays: 1/2, not 1
    assert m.classification_score("ABC", "ABC", all_classes=["A", "AB", "ABC"]) == 0.5


def test_retrieval_and_count_are_shares_of_numbers():
    assert m.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert m.retrieval_score("Paragraph 3, or maybe 12", "Paragraph 3") == 0.5
    assert m.retrieval_score("none", "Paragraph 3") == 0.0
    assert m.retrieval_zh_score("段落3和段落4", "段落3") == 0.5
    assert m.count_score("There are 5 unique paragraphs: 5", 5) == 1.0
    assert m.count_score("4 or 5 or 6 or 7", "5") == 0.25


def test_code_similarity_reads_the_first_code_line():
    assert m.code_sim_score("```python\n# the next line\nx = foo(1)\nmore", "x = foo(1)") == 1.0
    # difflib: " = foo(" and ")" match, 8 of 10 characters each side -> 2 * 8 / 20 = 0.80
    assert m.code_sim_score("\n\ny = foo(2)", "x = foo(1)") == 0.8
    assert m.code_sim_backend() in ("difflib", "python-Levenshtein")


def test_score_record_takes_the_first_line_on_few_shot_and_the_best_answer():
    assert lb.score_record("triviaqa", "\nParis\nQuestion: what else", ["London", "Paris"], None) == 1.0
    assert lb.score_record("hotpotqa", "Paris\nLondon", ["Paris"], None) == pytest.approx(2 / 3)  # all lines count
    assert lb.score_record("trec", "Location\nPerson", ["Person"], ["Location", "Person"]) == 0.0


# ----------------------------------------------------------------------------- prompts and truncation

@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_prompt_is_the_dataset_template_filled_with_the_record(tok):
    rec = record()
    text, ids = lb.build_prompt(tok, rec, "hotpotqa", max_length=10_000, chat=False)
    assert text == (
        "Answer the question based on the given passages. Only give me the answer and do not output any other words."
        "\n\nThe following are given passages.\nAlice wrote the book in 1900.\n\nAnswer the question based on the "
        "given passages. Only give me the answer and do not output any other words.\n\nQuestion: Who wrote it?\n"
        "Answer:")
    assert ids == list(tok(text).input_ids)
    code = lb.build_prompt(tok, record("repobench-p", context="import os\n", question="def f():\n"), "repobench-p",
                           10_000, chat=False)[0]
    assert code == "Please complete the code given below. \nimport os\ndef f():\nNext line of code:\n"


def test_chat_template_except_on_few_shot_and_code(tok):
    chat_text, chat_ids = lb.build_prompt(tok, record(), "hotpotqa", 10_000, chat=True)
    assert chat_text.startswith("<|im_start|>user\nAnswer the question")
    assert chat_text.endswith("<|im_start|>assistant\n")
    assert chat_ids == list(tok(chat_text, add_special_tokens=False).input_ids)
    for dataset in ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"):
        text, _ = lb.build_prompt(tok, record(dataset, all_classes=["A"]), dataset, 10_000, chat=True)
        assert "<|im_start|>" not in text


def test_middle_truncation_keeps_both_ends(tok):
    context = "".join(f"<{i:04d}>" for i in range(400))  # 2400 byte-tokens, each position recognisable
    rec = record("narrativeqa", context=context, question="Who is the hero?")
    text, ids = lb.build_prompt(tok, rec, "narrativeqa", max_length=1000, chat=False)
    full = lb.PROMPTS["narrativeqa"].format(**rec)
    assert text == full[:500] + full[-500:]  # byte tokenizer: tokens are characters here
    assert len(ids) == 1000 and text.startswith("You are given a story")
    assert text.endswith("Question: Who is the hero?\n\nAnswer:")
    assert "<0000>" in text and "<0399>" not in text[:600] and "<0200>" not in text
    short, _ = lb.build_prompt(tok, record("narrativeqa", context="tiny"), "narrativeqa", 1000, chat=False)
    assert "Story: tiny" in short  # under the limit: untouched
    chat_text, chat_ids = lb.build_prompt(tok, rec, "narrativeqa", max_length=1000, chat=True)
    assert full[:500] + full[-500:] in chat_text and len(chat_ids) > 1000  # the template comes on top, as LongBench


# ----------------------------------------------------------------------------- data, scores and averages

def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def test_loading_a_folder_of_longbench_files(tmp_path):
    write_jsonl(tmp_path / "data" / "hotpotqa.jsonl", [record(_id=str(i)) for i in range(3)])
    write_jsonl(tmp_path / "data" / "qasper_e.jsonl", [record("qasper")])
    assert lb.available_datasets(str(tmp_path)) == ["hotpotqa"]
    assert lb.available_datasets(str(tmp_path), e=True) == ["qasper"]
    assert [r["_id"] for r in lb.load_records(str(tmp_path), "hotpotqa", limit=2)] == ["0", "1"]
    with pytest.raises(FileNotFoundError, match="no musique.jsonl there"):
        lb.load_records(str(tmp_path), "musique")
    bad = record()
    del bad["answers"]
    write_jsonl(tmp_path / "trec.jsonl", [bad])
    with pytest.raises(ValueError, match=r"trec.jsonl: record 1 \(line 1\): missing field\(s\) answers"):
        lb.load_records(str(tmp_path), "trec")


def test_summary_categories_average_and_e_buckets():
    def row(dataset, score, length=100, cache="full"):
        return {"cache": cache, "dataset": dataset, "score": score, "length": length,
                "cache_stats": {"kept_tokens": 10, "seen_tokens": 10}}

    rows = [row("hotpotqa", 1.0, 3999), row("hotpotqa", 0.0, 4000), row("musique", 0.5, 8000), row("trec", 1.0, 9000)]
    (s,) = lb.summarize(rows, ["hotpotqa", "musique", "trec"], ["full"], e=True)
    assert s["datasets"] == {"hotpotqa": 50.0, "musique": 50.0, "trec": 100.0}
    assert s["categories"] == {"Multi-Document QA": 50.0, "Few-shot Learning": 100.0}
    assert s["average"] == 75.0 and s["dataset_average"] == pytest.approx(200 / 3)
    assert s["buckets"]["hotpotqa"] == {"0-4k": 100.0, "4-8k": 0.0, "8k+": None}
    assert s["buckets"]["musique"]["8k+"] == 50.0 and s["kv_kept"] == 1.0
    assert lb.e_bucket(3999) == "0-4k" and lb.e_bucket(4000) == "4-8k" and lb.e_bucket(8000) == "8k+"
    table = lb.longbench_markdown([s], ["hotpotqa", "musique", "trec"], "t", e=True)
    assert "| **average** (of categories) | **75.00** |" in table and "0-4k" in table


# ----------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("longbench")
    tiny_llama(seed=2, max_position_embeddings=1024).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    data = root / "data"
    long_ctx = " ".join(f"Paragraph {i}: filler text number {i}." for i in range(60))  # > 1024 - 512 tokens
    write_jsonl(data / "hotpotqa.jsonl", [record(context=long_ctx, _id=f"h{i}", length=500 * i) for i in range(3)])
    write_jsonl(data / "trec.jsonl", [record("trec", context="Q: where? Type: Location", question="Q: who?",
                                             answers=["Person"], all_classes=["Location", "Person"], _id="t0")])
    write_jsonl(data / "samsum.jsonl", [record("samsum", context="Dialogue: a\nSummary: b", question="Dialogue: c",
                                               answers=["c happened"], _id="s0")])
    write_jsonl(data / "passage_count.jsonl", [record("passage_count", answers=["3"], _id="p0")])
    write_jsonl(data / "hotpotqa_e.jsonl", [record(_id=f"e{i}", length=n) for i, n in enumerate((100, 5000, 9000))])
    return root




def test_generate_answer_matches_generate_and_honours_stops(one_thread):
    from sinklora.eval.generation import generate_answer
    from sinklora.settings import CacheOptions

    model, tok = tiny_llama(seed=4), tiny_tokenizer()
    model.generation_config.eos_token_id = None  # random weights: only our stops end a generation
    prompt = list(tok("Some prompt text, long enough.").input_ids)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=12, pad_token_id=256)[0, len(prompt):].tolist()
    out = generate_answer(model, tok, prompt, 12)
    assert out.ids == plain and out.cache_stats["seen_tokens"] == len(prompt) + 11  # the last token is never fed
    stop = plain[3] if plain[3] not in plain[:3] else plain[0]
    cut = generate_answer(model, tok, prompt, 12, CacheOptions(), stop_ids=[stop]).ids
    assert cut == plain[:plain.index(stop) + 1]  # LongBench's samsum: stop at the newline, keep it
    first = generate_answer(model, tok, prompt, 3, stop_ids=[plain[0]], min_new_tokens=1).ids
    assert first[0] != plain[0]  # a stop token is not allowed as the first token
    h2o = generate_answer(model, tok, prompt, 4, CacheOptions("h2o", "0.5", budget_floor=0, slack=0))
    assert h2o.cache_stats["policy"] == "h2o" and h2o.cache_stats["kept_tokens"] < h2o.cache_stats["seen_tokens"]


def test_command_end_to_end_full_and_h2o(assets, tmp_path, one_thread):
    from sinklora.cli import main

    out = tmp_path / "lb"
    assert main(["eval", "longbench", f"model={assets / 'model'}", f"data={assets / 'data'}",
                 "caches=full,h2o:0.5", f"output_dir={out}"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["datasets"] == ["hotpotqa", "trec", "samsum", "passage_count"]  # LongBench's order
    assert result["metadata"]["max_length"] == 1024 - 512 and result["metadata"]["records"]["hotpotqa"] == 3
    full, h2o = result["summary"]
    assert full["kv_kept"] == 1.0 and 0.4 < h2o["kv_kept"] < 0.65
    assert all(0.0 <= v <= 100.0 for s in result["summary"] for v in s["datasets"].values())
    preds = [json.loads(x) for x in (out / "predictions" / "h2o@0.5" / "hotpotqa.jsonl").read_text().splitlines()]
    assert [p["_id"] for p in preds] == ["h0", "h1", "h2"] and set(preds[0]) == {"pred", "answers", "all_classes",
                                                                               "length", "_id"}
    samsum = json.loads((out / "predictions" / "full" / "samsum.jsonl").read_text())
    assert samsum["pred"].count("\n") <= 1 and samsum["pred"]  # stops at the first newline, never empty
    table = (out / "longbench.md").read_text()
    assert "Few-shot Learning" in table and "score vs compression" in table and (out / "longbench.png").is_file()


def test_command_longbench_e_with_one_cache(assets, tmp_path, one_thread):
    from sinklora.commands.eval_longbench import CONFIG, main

    cfg = load_config(CONFIG, overrides=[f"model={assets / 'model'}", f"data={assets / 'data'}", "e=true",
                                         "cache=h2o", "budget=0.5", "max_length=300", f"output_dir={tmp_path / 'e'}"])
    assert main(cfg) == 0
    result = json.loads((tmp_path / "e" / "results.json").read_text())
    assert result["kind"] == "longbench-e" and result["datasets"] == ["hotpotqa"]
    assert set(result["summary"][0]["buckets"]["hotpotqa"]) == {"0-4k", "4-8k", "8k+"}


def test_config_errors(tmp_path):
    from sinklora.commands.eval_longbench import CONFIG

    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, overrides=[f"data={tmp_path / 'nowhere'}", "datasets=hotpotqa,lsht", "e=true",
                                       "limit=0", "cache=snapkv"])
    text = str(err.value)
    assert "no such folder; unpack LongBench's data.zip" in text
    assert "'lsht' not in LongBench-E" in text and "limit=0: must be >= 1" in text and "budget is required" in text
