"""Generate long-context instruction tasks with exact answers from the offline corpora (train.jsonl from
train works, test.jsonl from held-out works; LongAlpaca format)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from sinklora.config import option
from sinklora.data.tasks import TASKS
from sinklora.defaults import DEFAULT_MODEL


@dataclasses.dataclass
class TasksConfig:
    source: str = option("shakespeare", "corpus to build the texts from (a built-in name, folder, file or hf:NAME)")
    out_dir: str = option("runs/data/tasks", "folder for train.jsonl and test.jsonl")
    tasks: list[str] = option(help="tasks to generate", factory=lambda: list(TASKS))
    lengths: list[int] = option(help="target prompt lengths in tokens", factory=lambda: [4096, 8192, 16384])
    train_per_task: int = option(100, "train records per (task, length), from train works")
    test_per_task: int = option(20, "test records per (task, length), from held-out works")
    tokenizer: str = option(DEFAULT_MODEL, "tokenizer that measures lengths (model alias or path)")
    seed: int = option(0, "random seed")
    on_error: Literal["fail", "skip"] = option("fail", "source files that are not UTF-8 text: fail naming the file "
                                                       "and line, or skip them (counted)")

    def validate(self) -> list[str]:
        from sinklora.data.corpora import check_source, is_single_text_file

        errors = [f"tasks: {t!r} is not a task; choose from {', '.join(TASKS)}" for t in self.tasks if t not in TASKS]
        if (problem := check_source(self.source, "source")) is not None:
            errors.append(problem)
        elif is_single_text_file(self.source) and self.train_per_task and self.test_per_task:
            errors.append(f"source={self.source!r} is one document: it cannot be split into train and test works; "
                          "give a folder of several works, or set train_per_task=0 or test_per_task=0")
        errors += [f"lengths: {n} is too short; use >= 512 tokens" for n in self.lengths if n < 512]
        if self.train_per_task < 0 or self.test_per_task < 0:
            errors.append("train_per_task/test_per_task: must be >= 0")
        return errors


CONFIG = TasksConfig


def main(cfg: TasksConfig) -> int:
    from sinklora.data.corpora import load_documents
    from sinklora.data.mix import write_jsonl
    from sinklora.data.tasks import generate_tasks
    from sinklora.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer)
    out = Path(cfg.out_dir)
    made = []  # both splits are generated before either file is written
    for split, n, name in (("train", cfg.train_per_task, "train"), ("heldout", cfg.test_per_task, "test")):
        if n == 0:
            continue
        docs = load_documents(cfg.source, split, on_error=cfg.on_error)
        made.append((name, generate_tasks(docs, tokenizer, cfg.tasks, cfg.lengths, n, cfg.seed, name), docs))
    for name, records, docs in made:
        write_jsonl(records, out / f"{name}.jsonl")
        print(f"{name}: {len(records)} records from {len({d.work for d in docs})} works -> {out / f'{name}.jsonl'}")
    return 0
