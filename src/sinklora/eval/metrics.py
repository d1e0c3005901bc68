"""LongBench's per-dataset metrics (THUDM/LongBench ``metrics.py``), same semantics and the same
libraries, so that scores compare with published LongBench numbers.

Every metric is ``metric(prediction, ground_truth, **kwargs) -> float`` in [0, 1] for one reference;
the dataset score takes the best reference per record, then the mean x 100 (:mod:`sinklora.eval.longbench`).

| metric | datasets | what |
|---|---|---|
| ``qa_f1_score`` | QA (en), triviaqa | token F1 after SQuAD normalisation (lower case, no punctuation, no articles) |
| ``qa_f1_zh_score`` | multifieldqa_zh | F1 over jieba words, each stripped of Chinese and English punctuation |
| ``rouge_score`` | summaries (en), samsum | ROUGE-L F of the ``rouge`` package (1.0.1); 0 where it raises |
| ``rouge_zh_score`` | dureader, vcsum | the same on jieba words joined by spaces |
| ``classification_score`` | trec, lsht | 1 / (classes named in the output) if the right one is among them |
| ``retrieval_score`` / ``_zh`` | passage_retrieval | share of the numbers in the output equal to the paragraph number |
| ``count_score`` | passage_count | share of the numbers in the output equal to the count |
| ``code_sim_score`` | lcc, repobench-p | ``fuzz.ratio`` / 100 of the first output line not a comment or fence |

Kept on purpose, because LongBench's scores have them: in ``classification_score`` a class name that is
a substring of the answer is dropped while the list is being iterated (so the entry after it is not
looked at), and the difflib fall-back for an output naming no class is never reached (LongBench tests
``em_match_list != 0``, always true): such an output scores 0. ``fuzz.ratio`` is difflib's
``SequenceMatcher`` ratio (rounded) when ``python-Levenshtein`` is absent, as in LongBench's
requirements, and a Levenshtein ratio when it is installed: :func:`code_sim_backend` names the one used.
"""

from __future__ import annotations

import logging
import re
import string
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

_ZH_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～"
                   "｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—"
                   "‘’‛“”„‟…‧﹏.")


def _need(module: str, package: str) -> Any:
    import importlib

    try:
        with warnings.catch_warnings():  # fuzzywuzzy warns that it uses difflib: that is what LongBench ran
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"LongBench's metrics need `{package}`: pip install 'sinklora[eval]' "
                         f"(or pip install {package})") from None


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, punctuation removed, articles removed, whitespace collapsed."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Lower case, Chinese and English punctuation removed, all whitespace removed."""
    drop = set(string.punctuation + _ZH_PUNCTUATION)
    return "".join("".join(ch for ch in s.lower() if ch not in drop).split())


def f1_score(prediction: Sequence[str], ground_truth: Sequence[str], **kwargs: Any) -> float:
    """Token-multiset F1 of two token lists."""
    same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _jieba_words(text: str) -> list[str]:
    jieba = _need("jieba", "jieba")
    jieba.setLogLevel(logging.WARNING)
    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh_answer(t) for t in _jieba_words(text)) if w]

    return f1_score(words(prediction), words(ground_truth))


def rouge_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """ROUGE-L F (package ``rouge``); 0.0 where the package raises (empty hypothesis, recursion depth)."""
    rouge = _need("rouge", "rouge")
    try:
        scores = rouge.Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # LongBench: bare except -> 0
        return 0.0
    return float(scores["rouge-l"]["f"])


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    return rouge_score(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(ground_truth)))


def classification_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    named = [c for c in kwargs["all_classes"] if c in prediction]
    for term in named:  # iterating while removing, as LongBench does (see the module docstring)
        if term in ground_truth and term != ground_truth:
            named.remove(term)
    return 1.0 / len(named) if ground_truth in named else 0.0


def _number_share(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    return _number_share(prediction, str(ground_truth))


def retrieval_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    return _number_share(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    return _number_share(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def code_sim_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    line = next((ln for ln in prediction.lstrip("\n").split("\n")
                 if "`" not in ln and "#" not in ln and "//" not in ln), "")
    fuzz = _need("fuzzywuzzy.fuzz", "fuzzywuzzy")
    return fuzz.ratio(line, ground_truth) / 100


def code_sim_backend() -> str:
    """Which similarity ``fuzz.ratio`` computes here: 'difflib' (LongBench's setup) or 'python-Levenshtein'."""
    fuzz = _need("fuzzywuzzy.fuzz", "fuzzywuzzy")
    return "difflib" if fuzz.SequenceMatcher.__module__ == "difflib" else "python-Levenshtein"


METRICS = {
    "qa_f1": qa_f1_score, "qa_f1_zh": qa_f1_zh_score, "rouge": rouge_score, "rouge_zh": rouge_zh_score,
    "classification": classification_score, "retrieval": retrieval_score, "retrieval_zh": retrieval_zh_score,
    "count": count_score, "code_sim": code_sim_score,
}
