"""Every default that more than one module uses, defined once (torch-free, imported by configs).

Method defaults follow the paper (docs/method.md §1-§3); the values here are what a config field,
a library function and a ``--help`` text all show.
"""

from __future__ import annotations

# the default model: SmolLM2-135M-Instruct, shipped as a GGUF in a PyPI wheel (models/loading.py)
DEFAULT_MODEL = "smollm2-135m-instruct"
# the system message of chat templates: `sinklora sft` trains with it, `chat` and `serve` answer with it
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# training attention (docs/method.md §2)
GROUP_RATIO = 0.25  # G = int(N * ratio): LongLoRA's N/4
SHIFTED_HEAD_FRACTION = 0.5  # heads h >= H // 2 are shifted by G // 2 (LongLoRA)
SF_SINK_TOKENS = 4  # global sink tokens of `sf`

# the paper's optimiser recipe (docs/method.md §1): AdamW, LR 2e-5, 20 warm-up steps, then constant
LEARNING_RATE = 2e-5
WARMUP_STEPS = 20

# KV caches (docs/method.md §3)
CACHE_SINK_TOKENS = 4  # StreamingLLM's 4 attention sinks (policy `sink`)
HEAVY_RATIO = 0.5  # H2O: half of the non-sink budget for heavy hitters, half for recent tokens
CACHE_SLACK = 64  # amortised eviction: grow to budget + slack tokens, then evict down to the budget at once
CACHE_BUDGET_FLOOR = 256  # chat and serve: a ratio budget keeps at least this many tokens (and the question)
CACHE_AUTO_POLICY = "snapkv"  # cache=auto with a budget (BENCHMARKS.md: retrieval and speed at 20%)

# instruction data: the paper's LongAlpaca-plus mixture (28,000 samples), by source file and share
LONGALPACA_PLUS = {"nq.jsonl": 0.44, "redpajama.jsonl": 0.27, "book_summarization.jsonl": 0.18, "long_qa.jsonl": 0.11}

# evaluation
PPL_CHUNK_TOKENS = 1024  # positions per output-embedding chunk when scoring perplexity (bounds logits memory)


def is_default_alias(name: str) -> bool:
    """Does ``name`` (a ``model=`` value) mean the default model?"""
    return str(name).strip().lower() == DEFAULT_MODEL
