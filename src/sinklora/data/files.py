"""A user's data files, read strictly: UTF-8 text (.txt/.md), JSON lists and JSON Lines, saved Hugging
Face datasets, and cheap checks of a source before any work starts.

Bytes that are not UTF-8, or NUL bytes (a binary file, or UTF-16), are never replaced silently: the error
names the file and the line, and ``on_error="skip"`` skips the file (or the JSONL line) with a count.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".json", ".jsonl")
OnError = Literal["fail", "skip"]
_SKIP_HINT = "; on_error=skip skips such files with a count"


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def decode_text(data: bytes, where: str) -> str:
    """``data`` as UTF-8, or ValueError naming ``where``, the line and the offending byte."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"{where}: line {_line_of(data, nul)}: NUL bytes: a binary (or UTF-16) file, not UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: line {_line_of(data, e.start)}: byte 0x{data[e.start]:02x} is not UTF-8; "
                         "convert the file (e.g. iconv -f latin1 -t utf-8)") from None


def read_text_files(files: list[Path], on_error: OnError = "fail") -> list[tuple[Path, str]]:
    """``[(file, text)]`` of the files that decode; unreadable ones fail (naming them) or are skipped, counted."""
    out, skipped = [], []
    for f in files:
        try:
            out.append((f, decode_text(f.read_bytes(), str(f))))
        except ValueError as e:
            if on_error == "fail":
                raise ValueError(f"{e}{_SKIP_HINT}") from None
            skipped.append(str(e))
    if skipped:
        log.warning("skipped %d of %d files that are not UTF-8 text; first: %s", len(skipped), len(files), skipped[0])
    return out


def text_files(folder: Path) -> Iterator[Path]:
    """.txt/.md files under ``folder`` (recursively, sorted), hidden files and folders left out."""
    for f in sorted(folder.rglob("*")):
        hidden = any(p.startswith(".") for p in f.relative_to(folder).parts)
        if f.suffix in TEXT_SUFFIXES and f.is_file() and not hidden:
            yield f


def read_json_records(path: Path, on_error: OnError = "fail") -> list[tuple[str, Any]]:
    """``[(where, record)]`` from a JSON list (``.json``) or JSON Lines (``.jsonl``) file, where
    ``where`` reads ``FILE: record N`` (1-based, plus the line number for JSONL). A JSONL line that is not
    UTF-8 or not JSON fails naming the line, or with ``on_error="skip"`` is skipped (counted)."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix != ".jsonl":
        text = decode_text(data, str(path))
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); JSON Lines files must end in .jsonl") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
        return [(f"{path}: record {i + 1}", r) for i, r in enumerate(records)]
    rows, bad = [], []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = _decode_line(raw, path, n)
            if line.strip():
                rows.append((f"{path}: record {len(rows) + 1} (line {n})", json.loads(line)))
        except json.JSONDecodeError as e:
            bad.append(f"{path}: line {n} is not valid JSON ({e})")
        except ValueError as e:
            bad.append(str(e))
        if bad and on_error == "fail":
            raise ValueError(bad[0] + "; on_error=skip skips such lines with a count")
    if bad:
        log.warning("%s: skipped %d unreadable line(s); first: %s", path, len(bad), bad[0])
    return rows


def _decode_line(raw: bytes, path: Path, n: int) -> str:
    try:
        return decode_text(raw, str(path))
    except ValueError as e:  # decode_text counts lines within `raw`, which is one line: name the file's line
        raise ValueError(str(e).replace(f"{path}: line 1:", f"{path}: line {n}:", 1)) from None


def is_saved_dataset(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def import_datasets():
    try:
        import datasets
    except ImportError:
        raise ValueError("Hugging Face datasets need the `datasets` package: pip install datasets") from None
    return datasets


def load_hf_rows(name: str, split: str | None = "train"):
    """A ``datasets.Dataset`` from a hub name or a saved folder (``save_to_disk``); lazily imports datasets."""
    datasets = import_datasets()
    split = split or "train"
    if Path(name).is_dir() and is_saved_dataset(Path(name)):
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset {name!r} has no split {split!r}; it has {sorted(ds)}")
            ds = ds[split]
        return ds
    return datasets.load_dataset(name, split=split)


def source_path(source: str) -> tuple[Path, str]:
    """A user source's path and text field: ``data.jsonl:body`` -> (data.jsonl, "body"); else (path, "text")."""
    path, field = Path(source).expanduser(), "text"
    if not path.exists() and ":" in source:
        head, tail = source.rsplit(":", 1)
        if Path(head).suffix in RECORD_SUFFIXES:
            path, field = Path(head).expanduser(), tail
    return path, field


def is_single_text_file(source: str) -> bool:
    """A source that is one .txt/.md file: one document, used whole for every split."""
    path = Path(source).expanduser()
    return path.is_file() and path.suffix in TEXT_SUFFIXES


def check_user_source(source: str, key: str) -> str | None:
    """A cheap check of a path or ``hf:`` source (no reading beyond a folder listing); the error or None."""
    if source.startswith("hf:"):
        if importlib.util.find_spec("datasets") is None:
            return f"{key}={source!r}: Hugging Face datasets need the `datasets` package (pip install datasets)"
        return None
    path, _ = source_path(source)
    if not path.exists():
        return None  # the caller knows the built-in names and says what is accepted
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES + RECORD_SUFFIXES:
            return (f"{key}={source!r}: a {path.suffix or 'suffix-less'} file; give a .txt/.md text file, a "
                    ".json/.jsonl file of records, or a folder of .txt/.md files")
        if path.stat().st_size == 0:
            return f"{key}={source!r}: the file is empty"
    elif not is_saved_dataset(path) and next(text_files(path), None) is None:
        return f"{key}={source!r}: the folder holds no .txt or .md files (searched recursively)"
    return None
