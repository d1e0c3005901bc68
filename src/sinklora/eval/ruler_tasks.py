"""RULER's synthetic tasks (Hsieh et al. 2024, NVIDIA/RULER ``scripts/data/synthetic``), generated offline
and seeded, sized in tokens of the model's own tokenizer.

| task | family | haystack | what is asked |
|---|---|---|---|
| ``niah_single_1/2/3`` | niah | noise / documents / documents | the number (1, 2) or UUID (3) of one word key |
| ``niah_multikey_1`` | niah | documents + 3 distractor needles | one of 4 keys |
| ``niah_multikey_2/3`` | niah | a haystack of distractor needles (word / UUID keys) | one key |
| ``niah_multivalue`` | niah | documents | all 4 values of one key |
| ``niah_multiquery`` | niah | documents | the values of 4 keys |
| ``vt`` | variable_tracking | noise | every variable of a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... |
| ``cwe`` | common_words_extraction | numbered word list | the 10 words repeated most |
| ``fwe`` | freq_words_extraction | Zipf-distributed coded words | the 3 most frequent (the top one is noise) |
| ``qa`` | qa | passages of plays ("Document i") | who speaks a quoted line (a speaker label) |

Templates, answer prefixes, needle sentences, token budgets for the answer (niah 128, vt 30, cwe 120,
fwe 50, qa 32) and the task settings are RULER's. A sample of target length L holds at most
``L - tokens_to_generate`` prompt tokens (RULER's ``max_seq_length`` counts the answer), counted on the
final prompt: chat template and answer prefix included; the haystack is the largest that fits
(bisection on haystack units: sentences, words, needles, list entries, lines of documents).

Where we differ from RULER, and why:
- "essay" haystacks are long documents of an offline corpus (default: held-out books), not Paul
  Graham's essays; sentences are split by a regex, not nltk.
- ``qa``: RULER's SQuAD / HotpotQA need a download. Ours asks which character speaks a line that occurs
  once in the corpus; the gold passage (whole speeches, speaker labels such as ``Laer.`` above each)
  is shuffled among distractor passages. The answer is the label without its period; an abbreviation is
  a prefix of the full name, so "Laertes" also matches ``string_match_part``.
- Word lists are wonderwords' (as RULER's), keeping single lower-case words only (no "ad hoc").
- Chat models: the task text is the user turn and the answer prefix starts the assistant turn; cwe's
  and vt's in-context example is part of the user turn (RULER puts it inside the model template).
- Randomness is one ``random.Random`` per sample keyed by (seed, task, length, index), so every sample
  can be rebuilt alone, and each sample's haystack is sized on its own (RULER sizes one per task and
  length and shrinks a sample that overflows); cwe's example words are never the sample's words,
  distractor keys never equal an asked key and chain values never repeat (RULER leaves those to chance).
"""

from __future__ import annotations

import functools
import logging
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sinklora.eval.ruler_haystacks import NOISE, Resources, word_lists

logger = logging.getLogger(__name__)

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.round(np.linspace(0, 100, 40))


@dataclass(frozen=True)
class Family:
    template: str
    answer_prefix: str
    tokens_to_generate: int
    metric: str  # "all": share of the answers found; "part": any answer found


FAMILIES: dict[str, Family] = {
    "niah": Family(
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
        "{type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are", 128, "all"),
    "variable_tracking": Family(
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
        "assigned the value {query}, they are: ", 30, "all"),
    "common_words_extraction": Family(
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
        "ones that appear most often.\n{context}\nQuestion: What are the {num_cw} most common words in the above list?",
        " Answer: The top {num_cw} words that appear most often in the list are:", 120, "all"),
    "freq_words_extraction": Family(
        "Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
        "the dots '....'. What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:", 50, "all"),
    "qa": Family(
        "Answer the question based on the given documents. Only give me the answer and do not output any other "
        "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
        "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
        " Answer:", 32, "part"),
}


def _niah(haystack: str, key: str = "words", value: str = "numbers", k: int = 1, v: int = 1, q: int = 1) -> dict:
    return {"family": "niah", "haystack": haystack, "key": key, "value": value, "k": max(k, q), "v": v, "q": q}


TASKS: dict[str, dict[str, Any]] = {
    "niah_single_1": _niah("noise"),
    "niah_single_2": _niah("essay"),
    "niah_single_3": _niah("essay", value="uuids"),
    "niah_multikey_1": _niah("essay", k=4),
    "niah_multikey_2": _niah("needle"),
    "niah_multikey_3": _niah("needle", key="uuids", value="uuids"),
    "niah_multivalue": _niah("essay", v=4),
    "niah_multiquery": _niah("essay", q=4),
    "vt": {"family": "variable_tracking"},
    "cwe": {"family": "common_words_extraction"},
    "fwe": {"family": "freq_words_extraction"},
    "qa": {"family": "qa"},
}


@dataclass
class RulerOptions:
    """Task settings (RULER's defaults) and whether to wrap prompts in the tokenizer's chat template."""

    vt_chains: int = 1
    vt_hops: int = 4
    cwe_freq_cw: int = 30
    cwe_freq_ucw: int = 3
    cwe_num_cw: int = 10
    fwe_alpha: float = 2.0
    chat: bool = True


@dataclass
class RulerSample:
    task: str
    length: int
    index: int
    prompt: str
    input_ids: list[int]
    answers: list[str]
    tokens_to_generate: int
    metric: str

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


# ----------------------------------------------------------------------------- the task families

def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        words = word_lists()
        return f"{rng.choice(words['adjective'])}-{rng.choice(words['noun'])}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"needle type {kind!r}: must be numbers, words or uuids")


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _insert_at_depths(rng: random.Random, sentences: list[str], items: list[str]) -> str:
    """RULER's essay insertion: each item after ``int(len * depth / 100)`` sentences, depths drawn from DEPTHS."""
    cuts = [0] + sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(items))) + [len(sentences)]
    parts = []
    for i in range(1, len(cuts)):
        parts.append(" ".join(sentences[cuts[i - 1]:cuts[i]]))
        if i - 1 < len(items):
            parts.append(items[i - 1])
    return " ".join(p for p in parts if p)


def _niah_text(rng: random.Random, n: int, spec: dict, opts: RulerOptions, res: Resources, length: int):
    keys: list[str] = []
    values: list[list[str]] = []
    needles = []
    while len(keys) < spec["k"]:
        key = _random_value(rng, spec["key"])
        if key in keys:
            continue
        keys.append(key)
        values.append([_random_value(rng, spec["value"]) for _ in range(spec["v"])])
        needles += [NEEDLE.format(type_needle_v=spec["value"], key=key, value=v) for v in values[-1]]
    rng.shuffle(needles)
    asked = rng.sample(range(spec["k"]), spec["q"])
    if spec["haystack"] == "essay":
        context = _insert_at_depths(rng, _sentences(" ".join(res.haystack_words(n))), needles)
    else:
        if spec["haystack"] == "noise":
            sentences = [NOISE] * n
        else:  # distractor needles, drawn from their own stream so that the first n never change with n
            drng, sentences = random.Random(rng.random()), []
            while len(sentences) < n:
                key = _random_value(drng, spec["key"])
                if key not in keys:
                    sentences.append(NEEDLE.format(type_needle_v=spec["value"], key=key,
                                                   value=_random_value(drng, spec["value"])))
        for at, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
            sentences.insert(at, needle)
        context = "\n".join(sentences)
    queries = [keys[i] for i in asked]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    fam, kind = FAMILIES["niah"], spec["value"]
    template, prefix = fam.template, fam.answer_prefix
    if spec["q"] * spec["v"] == 1:  # RULER's singular wording
        for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(a, b), prefix.replace(a, b)
        kind = kind[:-1]
    return (template.format(type_needle_v=kind, context=context, query=query),
            prefix.format(type_needle_v=kind, query=query), [v for i in asked for v in values[i]])


def _chains(rng: random.Random, chains: int, hops: int, letters: int, taken: set[str]) -> list[list[str]]:
    """``chains`` lists of hops + 1 fresh variable names; names and values never repeat."""
    out = []
    for _ in range(chains):
        names: list[str] = []
        while len(names) < hops + 1:
            name = "".join(rng.choices(string.ascii_uppercase, k=letters))
            if name not in taken:
                taken.add(name)
                names.append(name)
        value = str(rng.randint(10000, 99999))
        while value in taken:
            value = str(rng.randint(10000, 99999))
        taken.add(value)
        out.append([value] + names)
    return out


def _chain_lines(chain: list[str]) -> list[str]:
    value, names = chain[0], chain[1:]
    return [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(len(names) - 1)]


def _noise_with_chains(rng: random.Random, n: int, chains: list[list[str]]) -> str:
    sentences = [NOISE] * n
    for chain in chains:
        lines = _chain_lines(chain)
        for j, at in enumerate(sorted(rng.sample(range(len(sentences)), len(lines)))):
            sentences.insert(at + j, lines[j])
    return "\n".join(sentences).replace(". \n", ".\n")


def _vt_text(rng: random.Random, n: int, spec: dict, opts: RulerOptions, res: Resources, length: int):
    fam, taken = FAMILIES["variable_tracking"], set()
    chains = _chains(rng, opts.vt_chains, opts.vt_hops, 5, taken)
    example = _chains(rng, 1, opts.vt_hops, 3, taken)[0]  # RULER's in-context example: 3-letter names
    example_noise = _noise_with_chains(rng, max(5, opts.vt_hops + 1), [example])
    example_text = (fam.template.format(context=example_noise, query=example[0],
                                        num_v=opts.vt_hops + 1)
                    + fam.answer_prefix.format(num_v=opts.vt_hops + 1, query=example[0]) + " ".join(example[1:]))
    value = chains[0][0]
    context = _noise_with_chains(rng, n, chains)
    return (example_text + "\n\n" + fam.template.format(context=context, query=value, num_v=opts.vt_hops + 1),
            fam.answer_prefix.format(num_v=opts.vt_hops + 1, query=value), chains[0][1:])


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


@functools.lru_cache(maxsize=1)
def _cwe_vocabulary() -> tuple[str, ...]:
    w = word_lists()
    return tuple(sorted(set(w["noun"]) | set(w["adjective"]) | set(w["verb"])))


def _cwe_text(rng: random.Random, n: int, spec: dict, opts: RulerOptions, res: Resources, length: int):
    fam, num = FAMILIES["common_words_extraction"], opts.cwe_num_cw
    vocab = _cwe_vocabulary()
    if n > len(vocab) - 2 * num:
        raise ValueError(f"task 'cwe' at length {length} needs {n} distinct words; the word lists hold {len(vocab)}")
    order = rng.sample(range(len(vocab)), len(vocab))
    # RULER: below 4096 tokens the example repeats 3/1 times and the sample 6/1; from 4096, 10/3 and freq_cw/freq_ucw
    ex_reps, reps = ((3, 1), (6, 1)) if length < 4096 else ((10, 3), (opts.cwe_freq_cw, opts.cwe_freq_ucw))
    ex_words = [vocab[i] for i in order[:2 * num]]
    main_words = [vocab[i] for i in order[2 * num:2 * num + n]]

    def word_list(words: list[str], common: int, uncommon: int) -> list[str]:
        items = words[:num] * common + words[num:] * uncommon
        rng.shuffle(items)
        return items

    example = (fam.template.format(context=_numbered(word_list(ex_words, *ex_reps)), num_cw=num)
               + fam.answer_prefix.format(num_cw=num) + " " + _numbered(ex_words[:num]))
    context = _numbered(word_list(main_words, *reps))
    return (example + "\n" + fam.template.format(context=context, num_cw=num),
            fam.answer_prefix.format(num_cw=num), main_words[:num])


def zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta(alpha), alpha > 1: partial sum plus its Euler-Maclaurin tail (error ~ terms^-(alpha+3))."""
    n = terms
    head = sum(k ** -alpha for k in range(1, n))
    return head + n ** (1 - alpha) / (alpha - 1) + 0.5 * n ** -alpha + alpha * n ** (-alpha - 1) / 12


def _fwe_counts(n: int, vocab_size: int, alpha: float) -> list[int]:
    z = zeta(alpha)
    return [int(n * k ** -alpha / z) for k in range(1, vocab_size + 1)]


def fwe_min_words(alpha: float, vocab_size: int = 100) -> int:
    """The fewest words for which ranks 2, 3, 4 each occur strictly more often than rank 5."""
    n = 10
    while True:
        c = _fwe_counts(n, min(vocab_size, 5), alpha)
        if c[1] > c[2] > c[3] > c[4]:
            return n
        n += 10


def _fwe_text(rng: random.Random, n: int, spec: dict, opts: RulerOptions, res: Resources, length: int):
    fam = FAMILIES["freq_words_extraction"]
    vocab_size = max(5, (length - fam.tokens_to_generate) // 50)  # RULER: max_seq_length // 50
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # the most frequent "word" is noise
    words = [w for w, c in zip(ranked, _fwe_counts(n, vocab_size, opts.fwe_alpha)) for _ in range(c)]
    rng.shuffle(words)
    return fam.template.format(context=" ".join(words)), fam.answer_prefix, ranked[1:4]


def _qa_text(rng: random.Random, n: int, spec: dict, opts: RulerOptions, res: Resources, length: int):
    """``n`` lines of distractor passages (whole passages, the last one cut at a line), the gold passage
    among them at a random depth; passages are read again from the start if the corpus runs out."""
    fam, passages = FAMILIES["qa"], res.passages
    gold, line, speaker = rng.choice(res.questions)
    others = [i for i in range(len(passages)) if i != gold]
    rng.shuffle(others)
    depth = rng.random()
    docs: list[str] = []
    left, k = n, 0
    while left > 0:
        rows = passages[others[k % len(others)]].text.split("\n")
        docs.append("\n".join(rows[:left]).strip())
        left, k = left - len(rows), k + 1
    docs.insert(min(int(depth * (len(docs) + 1)), len(docs)), passages[gold].text)
    context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
    query = f'Which character speaks the line "{line}"? Give the speaker\'s name as the documents write it.'
    return fam.template.format(context=context, query=query), fam.answer_prefix, [speaker]


_BUILDERS: dict[str, Callable[..., tuple[str, str, list[str]]]] = {
    "niah": _niah_text, "variable_tracking": _vt_text, "common_words_extraction": _cwe_text,
    "freq_words_extraction": _fwe_text, "qa": _qa_text,
}


def _min_units(spec: dict, opts: RulerOptions) -> int:
    family = spec["family"]
    if family == "niah":
        return spec["k"] * spec["v"] if spec["haystack"] != "essay" else 1
    if family == "variable_tracking":
        return opts.vt_hops + 1
    if family == "common_words_extraction":
        return opts.cwe_num_cw + 1
    if family == "freq_words_extraction":
        return fwe_min_words(opts.fwe_alpha)
    return 1


# ----------------------------------------------------------------------------- prompts and lengths

def encode_prompt(tokenizer: Any, user_text: str, answer_prefix: str, chat: bool) -> tuple[str, list[int]]:
    """-> (prompt text, ids): the task as the user turn of the chat template, the answer prefix opening the
    assistant turn; without chat, the task text then the prefix (special tokens as the tokenizer adds them)."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True,
                                             tokenize=False) + answer_prefix
        return text, list(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
    text = user_text + answer_prefix
    return text, list(tokenizer(text, verbose=False).input_ids)


def make_sample(tokenizer: Any, task: str, length: int, index: int, seed: int = 0, opts: RulerOptions | None = None,
                res: Resources | None = None) -> RulerSample:
    """One sample of ``task`` whose prompt fills ``length - tokens_to_generate`` tokens as far as a haystack
    unit allows (the largest haystack found by a search that depends on this sample alone)."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not a RULER task; choose from {', '.join(TASKS)}")
    opts, res = opts or RulerOptions(), res or Resources()
    spec = TASKS[task]
    fam = FAMILIES[spec["family"]]
    budget = length - fam.tokens_to_generate
    key = f"ruler:{seed}:{task}:{length}:{index}"
    renders: dict[int, tuple[str, list[int], list[str]]] = {}

    def tokens(n: int) -> int:
        if n not in renders:
            user, prefix, answers = _BUILDERS[spec["family"]](random.Random(key), n, spec, opts, res, length)
            renders[n] = (*encode_prompt(tokenizer, user, prefix, opts.chat), answers)
        return len(renders[n][1])

    lo = _min_units(spec, opts)
    if tokens(lo) > budget:
        raise ValueError(f"length={length}: task {task!r} needs more than {tokens(lo) + fam.tokens_to_generate} "
                         "tokens (its smallest prompt plus the answer); ask for a longer length")
    lo, hi = _bracket(tokens, budget, lo)
    while hi - lo > 1:  # invariant: tokens(lo) <= budget < tokens(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if tokens(mid) <= budget else (lo, mid)
    text, ids, answers = renders[lo]
    return RulerSample(task, length, index, text, ids, answers, fam.tokens_to_generate, fam.metric)


def _bracket(tokens: Callable[[int], int], budget: int, lo: int) -> tuple[int, int]:
    """(lo, hi) with tokens(lo) <= budget < tokens(hi), from a guess extrapolated from two small haystacks."""
    probe = 2 * lo + 16
    if tokens(probe) > budget:
        return lo, probe
    per_unit = max((tokens(probe) - tokens(lo)) / (probe - lo), 1e-3)
    guess = max(probe, probe + int((budget - tokens(probe)) / per_unit))
    step = max(1, guess // 64)
    if tokens(guess) <= budget:
        lo = guess
        while tokens(lo + step) <= budget:
            lo, step = lo + step, step * 2
        return lo, lo + step
    hi = guess
    while tokens(max(probe, hi - step)) > budget:
        hi, step = max(probe, hi - step), step * 2
    return max(probe, hi - step), hi


def generate_samples(tokenizer: Any, tasks: Sequence[str], lengths: Sequence[int], samples: int, seed: int = 0,
                     opts: RulerOptions | None = None, res: Resources | None = None,
                     progress: bool = True) -> list[RulerSample]:
    """``samples`` samples for every (task, length), in that order; deterministic for a given seed and tokenizer."""
    from tqdm.auto import tqdm

    opts, res = opts or RulerOptions(), res or Resources()
    out = []
    bar = tqdm(total=len(tasks) * len(lengths) * samples, desc="ruler tasks", disable=not progress)
    for task in tasks:
        for length in lengths:
            for index in range(samples):
                out.append(make_sample(tokenizer, task, length, index, seed, opts, res))
                bar.update(1)
    bar.close()
    return out
