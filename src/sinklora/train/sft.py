"""Instruction-tune a base or context-extended model on LongAlpaca-style data (LoRA+, sf attention).

Data: a JSON list or JSONL of ``{"instruction", "input" (optional), "output"}`` records (LongAlpaca,
Alpaca), a saved dataset folder or ``hf:NAME[:split]``, with ``columns`` mapping our fields to other
names. Each record becomes the tokenizer's chat template (``system_prompt`` first) with the loss on
the response tokens only; over-long inputs are cut in the middle, never the instruction or the
answer (:mod:`sinklora.data.instruct`). Micro-batches are length-grouped padded rows, or one packed
row of several examples (``batching=packed``; attention and positions restart in every example).

The model is ``model`` (a base, or a merged ``sinklora export`` folder) or ``model`` + ``adapter``
(a ``sinklora train`` output_dir, whose LoRA+ adapter and extended RoPE are continued). Training uses
the shared recipe (:mod:`sinklora.train.recipe`): sparse attention (``sf``), LoRA+, warm-up then
constant LR, resumable output folder; unset ``train.*`` values take the paper's SFT recipe (LR 2e-5,
20 warm-up steps) and ``train.max_steps`` defaults to one epoch. The result is an adapter in
``output_dir``: ``sinklora export model=M adapter=OUT`` merges it, ``sinklora chat model=M adapter=OUT``
talks to it.

``eval.tasks=test.jsonl`` (e.g. from ``sinklora data tasks``) measures exact-match accuracy of greedy
answers with full attention, before and after training (table, ``results.json``).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import math
import random
import re
from pathlib import Path

import torch

from sinklora import runtime
from sinklora.config import ConfigError, to_dict
from sinklora.data.instruct import IGNORE_INDEX, InstructCollator, build_example
from sinklora.hf import sequence_parallel
from sinklora.hf.attention import use_attention
from sinklora.hf.sequence_parallel import training_attention
from sinklora.models.loading import load_config
from sinklora.models.rope import current_factor, original_length
from sinklora.train.configs import SFT_DEFAULTS, SFTConfig, check_lengths
from sinklora.train.recipe import build_model, evaluating, make_trainer, prepare_output_dir, train_and_save

logger = logging.getLogger(__name__)

def resolve_defaults(cfg: SFTConfig) -> dict:
    """Fill ``target_len`` (adapter's RoPE record, else the model's), ``max_len``, ``eval.max_len`` and the
    SFT training defaults; check lengths against the attention settings. Reads configs only."""
    config = load_config(cfg.model, adapter=cfg.adapter)
    cfg.target_len = cfg.target_len or int(config.max_position_embeddings)
    cfg.max_len = cfg.max_len or cfg.target_len
    cfg.eval.max_len = cfg.eval.max_len or cfg.max_len
    for key, value in SFT_DEFAULTS.items():
        if getattr(cfg.train, key) is None:
            setattr(cfg.train, key, value)
    errors = check_lengths(cfg) + sequence_parallel.problems(cfg.train.sequence_parallel, config,
                                                             varying_batch_size=cfg.train.batch_size)
    if errors:
        raise ConfigError(errors)
    return {"model_len": int(config.max_position_embeddings), "factor": current_factor(config),
            "original_len": original_length(config)}


# ---- data ----------------------------------------------------------------------------------------


def load_examples(cfg: SFTConfig, tokenizer) -> list[dict]:
    """Validated records -> ``{"input_ids", "labels"}`` examples of at most ``max_len`` tokens."""
    from sinklora.data.instruct import build_examples, load_instructions

    records = load_instructions(cfg.data, columns=cfg.columns or None, on_error=cfg.on_error)
    return build_examples(records, tokenizer, cfg.max_len, cfg.system_prompt or None, cfg.truncate, cfg.on_error)


def pack_examples(lengths: list[int], max_len: int, seed: int = 0) -> list[list[int]]:
    """Indices grouped into rows of at most ``max_len`` tokens (best-fit decreasing), rows shuffled."""
    if max(lengths, default=0) > max_len:
        raise ValueError(f"an example has {max(lengths)} tokens > max_len={max_len}: build examples with max_len first")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(free, (lengths[i], -1))  # the fullest row that still has room
        if at == len(free):
            rows.append([])
            left, row = max_len, len(rows) - 1
        else:
            left, row = free.pop(at)
        rows[row].append(i)
        bisect.insort(free, (left - lengths[i], row))
    random.Random(seed).shuffle(rows)
    return rows


class BatchDataset(torch.utils.data.Dataset):
    """One item per micro-batch (a list of examples), so the Trainer's shuffling keeps our groups."""

    def __init__(self, examples: list[dict], batches: list[list[int]]):
        self.examples, self.batches = examples, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> list[dict]:
        return [self.examples[j] for j in self.batches[i]]


class SFTCollator:
    """Items of :class:`BatchDataset` -> model inputs.

    Padded: ``input_ids`` right-padded with ``pad_id``, ``labels`` -100 on prompts and pads,
    ``attention_mask`` 0 on pads. Packed: one row of concatenated examples, no padding, no
    ``attention_mask``, ``position_ids`` restarting at 0 in every example (transformers' packed-sequence
    format: full and sparse attention both stay inside each example) and labels -100 on every prompt.
    """

    def __init__(self, pad_id: int, packed: bool = False):
        self.pad, self.packed = InstructCollator(pad_id), packed

    def __call__(self, items: list[list[dict]]) -> dict[str, torch.Tensor]:
        examples = [ex for item in items for ex in item]
        if not self.packed:
            return self.pad(examples)
        # the first token of every example is a prompt token: no loss crosses an example boundary
        assert all(ex["labels"][0] == IGNORE_INDEX for ex in examples), "a packed example starts inside its response"
        ids = [t for ex in examples for t in ex["input_ids"]]
        labels = [t for ex in examples for t in ex["labels"]]
        positions = [p for ex in examples for p in range(len(ex["input_ids"]))]
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),  # (1, L)
                "position_ids": torch.tensor([positions])}


def make_batches(examples: list[dict], cfg: SFTConfig) -> list[list[int]]:
    from sinklora.data.instruct import length_grouped_batches

    lengths = [len(ex["input_ids"]) for ex in examples]
    if cfg.batching == "packed":
        return pack_examples(lengths, cfg.max_len, cfg.train.seed)
    return length_grouped_batches(lengths, cfg.train.batch_size, seed=cfg.train.seed)


def data_summary(lengths: list[int], batches: list[list[int]], row_len: int | None = None) -> dict:
    """Counts and ``padding``: the share of empty token slots in the micro-batches (padded rows; or, when
    packed, what rows of ``row_len`` tokens leave unused)."""
    slots = sum(row_len or len(b) * max(lengths[i] for i in b) for b in batches)
    return {"examples": len(lengths), "micro_batches": len(batches), "mean_tokens": round(sum(lengths) / len(lengths), 1),
            "max_tokens": max(lengths), "padding": round(1 - sum(lengths) / slots, 4)}


# ---- evaluation ----------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """The first non-empty line, lower case, punctuation -> spaces, whitespace collapsed."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    return " ".join(re.sub(r"[^\w\s]", " ", line.lower()).split())


def _stop_ids(tokenizer, system_prompt: str | None) -> list[int]:
    """eos plus the special tokens that end an assistant turn in this template (e.g. ``<|im_end|>``)."""
    from sinklora.data.instruct import render_prompt

    response = render_prompt({"instruction": "q", "input": "", "output": "a"}, tokenizer, system_prompt)[1]
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return sorted({tokenizer.eos_token_id, *(i for i in ids if i in tokenizer.all_special_ids)} - {None})


def evaluate_tasks(model, tokenizer, records: list[dict], *, system_prompt: str | None, max_len: int,
                   max_new_tokens: int = 32, label: str = "") -> dict:
    """Exact match of greedy answers (full attention) against each record's ``answer`` (else ``output``),
    both through :func:`normalize_answer`. Prompts are built as in training, inputs cut to ``max_len``."""
    from tqdm.auto import tqdm

    stop, device = _stop_ids(tokenizer, system_prompt), next(model.parameters()).device
    greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    rows = []
    with evaluating(model), use_attention(model, "full"), torch.inference_mode():
        for rec in tqdm(records, desc=f"tasks {label}".strip(), unit="task"):
            ex = build_example(rec, tokenizer, max_len, system_prompt)
            n = next(i for i, t in enumerate(ex["labels"]) if t != IGNORE_INDEX)
            ids = torch.tensor([ex["input_ids"][:n]], device=device)  # (1, prompt)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, use_cache=True, **greedy)
            text = tokenizer.decode(out[0, n:], skip_special_tokens=True)
            answer = str(rec.get("answer", rec["output"]))
            rows.append({"task": rec.get("task", "all"), "prompt_tokens": n, "answer": answer,
                         "prediction": text.strip(), "correct": normalize_answer(text) == normalize_answer(answer)})
    by_task: dict[str, list[bool]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r["correct"])
    return {"label": label, "n": len(rows), "correct": sum(r["correct"] for r in rows),
            "accuracy": sum(r["correct"] for r in rows) / max(len(rows), 1),
            "by_task": {t: sum(v) / len(v) for t, v in sorted(by_task.items())}, "records": rows}


def results_table(cfg: SFTConfig, data: dict, summary: dict, before: dict | None, after: dict | None) -> str:
    lines = [f"## sinklora sft: {cfg.model}" + (f" + {cfg.adapter}" if cfg.adapter else "")
             + f", {data['examples']} examples <= {cfg.max_len} tokens, attention {cfg.attention.pattern}, "
             f"context {cfg.target_len}", ""]
    if after is not None:
        def cell(r: dict | None, task: str | None = None) -> str:
            if r is None:
                return "-"
            if task is None:
                return f"{r['correct']}/{r['n']} ({r['accuracy']:.0%})"
            return f"{r['by_task'][task]:.0%}"

        lines += [f"| exact match, full attention | before | after {summary['steps']} steps |", "|---|---|---|",
                  f"| all ({after['n']} tasks from {cfg.eval.tasks}) | {cell(before)} | {cell(after)} |"]
        lines += [f"| {t} | {cell(before, t)} | {cell(after, t)} |" for t in after["by_task"]]
        lines.append("")
    loss = (f"{summary['first_loss']:.3f} -> {summary['last_loss']:.3f} (min {summary['min_loss']:.3f})"
            if summary.get("first_loss") is not None else "n/a")
    lines += [f"training loss (first -> last): {loss}; {summary['steps']} steps in {summary['train_seconds']} s, "
              f"{summary['tokens_per_s']} tokens/s"]
    return "\n".join(lines)


# ---- the command ---------------------------------------------------------------------------------


def run(cfg: SFTConfig, callbacks: list | None = None) -> dict:
    """Library entry point (``sinklora sft`` calls it); ``callbacks`` go to the HF Trainer."""
    from transformers import set_seed

    from sinklora.data.instruct import load_instructions
    from sinklora.models.loading import load_tokenizer, resolve_model

    budget = resolve_defaults(cfg)
    tokenizer = load_tokenizer(resolve_model(cfg.model))
    examples = load_examples(cfg, tokenizer)  # every record is checked before the output folder or model
    batches = make_batches(examples, cfg)
    tc, world = cfg.train, runtime.world_size()
    # default: one epoch (a sequence-parallel group of N processes trains on one batch at a time)
    tc.max_steps = tc.max_steps or math.ceil(len(batches) * tc.sequence_parallel / (tc.grad_accum * world))
    task_records = None
    if cfg.eval.tasks:
        task_records = load_instructions(cfg.eval.tasks)[: cfg.eval.limit]
    lengths = [len(ex["input_ids"]) for ex in examples]
    data = data_summary(lengths, batches, cfg.max_len if cfg.batching == "packed" else None)
    logger.info("SFT data: %s", data)
    resume_from = prepare_output_dir(cfg)
    out = Path(cfg.output_dir)
    set_seed(tc.seed)
    if cfg.adapter is not None:
        logger.info("continuing the adapter in %s: its LoRA settings are used (lora.* ignored)", cfg.adapter)
    model, tokenizer = build_model(cfg.model, cfg.target_len, original_len=cfg.original_len, rope_rounding=cfg.rope_rounding,
                                   lora=cfg.lora, precision=tc.precision, adapter=cfg.adapter)
    do_eval = task_records is not None and world == 1
    ev = cfg.eval
    kw = dict(system_prompt=cfg.system_prompt or None, max_len=ev.max_len, max_new_tokens=ev.max_new_tokens)
    before = evaluate_tasks(model, tokenizer, task_records, label="before", **kw) if do_eval and ev.before else None
    # a dataset item is a whole micro-batch, so the Trainer's own batch size is 1
    trainer = make_trainer(model, tokenizer, BatchDataset(examples, batches), dataclasses.replace(tc, batch_size=1), out,
                           tokens_per_row=round(sum(lengths) / len(batches)),
                           collator=SFTCollator(tokenizer.pad_token_id, packed=cfg.batching == "packed"),
                           callbacks=callbacks, longest_row=cfg.max_len, base_model=cfg.model)
    with training_attention(model, cfg.attention.build(), tc.sequence_parallel):
        summary = train_and_save(trainer, out, resume_from, base_model=cfg.model)
    after = evaluate_tasks(model, tokenizer, task_records, label="after", **kw) if do_eval else None
    result = {"config": to_dict(cfg), "budget": budget, "data": data, "train": summary, "before": before, "after": after}
    if trainer.is_world_process_zero():
        (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
        table = results_table(cfg, data, summary, before, after)
        (out / "results.md").write_text(table + "\n")
        print("\n" + table + f"\n\nadapter, results.json and loss.png are in {out}/; chat with: sinklora chat "
              f"model={cfg.model} adapter={out}")
    return result
