"""What RULER's haystacks are made of, offline: wonderwords' word lists (RULER's), the repeated noise
sentence, long documents of a corpus (instead of Paul Graham's essays) and, for task ``qa``, passages of
plays whose lines carry their speaker (instead of SQuAD / HotpotQA)."""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@functools.lru_cache(maxsize=1)
def word_lists() -> dict[str, list[str]]:
    """wonderwords' nouns, adjectives and verbs (the lists RULER samples), single lower-case words only."""
    try:
        from importlib.resources import files

        assets = files("wonderwords.assets")
    except ModuleNotFoundError:
        raise ValueError("RULER's word lists come from the `wonderwords` package: pip install wonderwords") from None
    out = {}
    for name in ("noun", "adjective", "verb"):
        words = (w.strip() for w in (assets / f"{name}list.txt").read_text(encoding="utf-8").splitlines())
        out[name] = sorted({w for w in words if re.fullmatch(r"[a-z]+", w)})
    return out


@dataclass
class Passage:
    text: str
    lines: list[tuple[str, str]]  # (speaker label, line) of every labelled line


_LABEL = re.compile(r"[A-Z][A-Za-z'\-]*(?: [A-Z][A-Za-z'\-]*){0,3}\.")
_HEADING = re.compile(r"\s*(ACT|SCENE)\b", re.IGNORECASE)


def play_passages(texts: Sequence[str], max_lines: int = 16) -> list[Passage]:
    """Runs of whole speeches (a speaker label line, then its lines) of about ``max_lines`` lines, with at
    least two speakers. Blocks are separated by blank lines; stage directions and unlabelled continuations
    stay inside a passage (never open one); act and scene headings end it."""
    passages: list[Passage] = []
    for text in texts:
        blocks: list[str] = []
        lines: list[tuple[str, str]] = []
        for block in re.split(r"\n\s*\n", text):
            rows = [r.rstrip() for r in block.strip("\n").split("\n") if r.strip()]
            if not rows:
                continue
            heading = _HEADING.match(rows[0]) is not None
            labelled = len(rows) >= 2 and not heading and _LABEL.fullmatch(rows[0].strip()) is not None
            size = sum(b.count("\n") + 1 for b in blocks)
            if heading or (blocks and size + len(rows) > max_lines) or not (labelled or blocks):
                if len({s for s, _ in lines}) >= 2:
                    passages.append(Passage("\n\n".join(blocks), lines))
                blocks, lines = [], []
                if not labelled:
                    continue
            blocks.append("\n".join(rows))
            if labelled:
                lines += [(rows[0].strip(), r.strip()) for r in rows[1:] if not r.lstrip().startswith("[")]
        if len({s for s, _ in lines}) >= 2:
            passages.append(Passage("\n\n".join(blocks), lines))
    return passages


class Resources:
    """Long documents for the "essay" haystacks and the ``qa`` passages, loaded once on first use from
    ``source``/``split`` (:func:`sinklora.data.corpora.load_documents`) or given as ``texts``."""

    def __init__(self, source: str = "books", split: str = "heldout", texts: Sequence[str] | None = None):
        self.source, self.split, self._texts = source, split, list(texts) if texts is not None else None

    @functools.cached_property
    def texts(self) -> list[str]:
        if self._texts is not None:
            return self._texts
        from sinklora.data.corpora import load_documents

        return [d.text for d in load_documents(self.source, self.split)]

    @functools.cached_property
    def essay_words(self) -> list[str]:
        return re.sub(r"\s+", " ", " ".join(self.texts)).strip().split(" ")

    def haystack_words(self, n: int) -> list[str]:
        """The first ``n`` words of the documents, read again from the start if they hold fewer (as RULER)."""
        words = self.essay_words
        return words[:n] if n <= len(words) else (words * (n // len(words) + 1))[:n]

    @functools.cached_property
    def passages(self) -> list[Passage]:
        return play_passages(self.texts)

    @functools.cached_property
    def questions(self) -> list[tuple[int, str, str]]:
        """(passage index, line, speaker) for lines of >= 5 words that occur once in all passages."""
        counts = Counter(line for p in self.passages for _, line in p.lines)
        found = [(i, line, speaker.rstrip(".")) for i, p in enumerate(self.passages) for speaker, line in p.lines
                 if counts[line] == 1 and len(line.split()) >= 5 and '"' not in line]
        if len(self.passages) < 2 or not found:
            raise ValueError(f"task 'qa' needs plays (speaker label lines such as 'Ham.' above each speech); "
                             f"source={self.source!r} split={self.split!r} has {len(self.passages)} such passages. "
                             "Use a source with plays (books, shakespeare) or leave 'qa' out of tasks")
        return found
