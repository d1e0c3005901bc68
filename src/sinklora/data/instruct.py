"""Instruction data for supervised fine-tuning: loading and validating LongAlpaca/Alpaca records,
building ``input_ids``/``labels`` through the tokenizer's chat template, padding and batching.

A record is ``{"instruction": str, "input": str (optional), "output": str, ...}`` (extra fields are
kept). The user turn is ``instruction`` followed by a blank line and ``input`` when there is one; the
assistant turn is ``output``. Loss is taken on the assistant turn only.

Tokenizers without a chat template use :data:`FALLBACK_TEMPLATE` (Alpaca's, as LongAlpaca uses):
``{system}\\n\\n### Instruction:\\n{user}\\n\\n### Response:\\n`` then ``{output}{eos_token}``, where
``system`` defaults to :data:`ALPACA_SYSTEM`.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import torch
from tqdm.auto import tqdm

from sinklora.data.files import load_hf_rows, read_json_records

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
FALLBACK_TEMPLATE = "{system}\n\n### Instruction:\n{user}\n\n### Response:\n"
TRUNCATION_MARK = "\n[...]\n"
FIELDS = ("instruction", "input", "output")
OnError = Literal["skip", "fail"]


# ----------------------------------------------------------------------------- loading and validation

def validate_record(rec: Any, where: str) -> dict | str:
    """The record normalised (``input`` defaults to ""), or an error naming ``where`` and the field."""
    if not isinstance(rec, dict):
        return f"{where}: expected an object with fields {', '.join(FIELDS)}, got a {type(rec).__name__}"
    out = dict(rec)
    for field in FIELDS:
        value = rec.get(field)
        if value is None and field == "input":
            out[field] = ""
        elif value is None:
            return f"{where}: missing field {field!r} (it has {', '.join(sorted(rec)) or 'no fields'})"
        elif not isinstance(value, str):
            return f"{where}: field {field!r} must be a string, got {type(value).__name__}"
        elif field != "input" and not value.strip():
            return f"{where}: field {field!r} is empty"
    return out


def _rename(rec: Any, columns: dict[str, str] | None) -> Any:
    if not columns or not isinstance(rec, dict):
        return rec
    out = {k: v for k, v in rec.items() if k not in columns.values()}
    for field, column in columns.items():
        if column in rec:
            out[field] = rec[column]
    return out


def load_instructions(source: str | Path, *, columns: dict[str, str] | None = None,
                      on_error: OnError = "fail") -> list[dict]:
    """Records from a JSON list / JSONL file, a saved dataset folder or ``hf:NAME[:split]``.

    ``columns`` maps our fields to the source's columns, e.g. ``{"instruction": "question",
    "input": "context", "output": "answer"}``. Invalid records raise (``on_error="fail"``) or are
    dropped with a count (``"skip"``); every message names the file, the record number and the field.
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error={on_error!r}: must be 'skip' or 'fail'")
    if columns and set(columns) - set(FIELDS):
        raise ValueError(f"columns={columns!r}: keys must be among {', '.join(FIELDS)}")
    source = str(source)
    path = Path(source)
    if path.is_file():
        rows = read_json_records(path, on_error)
    elif source.startswith("hf:") or path.is_dir():
        name, split = (source.removeprefix("hf:").split(":") + [None])[:2]
        rows = [(f"{name}[{split or 'train'}]: record {i + 1}", r) for i, r in enumerate(load_hf_rows(name, split))]
    else:
        raise ValueError(f"instruction source {source!r} does not exist: give a .json/.jsonl file, "
                         "a saved dataset folder or hf:NAME[:split]")
    records, errors = [], []
    for where, raw in rows:
        rec = validate_record(_rename(raw, columns), where)
        (errors if isinstance(rec, str) else records).append(rec)
    if errors and on_error == "fail":
        more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise ValueError(f"{len(errors)} invalid record(s) (use on_error='skip' to drop them):\n  "
                         + "\n  ".join(errors[:5]) + more)
    if errors:
        log.warning("%s: skipped %d invalid record(s) of %d, first: %s", source, len(errors), len(rows), errors[0])
    if not records:
        raise ValueError(f"instruction source {source!r} holds no valid records")
    return records


# ----------------------------------------------------------------------------- prompt and labels

def user_content(record: dict) -> str:
    extra = record.get("input") or ""
    return record["instruction"] + ("\n\n" + extra if extra else "")


def render_prompt(record: dict, tokenizer, system_prompt: str | None = None) -> tuple[str, str]:
    """``(prompt_text, response_text)``: the prompt ends where the model starts answering."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        messages.append({"role": "user", "content": user_content(record)})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": record["output"]}], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template renders the conversation with a different "
                             "prefix than the prompt alone; loss masking needs prefix-stable templates")
        return prompt, full[len(prompt):]
    system = ALPACA_SYSTEM if system_prompt is None else system_prompt
    prompt = FALLBACK_TEMPLATE.format(system=system, user=user_content(record))
    return prompt, record["output"] + (tokenizer.eos_token or "")


def _encode(text: str, tokenizer) -> list[int]:
    # the template already holds every special token (BOS included where the model uses one)
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _middle_cut(text: str, keep_tokens: int, tokenizer) -> str:
    ids = _encode(text, tokenizer)
    if keep_tokens >= len(ids):
        return text
    head = (keep_tokens + 1) // 2
    tail = keep_tokens - head
    return (tokenizer.decode(ids[:head]) + TRUNCATION_MARK
            + (tokenizer.decode(ids[len(ids) - tail:]) if tail > 0 else ""))


def build_example(record: dict, tokenizer, max_len: int, system_prompt: str | None = None,
                  truncate: Literal["middle", "none"] = "middle") -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` with labels = -100 on every prompt token and the ids elsewhere.

    When the example exceeds ``max_len`` and ``truncate="middle"``, the middle of ``input`` is
    replaced by :data:`TRUNCATION_MARK`; the instruction and the whole response are always kept.
    Raises ValueError when it cannot fit (no ``input`` to cut, or the rest alone is too long).
    """
    if truncate not in ("middle", "none"):
        raise ValueError(f"truncate={truncate!r}: must be 'middle' or 'none'")
    prompt, response = render_prompt(record, tokenizer, system_prompt)
    prompt_ids, response_ids = _encode(prompt, tokenizer), _encode(response, tokenizer)
    excess = len(prompt_ids) + len(response_ids) - max_len
    if excess > 0:
        extra = record.get("input") or ""
        base = len(_encode(render_prompt({**record, "input": TRUNCATION_MARK}, tokenizer, system_prompt)[0], tokenizer))
        if truncate == "none" or not extra or base + len(response_ids) > max_len:
            why = ("truncate='none'" if truncate == "none" else "there is no input to cut" if not extra
                   else f"without its input the prompt needs {base} tokens and the response {len(response_ids)}")
            raise ValueError(f"example of {len(prompt_ids) + len(response_ids)} tokens exceeds max_len={max_len} "
                             f"and cannot be shortened ({why}); raise max_len or drop the record")
        keep = len(_encode(extra, tokenizer)) - excess - len(_encode(TRUNCATION_MARK, tokenizer))
        for _ in range(8):  # re-tokenising the cut text can shift a few tokens at the seams
            short = {**record, "input": _middle_cut(extra, max(keep, 0), tokenizer)}
            prompt_ids = _encode(render_prompt(short, tokenizer, system_prompt)[0], tokenizer)
            over = len(prompt_ids) + len(response_ids) - max_len
            if over <= 0:
                break
            keep -= max(over, 1)
        else:
            raise ValueError(f"could not cut the input to fit max_len={max_len}")
    return {"input_ids": prompt_ids + response_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


def build_examples(records: Iterable[dict], tokenizer, max_len: int, system_prompt: str | None = None,
                   truncate: Literal["middle", "none"] = "middle", on_error: OnError = "skip") -> list[dict]:
    """:func:`build_example` over many records with a progress bar; unfit records skipped (counted) or fatal."""
    out, failed = [], []
    records = list(records)
    for i, rec in enumerate(tqdm(records, desc="building examples", unit="rec")):
        try:
            out.append(build_example(rec, tokenizer, max_len, system_prompt, truncate))
        except ValueError as e:
            if on_error == "fail":
                raise ValueError(f"record {i + 1}: {e}") from None
            failed.append(f"record {i + 1}: {e}")
    if failed:
        log.warning("skipped %d of %d records that do not fit; first: %s", len(failed), len(records), failed[0])
    if not out:
        raise ValueError(f"no record fits max_len={max_len} ({len(failed)} skipped)")
    return out


# ----------------------------------------------------------------------------- batching

class InstructCollator:
    """Right-pads ``input_ids`` with ``pad_id``, ``labels`` with -100; adds ``attention_mask``."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        if pad_id is None:
            raise ValueError("pad_id=None: pass tokenizer.pad_token_id (or eos_token_id when there is no pad token)")
        self.pad_id, self.multiple = int(pad_id), pad_to_multiple_of

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            longest = -(-longest // self.multiple) * self.multiple
        ids = torch.full((len(features), longest), self.pad_id, dtype=torch.long)  # (B, L)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"])
            labels[row, :n] = torch.as_tensor(f["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int = 0,
                           mega_batches: int = 50) -> list[list[int]]:
    """Index batches of similar lengths (less padding), in a seeded random order.

    Indices are shuffled, cut into groups of ``batch_size * mega_batches``, sorted by length within a
    group and cut into batches; the batch order is shuffled again. Usable as a DataLoader ``batch_sampler``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = batch_size * max(mega_batches, 1)
    batches = []
    for g in range(0, len(order), group):
        chunk = sorted(order[g:g + group], key=lambda i: -lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
