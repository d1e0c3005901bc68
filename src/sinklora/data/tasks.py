"""Generate long-context instruction tasks with exact answers from the offline corpora (JSONL, LongAlpaca format).

Tasks (each record: ``instruction``, ``input`` = the long text, ``output`` = ``answer``, plus ``task``,
``answer``, ``work``, ``target_tokens``, ``tokens``):

- ``passkey``: a pass key sentence planted at a random depth of the text; answer the number.
- ``fact``: "The <object> is in the <place>." planted at a random depth; answer the place.
- ``next_line``: quote the line that follows a given line (both lines of one speech, unique in the text).
- ``act_scene``: name the act and scene of a line; the text starts at an act header of a play.
- ``count_name``: how many times a proper name occurs (whole word, case-sensitive) in the text.

Train records come from train works, test records from held-out works (:mod:`sinklora.data.corpora`),
so no test text is ever seen in training. Everything is seeded.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import re
from typing import Callable

from tqdm.auto import tqdm

from sinklora.data.corpora import Document

log = logging.getLogger(__name__)

TASKS = ("passkey", "fact", "next_line", "act_scene", "count_name")
_OBJECTS = "key ring lamp letter coin map violin compass book kettle sword mirror".split()
_PLACES = "garden cellar attic library stable chapel kitchen tower harbour orchard".split()
_NUMERAL = r"([IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)"
_ACT = re.compile(rf"^\s*ACT\s+{_NUMERAL}\b\.?\s*(?:SCENE\s+{_NUMERAL}\b)?", re.I)
_SCENE = re.compile(rf"^\s*SCENE\s+{_NUMERAL}\b", re.I)
_ORDINALS = {"FIRST": 1, "SECOND": 2, "THIRD": 3, "FOURTH": 4, "FIFTH": 5}


def numeral(text: str) -> int:
    """'IV' / '4' / 'FOURTH' -> 4."""
    t = text.upper()
    if t.isdigit():
        return int(t)
    if t in _ORDINALS:
        return _ORDINALS[t]
    values = {"I": 1, "V": 5, "X": 10, "L": 50}
    total = 0
    for a, b in zip(t, t[1:] + " "):
        total += -values[a] if values.get(b, 0) > values[a] else values[a]
    return total


def act_scene_of_lines(lines: list[str]) -> list[tuple[int, int] | None]:
    """(act, scene) in force at each line, from the ``ACT``/``SCENE`` headers above it (None before any)."""
    act = scene = None
    out: list[tuple[int, int] | None] = []
    for line in lines:
        m = _ACT.match(line) if len(line) < 80 else None
        if m:
            act, scene = numeral(m.group(1)), numeral(m.group(2)) if m.group(2) else None
        else:
            s = _SCENE.match(line) if len(line) < 80 else None
            if s:
                scene = numeral(s.group(1))
        out.append((act, scene) if act is not None and scene is not None else None)
    return out


@dataclasses.dataclass
class _Source:
    """One document as lines with their token counts (to reach a token budget without re-tokenising)."""

    doc: Document
    lines: list[str]
    tokens: list[int]
    suffix: list[int] = dataclasses.field(init=False)  # suffix[i] = tokens from line i to the end

    def __post_init__(self):
        self.suffix = list(itertools.accumulate(reversed(self.tokens)))[::-1] + [0]


def _prepare(docs: list[Document], tokenizer) -> list[_Source]:
    out = []
    for d in tqdm(docs, desc="measuring lines", unit="doc"):
        lines = d.text.split("\n")
        enc = tokenizer([ln + "\n" for ln in lines], add_special_tokens=False, verbose=False)["input_ids"]
        out.append(_Source(d, lines, [len(e) for e in enc]))
    return out


def _span(src: _Source, start: int, budget: int) -> tuple[int, int]:
    end, used = start, 0
    while end < len(src.lines) and used + src.tokens[end] <= budget:
        used += src.tokens[end]
        end += 1
    return start, end


def _pick_span(sources: list[_Source], rng: random.Random, budget: int,
               starts: Callable[[_Source], list[int]] | None = None) -> tuple[_Source, int, int] | None:
    """A run of whole lines of one document holding ~``budget`` tokens (>= 90% of it)."""
    for _ in range(50):
        src = rng.choice(sources)
        cands = starts(src) if starts else range(len(src.lines))
        cands = [i for i in cands if src.suffix[i] >= 0.9 * budget]
        if cands:
            start, end = _span(src, rng.choice(cands), budget)
            return src, start, end
    return None


def _plant(lines: list[str], sentence: str, rng: random.Random) -> str:
    at = rng.randint(0, len(lines))
    return "\n".join(lines[:at] + [sentence] + lines[at:])


def _speech_line(line: str) -> bool:
    s = line.strip()
    return len(s.split()) >= 4 and not s.startswith("[") and not _ACT.match(s) and not _SCENE.match(s)


def make_task(task: str, sources: list[_Source], rng: random.Random, budget: int) -> dict | None:
    """One record of ``task`` whose text holds about ``budget`` tokens, or None if none can be built."""
    starts = None
    if task == "act_scene":
        starts = lambda s: [i for i, ln in enumerate(s.lines) if len(ln) < 80 and _ACT.match(ln)]  # noqa: E731
    picked = _pick_span(sources, rng, budget, starts)
    if picked is None:
        return None
    src, start, end = picked
    lines = src.lines[start:end]
    text = "\n".join(lines)
    if task == "passkey":
        key = str(rng.randint(10000, 99999))
        return dict(instruction="There is an important info hidden inside a lot of irrelevant text below. "
                    "Find it and memorize it. What is the pass key? Answer with the number only.",
                    input=_plant(lines, f"The pass key is {key}. Remember it. {key} is the pass key.", rng),
                    answer=key, work=src.doc.work)
    if task == "fact":
        obj, place = rng.choice(_OBJECTS), rng.choice(_PLACES)
        return dict(instruction=f"Somewhere in the text below you are told where the {obj} is. "
                    f"Where is the {obj}? Answer with the place only.",
                    input=_plant(lines, f"Remember this: the {obj} is in the {place}.", rng),
                    answer=place, work=src.doc.work)
    if task == "next_line":
        counts: dict[str, int] = {}
        for ln in lines:
            counts[ln.strip()] = counts.get(ln.strip(), 0) + 1
        pairs = [i for i in range(len(lines) - 1) if _speech_line(lines[i]) and _speech_line(lines[i + 1])
                 and counts[lines[i].strip()] == 1]
        if not pairs:
            return None
        i = rng.choice(pairs)
        return dict(instruction=f'In the text below, which line comes right after the line "{lines[i].strip()}"? '
                    "Quote that line exactly and nothing else.", input=text,
                    answer=lines[i + 1].strip(), work=src.doc.work)
    if task == "act_scene":
        where = act_scene_of_lines(lines)
        counts = {}
        for ln in src.lines:  # unique in the whole play, not only in the excerpt
            counts[ln.strip()] = counts.get(ln.strip(), 0) + 1
        cands = [i for i, ln in enumerate(lines) if where[i] and _speech_line(ln) and counts[ln.strip()] == 1]
        if not cands:
            return None
        i = rng.choice(cands)
        act, scene = where[i]
        return dict(instruction=f'The text below is part of a play. In which act and scene is the line '
                    f'"{lines[i].strip()}"? Answer as "Act N, Scene M" with Arabic numerals.', input=text,
                    answer=f"Act {act}, Scene {scene}", work=src.doc.work)
    if task == "count_name":
        # a name: capitalised, never lower-case in the work, not a speaker label ("Phys."), and seen
        # at least once mid-sentence (after a lower-case word)
        lower = set(re.findall(r"\b[a-z]+\b", src.doc.text))
        labels = {ln.strip().rstrip(".") for ln in src.lines if re.fullmatch(r"[A-Z][A-Za-z]*\.", ln.strip())}
        mid = set(re.findall(r"\b[a-z]+ ([A-Z][a-z]{3,})\b", text))
        found = re.findall(r"\b[A-Z][a-z]{3,}\b", text)
        names = sorted({w for w in mid if w.lower() not in lower and w not in labels and 2 <= found.count(w) <= 30})
        if not names:
            return None
        name = rng.choice(names)
        return dict(instruction=f'How many times does the name "{name}" occur in the text below? Count whole '
                    "words with exactly this spelling and capitalisation. Answer with the number only.",
                    input=text, answer=str(count_word(text, name)), work=src.doc.work)
    raise ValueError(f"task={task!r}: must be one of {', '.join(TASKS)}")


def count_word(text: str, word: str) -> int:
    return len(re.findall(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", text))


def generate_tasks(docs: list[Document], tokenizer, tasks: list[str], lengths: list[int], per_task: int,
                   seed: int = 0, split: str = "train", reserve: int = 64) -> list[dict]:
    """``per_task`` records for every (task, length).

    A record's user turn (instruction + text, field ``tokens``) holds at most ``length - reserve``
    tokens and, given long enough documents, at least ~90% of that; ``reserve`` leaves room for the
    chat template and the answer, so ``build_example(record, tokenizer, max_len=length)`` fits.
    """
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"tasks: {t!r} is not a task; choose from {', '.join(TASKS)}")
    sources = _prepare(docs, tokenizer)
    records = []
    for length in lengths:
        for task in tasks:
            rng = random.Random(f"{seed}:{split}:{task}:{length}")
            limit = length - reserve
            budget, made, tries = limit - 64, 0, 0  # 64: first guess at the instruction's length
            while made < per_task and tries < 20 * per_task:
                tries += 1
                rec = make_task(task, sources, rng, budget)
                if rec is None:
                    continue
                rec = {"instruction": rec.pop("instruction"), "input": rec.pop("input"),
                       "output": rec["answer"], "task": task, **rec, "split": split, "target_tokens": length}
                rec["tokens"] = len(tokenizer(rec["instruction"] + "\n\n" + rec["input"],
                                              add_special_tokens=False, verbose=False)["input_ids"])
                if rec["tokens"] > limit:  # the instruction was longer than guessed: shrink and retry
                    budget -= rec["tokens"] - limit
                    continue
                records.append(rec)
                made += 1
            if made < per_task:
                log.warning("%s at %d tokens: made %d of %d records (documents too short or unsuitable)",
                            task, length, made, per_task)
    return records
