"""RULER scores for a model (or model + adapter, or an export) under KV-cache settings.

Tasks come from :mod:`sinklora.eval.ruler_tasks` (generated offline, seeded). Each sample is answered
greedily (:func:`sinklora.eval.generation.generate_answer`, a fresh cache per sample), the output is
cleaned as RULER's ``postprocess_pred`` does (strip; control characters become newlines) and scored as
RULER's ``scripts/eval/synthetic/constants.py``:

- ``string_match_all`` (niah, vt, cwe, fwe): the share of the expected answers found in the output,
  case-insensitive substring match;
- ``string_match_part`` (qa): 1 if any expected answer is found.

A cell of the table is the mean over its samples x 100 (RULER's percentage). Every sample is answered
under every cache setting, so rows of the score-versus-compression table differ only in the cache.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import Any

from sinklora.eval.generation import generate_answer
from sinklora.eval.ruler_tasks import RulerSample
from sinklora.eval.suite_report import compression_table, fmt, kv_kept, markdown_table, mean, plot_heatmaps

logger = logging.getLogger(__name__)


def postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, control characters to newlines, strip again."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def match_all(prediction: str, answers: Sequence[str]) -> float:
    """Share of ``answers`` that occur in ``prediction`` (case-insensitive)."""
    low = prediction.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def match_part(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any of ``answers`` occurs in ``prediction`` (case-insensitive), else 0.0."""
    low = prediction.lower()
    return float(any(a.lower() in low for a in answers))


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's metric for niah/vt/cwe/fwe over a set of samples, in [0, 1]."""
    return sum(match_all(p, r) for p, r in zip(predictions, references)) / len(predictions)


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's metric for qa over a set of samples, in [0, 1]."""
    return sum(match_part(p, r) for p, r in zip(predictions, references)) / len(predictions)


METRICS = {"all": match_all, "part": match_part}


def run_ruler(model: Any, tokenizer: Any, samples: Sequence[RulerSample], settings: Sequence[Any],
              *, max_new_tokens: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Answer and score every sample under every setting. -> one record per (setting, sample):
    ``{cache, task, length, index, prompt_tokens, answers, prediction, score (0-1), seconds, cache_stats}``."""
    from tqdm.auto import tqdm

    from sinklora.eval.perplexity import warn_beyond_trained_range

    for length in sorted({s.length for s in samples}):
        warn_beyond_trained_range(model, length, "RULER length")
    records = []
    bar = tqdm(total=len(samples) * len(settings), desc="ruler", disable=not progress)
    for setting in settings:
        done = 0.0
        for k, sample in enumerate(samples):
            t0 = time.perf_counter()
            budget = min(sample.tokens_to_generate, max_new_tokens or sample.tokens_to_generate)
            out = generate_answer(model, tokenizer, sample.input_ids, budget, setting)
            prediction = postprocess(tokenizer.decode(out.ids, skip_special_tokens=True))
            score = METRICS[sample.metric](prediction, sample.answers)
            records.append({"cache": setting.name, "task": sample.task, "length": sample.length, "index": sample.index,
                            "prompt_tokens": sample.prompt_tokens, "answers": sample.answers, "prediction": prediction,
                            "score": score, "seconds": round(time.perf_counter() - t0, 3),
                            "cache_stats": out.cache_stats})
            done += score
            bar.update(1)
            bar.set_postfix(cache=setting.name, score=f"{100 * done / (k + 1):.0f}")
    bar.close()
    return records


def summarize(records: Sequence[dict[str, Any]], tasks: Sequence[str], lengths: Sequence[int],
              settings: Sequence[str]) -> list[dict[str, Any]]:
    """Per setting: ``scores[task][length]`` (0-100, None where no sample), ``by_length``, ``by_task``,
    ``average`` (over tasks and lengths), ``kv_kept`` and mean prompt tokens per length."""
    out = []
    for name in settings:
        mine = [r for r in records if r["cache"] == name]
        scores: dict[str, dict[str, float | None]] = {}
        for task in tasks:
            scores[task] = {}
            for length in lengths:
                cell = [r["score"] for r in mine if r["task"] == task and r["length"] == length]
                scores[task][str(length)] = round(100 * sum(cell) / len(cell), 2) if cell else None
        by_length = {str(n): mean([scores[t][str(n)] for t in tasks]) for n in lengths}
        tokens = {str(n): mean([r["prompt_tokens"] for r in mine if r["length"] == n]) for n in lengths}
        out.append({"cache": name, "scores": scores, "by_length": by_length,
                    "by_task": {t: mean(list(scores[t].values())) for t in tasks},
                    "average": mean(list(by_length.values())), "kv_kept": kv_kept([r["cache_stats"] for r in mine]),
                    "prompt_tokens": tokens, **{f"length_{n}": by_length[str(n)] for n in lengths}})
    return out


def ruler_markdown(summary: Sequence[dict[str, Any]], tasks: Sequence[str], lengths: Sequence[int],
                   title: str) -> str:
    """The tasks x lengths table of every cache setting, then the score-versus-compression table."""
    parts = [f"## RULER: {title}", ""]
    for s in summary:
        rows = [[t] + [fmt(s["scores"][t][str(n)]) for n in lengths] + [fmt(s["by_task"][t])] for t in tasks]
        rows.append(["**average**"] + [fmt(s["by_length"][str(n)]) for n in lengths] + [f"**{fmt(s['average'])}**"])
        header = ["task"] + [str(n) for n in lengths] + ["mean"]
        parts += [f"### cache {s['cache']}", "", markdown_table(header, rows), ""]
    parts += ["### score vs compression", "",
              compression_table(summary, [(str(n), f"length_{n}") for n in lengths]), ""]
    return "\n".join(parts)


def plot_ruler(summary: Sequence[dict[str, Any]], tasks: Sequence[str], lengths: Sequence[int], path: Any,
               title: str) -> Any:
    panels = [(f"cache {s['cache']} (avg {fmt(s['average'])})",
               [[s["scores"][t][str(n)] for n in lengths] for t in tasks]) for s in summary]
    return plot_heatmaps(panels, list(tasks), [str(n) for n in lengths], path, xlabel="length (tokens)",
                         ylabel="task", title=title)
