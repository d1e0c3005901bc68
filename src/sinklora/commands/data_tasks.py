"""Generate long-context instruction tasks with exact answers from the offline corpora (train.jsonl from
train works, test.jsonl from held-out works; LongAlpaca format)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

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

    def validate(self) -> list[str]:
        errors = [f"tasks: {t!r} is not a task; choose from {', '.join(TASKS)}" for t in self.tasks if t not in TASKS]
        errors += [f"lengths: {n} is too short; use >= 512 tokens" for n in self.lengths if n < 512]
        if self.train_per_task < 0 or self.test_per_task < 0:
            errors.append("train_per_task/test_per_task: must be >= 0")
        return errors


CONFIG = TasksConfig


def main(cfg: TasksConfig) -> int:
    import json

    from sinklora.data.corpora import load_documents
    from sinklora.data.tasks import generate_tasks
    from sinklora.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, n, name in (("train", cfg.train_per_task, "train"), ("heldout", cfg.test_per_task, "test")):
        if n == 0:
            continue
        docs = load_documents(cfg.source, split)
        records = generate_tasks(docs, tokenizer, cfg.tasks, cfg.lengths, n, cfg.seed, name)
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        print(f"{name}: {len(records)} records from {len({d.work for d in docs})} works -> {out / f'{name}.jsonl'}")
    return 0
