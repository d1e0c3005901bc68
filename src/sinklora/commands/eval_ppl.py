"""Perplexity of a model on held-out documents at several context lengths (sliding window or LongLoRA's
protocol; docs/method.md §5). Writes results.json, perplexity.png and config.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sinklora.config import option
from sinklora.defaults import PPL_CHUNK_TOKENS
from sinklora.settings import EvalModelOptions


@dataclass
class PerplexityConfig(EvalModelOptions):
    output_dir: str = option("outputs/eval/ppl", "folder for results.json, perplexity.png and config.yaml")
    corpus: str = option("books", "documents: a corpus name, a .txt/.md file, a folder, a .json/.jsonl file or hf:NAME")
    split: Literal["train", "heldout", "all"] = option("heldout", "which documents of the corpus (a single text file "
                                                                  "is used whole)")
    on_error: Literal["fail", "skip"] = option("fail", "text files that are not UTF-8 (or binary): fail naming the "
                                                       "file and line, or skip them (counted)")
    lengths: list[int] = option(help="context lengths to evaluate", factory=lambda: [2048, 4096, 8192])
    stride: int | None = option(
        None, "window step; sliding: default = the context length; longlora: default 256"
    )
    protocol: Literal["sliding", "longlora"] = option(
        "sliding", "sliding = standard token-weighted sliding window; longlora = LongLoRA eval.py windows"
    )
    max_docs: int | None = option(None, "use at most this many documents (in corpus order)")
    max_tokens_per_doc: int | None = option(None, "keep only the first N tokens of each document")
    chunk_tokens: int = option(PPL_CHUNK_TOKENS, "positions per output-embedding chunk (bounds logits memory)")

    def validate(self) -> list[str]:
        from sinklora.data.corpora import check_source

        errors = super().validate()
        if (problem := check_source(self.corpus, "corpus")) is not None:
            errors.append(problem)
        if not self.lengths or any(n < 2 for n in self.lengths):
            errors.append(f"lengths={self.lengths}: give one or more context lengths >= 2, e.g. lengths=2048,4096")
        if self.stride is not None and self.stride < 1:
            errors.append(f"stride={self.stride}: must be >= 1, or omit it")
        if (self.protocol == "sliding" and self.stride is not None and self.lengths
                and self.stride > min(self.lengths)):
            errors.append(f"stride={self.stride}: exceeds the shortest length {min(self.lengths)}; "
                          "use stride <= every context length")
        if self.max_docs is not None and self.max_docs < 1:
            errors.append(f"max_docs={self.max_docs}: must be >= 1, or omit it for all documents")
        if self.max_tokens_per_doc is not None and self.lengths and self.max_tokens_per_doc < max(self.lengths):
            errors.append(f"max_tokens_per_doc={self.max_tokens_per_doc}: smaller than the longest length "
                          f"{max(self.lengths)}, so that length would skip every document; raise it or omit it")
        if self.chunk_tokens < 1:
            errors.append(f"chunk_tokens={self.chunk_tokens}: must be >= 1")
        return errors


CONFIG = PerplexityConfig


def main(cfg: PerplexityConfig) -> int:
    import time

    from sinklora.config import save_config
    from sinklora.data.corpora import load_documents
    from sinklora.data.packing import tokenize_documents
    from sinklora.eval import plots
    from sinklora.eval.perplexity import evaluate_perplexity
    from sinklora.eval.results import run_metadata, write_results

    out = Path(cfg.output_dir)
    docs = load_documents(cfg.corpus, cfg.split, on_error=cfg.on_error)
    if cfg.max_docs is not None:
        docs = docs[: cfg.max_docs]
    if not docs:
        raise ValueError(f"corpus={cfg.corpus!r} split={cfg.split!r}: no documents; choose another corpus or split")
    model, tokenizer = cfg.load()
    token_lists = tokenize_documents(docs, tokenizer)
    t0 = time.perf_counter()
    result = evaluate_perplexity(model, token_lists, cfg.lengths, cfg.stride, cfg.protocol,
                                 cfg.max_tokens_per_doc, chunk_tokens=cfg.chunk_tokens)
    payload = {
        "kind": "perplexity",
        "label": cfg.label,
        "metadata": run_metadata(model=cfg.model, adapter=cfg.adapter, pattern="full", lengths=cfg.lengths,
                                 loaded_model=model, corpus=cfg.corpus, split=cfg.split,
                                 documents=[d.name for d in docs], wall_seconds=round(time.perf_counter() - t0, 2)),
        **result,
    }
    save_config(cfg, out / "config.yaml")
    write_results(payload, out / "results.json")
    plots.plot_perplexity([payload], out / "perplexity.png")
    print(f"{'context':>8} {'ppl':>10} {'tokens':>10} {'docs':>5} {'skipped':>7}")
    for row in result["by_length"]:
        print(f"{row['context_len']:>8} {row['ppl']:>10.4f} {row['tokens']:>10} "
              f"{row['docs_used']:>5} {row['docs_skipped']:>7}")
    print(f"results: {out / 'results.json'}")
    return 0
