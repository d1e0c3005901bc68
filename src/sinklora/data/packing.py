"""Tokenise documents (cached on disk) and pack them into fixed-length training rows."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from sinklora import atomic
from sinklora.data.corpora import Document
from sinklora.data.corpora import cache_dir as default_cache_dir

log = logging.getLogger(__name__)

# Encoded to fingerprint a tokenizer: two tokenizers that agree on these and on name and vocab size
# are treated as the same for caching.
_PROBES = ("Hello, world!", "  To be, or not to be: that is the question.\n", "def f(x):\n\treturn x**2 # ünïcödé 数学")


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's identity: name_or_path, vocab size and a few encodings."""
    probes = [tokenizer.encode(p, add_special_tokens=False) for p in _PROBES]
    ident = {"name": str(getattr(tokenizer, "name_or_path", "")), "vocab": len(tokenizer), "probes": probes}
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def _cache_key(docs: Sequence[Document], tokenizer) -> str:
    h = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
    for d in docs:
        h.update(d.name.encode() + b"\0" + hashlib.sha1(d.text.encode()).digest())
    return h.hexdigest()[:24]


def _encode(texts: list[str], tokenizer) -> list[list[int]]:
    # verbose=False: documents are far longer than model_max_length on purpose
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def tokenize_documents(docs: Sequence[Document], tokenizer, cache_dir: str | Path | None = None, *,
                       use_cache: bool = True, batch_size: int = 8) -> list[list[int]]:
    """Token ids of every document (no special tokens added), in order.

    Cached under ``cache_dir`` (default ``$SINKLORA_CACHE/tokens``), keyed by the tokenizer's
    fingerprint and every document's name and text hash, so a second run loads in well under a second.
    """
    key = _cache_key(docs, tokenizer)
    path = Path(cache_dir or default_cache_dir() / "tokens") / f"{key}.npz"
    if use_cache and path.is_file():
        with np.load(path) as z:
            flat, lengths = z["ids"], z["lengths"]
        if len(lengths) == len(docs):
            splits = np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []
            log.info("loaded %d tokens of %d documents from %s", len(flat), len(docs), path)
            return [s.tolist() for s in splits]
    out: list[list[int]] = []
    with tqdm(total=sum(len(d.text) for d in docs), desc="tokenizing", unit="char", unit_scale=True) as bar:
        for i in range(0, len(docs), batch_size):
            batch = [d.text for d in docs[i:i + batch_size]]
            out += _encode(batch, tokenizer)
            bar.update(sum(map(len, batch)))
    if use_cache:
        flat = np.fromiter((t for ids in out for t in ids), dtype=np.int32, count=sum(map(len, out)))
        with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:  # a concurrent reader never sees half a file
            np.savez(f, ids=flat, lengths=np.array([len(ids) for ids in out], dtype=np.int64))
    log.info("tokenized %d documents: %d tokens", len(docs), sum(map(len, out)))
    return out


def pack_documents(token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> torch.LongTensor:
    """Concatenate documents, each followed by ``eos_id``, and cut into rows of exactly ``seq_len``.

    The stream is ``doc0 EOS doc1 EOS ... docN EOS``; the tail that does not fill a row is dropped.
    Returns a ``(rows, seq_len)`` LongTensor.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: must be >= 1")
    if eos_id is None or int(eos_id) < 0:
        raise ValueError(f"eos_id={eos_id!r}: must be a token id >= 0 (the tokenizer's eos_token_id)")
    total = sum(len(t) + 1 for t in token_lists)
    rows = total // seq_len
    if rows < 1:
        raise ValueError(
            f"pack_documents: {len(token_lists)} documents hold {total} tokens (with EOS separators) but one "
            f"row needs seq_len={seq_len}; use more documents or a smaller seq_len"
        )
    stream = torch.empty(total, dtype=torch.long)
    pos = 0
    for ids in token_lists:
        stream[pos:pos + len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        stream[pos + len(ids)] = int(eos_id)
        pos += len(ids) + 1
    dropped = total - rows * seq_len
    log.info("packed %d tokens into %d rows of %d (%d tokens dropped)", total, rows, seq_len, dropped)
    return stream[: rows * seq_len].view(rows, seq_len)  # (rows, seq_len)


def long_documents(token_lists: Sequence[Sequence[int]], min_len: int) -> list[int]:
    """Indices of the documents with at least ``min_len`` tokens; logs how many were skipped.

    Raises ValueError when no document is long enough, naming the longest one found.
    """
    if min_len < 1:
        raise ValueError(f"min_len={min_len}: must be >= 1")
    keep = [i for i, ids in enumerate(token_lists) if len(ids) >= min_len]
    skipped = len(token_lists) - len(keep)
    if not keep:
        longest = max((len(ids) for ids in token_lists), default=0)
        raise ValueError(f"no document has >= {min_len} tokens (the longest of {len(token_lists)} has "
                         f"{longest}); use a shorter length or a corpus with longer documents")
    log.info("%d of %d documents have >= %d tokens (%d skipped as too short)",
             len(keep), len(token_lists), min_len, skipped)
    return keep
