"""Mix instruction sources by ratio into one shuffled JSONL, with a token-length report (table + histogram).

The default ratios are the paper's LongAlpaca-plus (28,000 samples): Natural Questions 44%,
RedPajama 27%, book summarisation 18%, long QA 11%. Counts come from largest-remainder rounding, so
they sum to ``total`` and each is within 1 of ``total * ratio``. Each record gets a ``source`` field.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

from sinklora import atomic
from sinklora.data.instruct import load_instructions, user_content

log = logging.getLogger(__name__)


def mixture_counts(ratios: dict[str, float], total: int) -> dict[str, int]:
    """Largest-remainder (Hamilton) rounding of ``total * ratio / sum(ratios)``; ties go to the earlier source."""
    if total < 0:
        raise ValueError(f"total={total}: must be >= 0")
    bad = {k: v for k, v in ratios.items() if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v))}
    if bad or not ratios or sum(ratios.values()) <= 0:
        raise ValueError(f"sources={ratios!r}: ratios must be numbers >= 0 with a positive sum")
    norm = sum(ratios.values())
    exact = {k: total * v / norm for k, v in ratios.items()}
    counts = {k: math.floor(x) for k, x in exact.items()}
    order = sorted(ratios, key=lambda k: -(exact[k] - counts[k]))  # stable: ties keep config order
    for k in order[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def _draw(records: list[dict], need: int, rng: random.Random, allow_replacement: bool, name: str) -> list[dict]:
    if need <= len(records):
        return rng.sample(records, need)
    if not allow_replacement:
        raise ValueError(f"source {name!r} has {len(records)} records but the mix needs {need}; lower total, "
                         "change the ratios, or set allow_replacement=true to repeat records")
    # every record once per full pass, then a random remainder: as even as repetition can be
    full, rest = divmod(need, len(records))
    log.warning("source %r: %d records repeated to reach %d", name, len(records), need)
    return records * full + rng.sample(records, rest)


def mix_sources(sources: dict[str, float], total: int, seed: int = 0, allow_replacement: bool = False,
                on_error: str = "fail") -> list[dict]:
    """``total`` records drawn from each source by ratio (see :func:`mixture_counts`), shuffled."""
    counts = mixture_counts(sources, total)
    rng = random.Random(seed)
    mixed = []
    for name, need in counts.items():
        records = load_instructions(name, on_error=on_error)
        mixed += [{**r, "source": name} for r in _draw(records, need, rng, allow_replacement, name)]
    rng.shuffle(mixed)
    return mixed


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    """One JSON object per line, written to a temporary file renamed into place (never half a file)."""
    return atomic.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def record_tokens(records: list[dict], tokenizer) -> list[int]:
    """Tokens of each record's user turn plus response (no chat template)."""
    texts = [user_content(r) + "\n" + r["output"] for r in records]
    out = []
    for i in range(0, len(texts), 64):
        out += [len(ids) for ids in tokenizer(texts[i:i + 64], add_special_tokens=False, verbose=False)["input_ids"]]
    return out


def length_report(records: list[dict], lengths: list[int], png: str | Path | None = None) -> str:
    """A per-source table (count, share, token length quantiles) and optionally a histogram PNG."""
    by: dict[str, list[int]] = {}
    for r, n in zip(records, lengths):
        by.setdefault(r.get("source", "?"), []).append(n)
    by["all"] = list(lengths)
    rows = [f"{'source':<32} {'records':>8} {'share':>7} {'min':>7} {'median':>7} {'mean':>8} {'p90':>7} {'max':>7}"]
    for name, ns in by.items():
        s = sorted(ns)
        q = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
        rows.append(f"{name[-32:]:<32} {len(s):>8} {len(s) / max(len(lengths), 1):>7.1%} {s[0]:>7} "
                    f"{q(0.5):>7} {sum(s) / len(s):>8.0f} {q(0.9):>7} {s[-1]:>7}")
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        names = [k for k in by if k != "all"]
        ax.hist([by[k] for k in names], bins=40, stacked=True, label=[Path(k).name for k in names])
        ax.set_xlabel("tokens per record (user turn + response)")
        ax.set_ylabel("records")
        ax.set_title(f"length distribution of {len(lengths)} records")
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic.atomic_path(png) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
    return "\n".join(rows)
