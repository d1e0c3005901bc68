"""LongBench (v1, THUDM/LongBench) and LongBench-E from the JSONL files a user has, with LongBench's
prompts, answer lengths, truncation and metrics (:mod:`sinklora.eval.metrics`).

Data: a folder with ``{dataset}.jsonl`` (LongBench) or ``{dataset}_e.jsonl`` (LongBench-E), the layout
of LongBench's ``data.zip`` (a ``data/`` sub-folder is looked into too), one record per line with
``input``, ``context``, ``answers`` (list), ``length``, ``dataset``, ``language``, ``all_classes``
and ``_id``; or ``hf:THUDM/LongBench`` where a hub is reachable (needs ``datasets``).

As LongBench's ``pred.py`` and ``eval.py``:
- the prompt is ``dataset2prompt[dataset].format(**record)``; if it has more than ``max_length``
  tokens, the first and the last ``max_length // 2`` tokens are kept (decoded and joined: the middle
  goes, since instructions sit at both ends);
- chat models get the chat template except on trec, triviaqa, samsum, lsht, lcc and repobench-p
  (few-shot and code completion are continuations); the template is the tokenizer's own instead of
  LongBench's per-model ``build_chat``;
- greedy decoding of at most ``dataset2maxlen[dataset]`` tokens; samsum also stops at a newline after at
  least one token;
- on trec, triviaqa, samsum and lsht only the first line of the output counts; a record scores the best
  over its answers; a dataset the mean x 100 (2 decimals); LongBench-E splits records by their ``length``
  field (words, or characters in Chinese) into 0-4k, 4-8k and 8k+.
Averages: per category, the mean of its datasets; ``average`` the mean of the categories (LongBench's
"Avg"), ``dataset_average`` the mean of the datasets.

Where we differ: the chat template is the tokenizer's (LongBench hard-codes one per model); ``max_length``
defaults to the model's context minus 512 (LongBench's ``model2maxlen`` is set per model, e.g. 3500 for a
4k model); ``all_classes`` is each record's own (LongBench's ``eval.py`` uses the last record's for the
whole file; they are equal within a dataset); narrativeqa keeps the released prompt's "asconcisely".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sinklora.eval.generation import generate_answer
from sinklora.eval.metrics import METRICS
from sinklora.eval.suite_report import compression_table, fmt, kv_kept, markdown_table, mean

logger = logging.getLogger(__name__)

_QA_ONLY = "Only give me the answer and do not output any other words."
_PASSAGES = (f"Answer the question based on the given passages. {_QA_ONLY}\n\nThe following are given "
             f"passages.\n{{context}}\n\nAnswer the question based on the given passages. {_QA_ONLY}\n\n"
             "Question: {input}\nAnswer:")
_CONCISE = "as concisely as you can, using a single phrase"
# narrativeqa keeps the released "asconcisely" (the prompt behind the published scores; fixed upstream in 2024-09)
_NARRATIVE = "asconcisely as you can, using a single phrase"
_QASPER_RULE = ('If the question cannot be answered based on the information in the article, write "unanswerable". '
                'If the question is a yes/no question, answer "yes", "no", or "unanswerable". '
                "Do not provide any explanation.")
PROMPTS: dict[str, str] = {  # LongBench config/dataset2prompt.json
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
                   f"question {_NARRATIVE} if possible. Do not provide any explanation.\n\nStory: {{context}}\n\n"
                   f"Now, answer the question based on the story {_NARRATIVE} if possible. Do not provide any "
                   "explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": f"You are given a scientific article and a question. Answer the question {_CONCISE} or sentence if "
              f"possible. {_QASPER_RULE}\n\nArticle: {{context}}\n\n Answer the question based on the above article "
              f"{_CONCISE} or sentence if possible. {_QASPER_RULE}\n\nQuestion: {{input}}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
                       "question based on the above text, only give me the answer and do not output any other words."
                       "\n\nQuestion: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，"
                       "只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": _PASSAGES,
    "2wikimqa": _PASSAGES,
    "musique": _PASSAGES,
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n"
                "问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
                  "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query "
             "in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above "
             "meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
                  "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n"
            "{context}\n{input}",
    "triviaqa": f"Answer the question based on the given passage. {_QA_ONLY} The following are some examples.\n\n"
                "{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
              "{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
                     "carefully read these paragraphs and determine how many unique paragraphs there are after "
                     "removing duplicates. In other words, how many non-repeating paragraphs are there in total?"
                     "\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing "
                     "duplicates. The output format should only contain the number, such as 1, 2, 3, and so on."
                     "\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
                            "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n"
                            "{input}\n\nPlease enter the number of the paragraph that the abstract is from. The "
                            'answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n"
                            "{context}\n\n下面是一个摘要\n\n{input}\n\n"
                            '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
# dataset -> (category, metric, max answer tokens: config/dataset2maxlen.json)
DATASETS: dict[str, tuple[str, str, int]] = {
    "narrativeqa": ("Single-Document QA", "qa_f1", 128), "qasper": ("Single-Document QA", "qa_f1", 128),
    "multifieldqa_en": ("Single-Document QA", "qa_f1", 64), "multifieldqa_zh": ("Single-Document QA", "qa_f1_zh", 64),
    "hotpotqa": ("Multi-Document QA", "qa_f1", 32), "2wikimqa": ("Multi-Document QA", "qa_f1", 32),
    "musique": ("Multi-Document QA", "qa_f1", 32), "dureader": ("Multi-Document QA", "rouge_zh", 128),
    "gov_report": ("Summarization", "rouge", 512), "qmsum": ("Summarization", "rouge", 512),
    "multi_news": ("Summarization", "rouge", 512), "vcsum": ("Summarization", "rouge_zh", 512),
    "trec": ("Few-shot Learning", "classification", 64), "triviaqa": ("Few-shot Learning", "qa_f1", 32),
    "samsum": ("Few-shot Learning", "rouge", 128), "lsht": ("Few-shot Learning", "classification", 64),
    "passage_count": ("Synthetic Tasks", "count", 32), "passage_retrieval_en": ("Synthetic Tasks", "retrieval", 32),
    "passage_retrieval_zh": ("Synthetic Tasks", "retrieval_zh", 32),
    "lcc": ("Code Completion", "code_sim", 64), "repobench-p": ("Code Completion", "code_sim", 64),
}
CATEGORIES = ["Single-Document QA", "Multi-Document QA", "Summarization", "Few-shot Learning", "Synthetic Tasks",
              "Code Completion"]
E_DATASETS = ["qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
              "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p"]
NO_CHAT = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
FIRST_LINE = {"trec", "triviaqa", "samsum", "lsht"}
E_BUCKETS = ("0-4k", "4-8k", "8k+")
REQUIRED = ("input", "context", "answers", "length", "all_classes")


def e_bucket(length: int) -> str:
    """LongBench-E's bucket of a record's ``length`` field."""
    return E_BUCKETS[0] if length < 4000 else E_BUCKETS[1] if length < 8000 else E_BUCKETS[2]


def check_record(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object (a LongBench record), got {type(record).__name__}")
    missing = [f for f in REQUIRED if f not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}; LongBench records have "
                         "input, context, answers, length, dataset, language, all_classes, _id")
    if not isinstance(record["answers"], list) or not record["answers"]:
        raise ValueError(f"{where}: 'answers' must be a non-empty list of strings")
    return record


def data_file(folder: str | Path, dataset: str, e: bool = False) -> Path | None:
    name = f"{dataset}_e.jsonl" if e else f"{dataset}.jsonl"
    folder = Path(folder).expanduser()
    for candidate in (folder / name, folder / "data" / name):
        if candidate.is_file():
            return candidate
    return None


def available_datasets(data: str, e: bool = False) -> list[str]:
    """The datasets of the version (LongBench or LongBench-E) that ``data`` holds, in LongBench's order."""
    names = E_DATASETS if e else list(DATASETS)
    if data.startswith("hf:"):
        return names
    return [d for d in names if data_file(data, d, e) is not None]


def load_records(data: str, dataset: str, e: bool = False, limit: int | None = None) -> list[dict]:
    """Records of ``dataset`` from a folder of JSONL files, or ``hf:REPO`` (config ``dataset[_e]``, split test)."""
    from sinklora.data.files import import_datasets, read_json_records

    if dataset not in DATASETS:
        raise ValueError(f"dataset {dataset!r} is not a LongBench dataset; choose from {', '.join(DATASETS)}")
    if data.startswith("hf:"):
        rows = import_datasets().load_dataset(data[3:], f"{dataset}_e" if e else dataset, split="test")
        found = [(f"{data} {dataset}: record {i + 1}", dict(r)) for i, r in enumerate(rows)]
    else:
        path = data_file(data, dataset, e)
        if path is None:
            raise FileNotFoundError(f"data={data!r}: no {dataset}{'_e' if e else ''}.jsonl there (nor in data/); "
                                    "unpack LongBench's data.zip into that folder")
        found = read_json_records(path)
    records = [check_record(r, where) for where, r in found]
    return records[:limit] if limit is not None else records


def build_prompt(tokenizer: Any, record: dict, dataset: str, max_length: int, chat: bool) -> tuple[str, list[int]]:
    """-> (prompt text, ids): LongBench's template, middle truncation to ``max_length`` tokens, chat template."""
    prompt = PROMPTS[dataset].format(**record)
    ids = list(tokenizer(prompt, verbose=False).input_ids)
    if len(ids) > max_length:
        half = int(max_length / 2)
        prompt = (tokenizer.decode(ids[:half], skip_special_tokens=True)
                  + tokenizer.decode(ids[-half:], skip_special_tokens=True))
    if chat and dataset not in NO_CHAT:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return text, list(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
    return prompt, list(tokenizer(prompt, verbose=False).input_ids)


def score_record(dataset: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None) -> float:
    """LongBench's score of one record in [0, 1]: the best over its answers."""
    if dataset in FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[DATASETS[dataset][1]]
    return max(metric(prediction, str(a), all_classes=all_classes) for a in answers)


def run_longbench(model: Any, tokenizer: Any, data: dict[str, list[dict]], settings: Sequence[Any],
                  max_length: int, chat: bool, progress: bool = True) -> list[dict[str, Any]]:
    """Predict and score every record of every dataset under every setting. -> one row per (setting, record)
    with LongBench's prediction fields (``pred``, ``answers``, ``all_classes``, ``length``, ``_id``)."""
    from tqdm.auto import tqdm

    rows = []
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1:]
    bar = tqdm(total=sum(map(len, data.values())) * len(settings), desc="longbench", disable=not progress)
    for setting in settings:
        for dataset, records in data.items():
            for record in records:
                text, ids = build_prompt(tokenizer, record, dataset, max_length, chat)
                t0 = time.perf_counter()
                samsum = {"stop_ids": newline, "min_new_tokens": 1} if dataset == "samsum" else {}
                out = generate_answer(model, tokenizer, ids, DATASETS[dataset][2], setting, **samsum)
                pred = tokenizer.decode(out.ids, skip_special_tokens=True)
                score = score_record(dataset, pred, record["answers"], record.get("all_classes"))
                rows.append({"cache": setting.name, "dataset": dataset, "pred": pred, "answers": record["answers"],
                             "all_classes": record.get("all_classes"), "length": record["length"],
                             "_id": record.get("_id"), "prompt_tokens": len(ids), "score": score,
                             "seconds": round(time.perf_counter() - t0, 3), "cache_stats": out.cache_stats})
                bar.update(1)
                bar.set_postfix(cache=setting.name, dataset=dataset)
    bar.close()
    return rows


def summarize(rows: Sequence[dict[str, Any]], datasets: Sequence[str], settings: Sequence[str],
              e: bool = False) -> list[dict[str, Any]]:
    """Per setting: ``datasets`` (score 0-100, 2 decimals), ``buckets`` (LongBench-E), ``categories``,
    ``average`` (mean of categories), ``dataset_average`` and ``kv_kept``."""
    out = []
    for name in settings:
        mine = [r for r in rows if r["cache"] == name]
        scores, buckets = {}, {}
        for d in datasets:
            cell = [r["score"] for r in mine if r["dataset"] == d]
            scores[d] = round(100 * sum(cell) / len(cell), 2) if cell else None
            if e:
                buckets[d] = {}
                for b in E_BUCKETS:
                    part = [r["score"] for r in mine if r["dataset"] == d and e_bucket(r["length"]) == b]
                    buckets[d][b] = round(100 * sum(part) / len(part), 2) if part else None
        categories = {c: mean([scores[d] for d in datasets if DATASETS[d][0] == c]) for c in CATEGORIES}
        categories = {c: v for c, v in categories.items() if v is not None}
        entry = {"cache": name, "datasets": scores, "categories": categories,
                 "average": mean(list(categories.values())),
                 "dataset_average": mean(list(scores.values())), "kv_kept": kv_kept([r["cache_stats"] for r in mine]),
                 **{f"category_{c}": v for c, v in categories.items()}}
        if e:
            entry["buckets"] = buckets
            entry["bucket_average"] = {b: mean([buckets[d][b] for d in datasets]) for b in E_BUCKETS}
        out.append(entry)
    return out


def longbench_markdown(summary: Sequence[dict[str, Any]], datasets: Sequence[str], title: str, e: bool = False) -> str:
    """Datasets x cache settings, categories x settings, then score vs compression."""
    names = [s["cache"] for s in summary]
    parts = [f"## LongBench{'-E' if e else ''}: {title}", ""]
    rows = [[d, DATASETS[d][0], DATASETS[d][1]] + [fmt(s["datasets"][d], 2) for s in summary] for d in datasets]
    parts += [markdown_table(["dataset", "category", "metric"] + names, rows), ""]
    cats = [c for c in CATEGORIES if any(c in s["categories"] for s in summary)]
    rows = [[c] + [fmt(s["categories"].get(c), 2) for s in summary] for c in cats]
    rows.append(["**average** (of categories)"] + [f"**{fmt(s['average'], 2)}**" for s in summary])
    rows.append(["average of datasets"] + [fmt(s["dataset_average"], 2) for s in summary])
    parts += [markdown_table(["category"] + names, rows), ""]
    if e:
        for s in summary:
            rows = [[d] + [fmt(s["buckets"][d][b], 2) for b in E_BUCKETS] for d in datasets]
            rows.append(["**average**"] + [fmt(s["bucket_average"][b], 2) for b in E_BUCKETS])
            parts += [f"### LongBench-E length buckets, cache {s['cache']}", "",
                      markdown_table(["dataset"] + list(E_BUCKETS), rows), ""]
    parts += ["### score vs compression", "",
              compression_table(summary, [(c, f"category_{c}") for c in cats]), ""]
    return "\n".join(parts)
