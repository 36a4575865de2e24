"""The built-in corpora: real text that ordinary packages happen to ship, fetched on first use.

* ``books`` -- Jane Austen's six novels, one document per chapter, grouped by novel (Debian's
  ``r-cran-janeaustenr``), so that :mod:`.sources` can hold out whole novels.
* ``wiki`` -- about a hundred English Wikipedia articles from 2016 (a test dump in the gensim wheel).
* ``news`` -- the Lee corpus of Australian news articles (also in the gensim wheel).
* ``jargon`` -- the Jargon File 4.4.7, hacker slang defined in hacker prose, one document per entry (Debian's
  ``dict-jargon``): text far from all three, for validation (a study that validates on it also prefers what
  carries beyond its calibration text; ``bench/generalise.py --far-validation``): one of :data:`FAR_SOURCES`,
  not of :data:`BUILTIN_SOURCES`, the sources that calibrate and hold one another out by default.

Borrowing the files from packages means no download site of our own and nothing bundled in this
repository; ``pip`` and ``apt-get`` already know how to reach their registries. Each corpus is parsed
once and cached as JSON under ``cache_dir("corpora")``: a list of documents, or for ``books`` an object
mapping each novel's title to its list of chapters.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..cache import atomic_path, cache_dir
from ..errors import AdaPrunerError, FetchError
from ..fetch import LOCAL_TEXT_HINT, deb_member, wheel_member
from .rdata import read_lazyload
from .wikimarkup import iter_articles

# Bump when the parsing below or the cache files' layout changes, so that older caches are rebuilt.
FORMAT_VERSION = 2

JANEAUSTENR = "r-cran-janeaustenr"
JANEAUSTENR_DATA = "usr/lib/R/site-library/janeaustenr/data"
GENSIM, GENSIM_VERSION = "gensim", "4.4.0"
GENSIM_DATA = "gensim/test/test_data"
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_CORPUS = "lee_background.cor"
JARGON = "dict-jargon"
JARGON_DATA = "usr/share/dictd/jargon"  # .dict.dz (gzip) and .index (headword, offset, length; dictd's base 64)
_DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

# Pages shorter than this are stubs or lists that survived markup stripping, not articles.
MIN_ARTICLE_CHARS = 200

_CHAPTER_HEADING = re.compile(r"chapter\s+(?:[ivxlc]+|\d+)\.?", re.I)
_VOLUME_HEADING = re.compile(r"volume\s+[ivx]+\.?", re.I)
# What follows the last chapter: an end mark, or (Northanger Abbey) an editor's note on the text.
_BACK_MATTER = re.compile(r"finis|the end|a note on the text", re.I)
_SCENE_BREAK = re.compile(r"[*\s]+")


def _raw_dir(sub: str) -> Path:
    """Where the files taken from packages are kept, next to the parsed corpora."""
    return cache_dir("corpora") / "raw" / sub


def _paragraphs(lines: Iterable[str | None]) -> Iterator[str]:
    """Blank-line separated blocks of a text stored one printed line per element, each unwrapped."""
    block: list[str] = []
    for line in lines:
        text = (line or "").strip()
        if text:
            block.append(text)
        elif block:
            yield " ".join(block)
            block = []
    if block:
        yield " ".join(block)


def _chapters(lines: Iterable[str | None]) -> list[str]:
    """A novel's chapters as paragraphs separated by blank lines; headings, title page and end dropped."""
    chapters: list[list[str]] = []
    for paragraph in _paragraphs(lines):
        if _CHAPTER_HEADING.fullmatch(paragraph):
            chapters.append([])
        elif _BACK_MATTER.fullmatch(paragraph):
            break
        elif chapters and not (_VOLUME_HEADING.fullmatch(paragraph) or _SCENE_BREAK.fullmatch(paragraph)):
            # Underscores are the Gutenberg transcription's italics (_them_); whitespace runs are layout.
            chapters[-1].append(" ".join(paragraph.replace("_", "").split()))
    return ["\n\n".join(chapter) for chapter in chapters if chapter]


def austen_novels() -> dict[str, list[str]]:
    """The chapters of each of Jane Austen's six novels, by the title the R package gives it ("emma")."""
    folder = _raw_dir(JANEAUSTENR)
    files = {
        suffix: deb_member(JANEAUSTENR, f"{JANEAUSTENR_DATA}/Rdata.{suffix}", folder / f"Rdata.{suffix}")
        for suffix in ("rdx", "rdb")
    }
    novels = read_lazyload(files["rdx"], files["rdb"])
    return {title: _chapters(lines) for title, lines in novels.items() if isinstance(lines, list)}


def _gensim_test_file(name: str) -> Path:
    return wheel_member(GENSIM, GENSIM_VERSION, f"{GENSIM_DATA}/{name}", _raw_dir(f"{GENSIM}-{GENSIM_VERSION}") / name,
                        binary_only=True)


def wikipedia_articles() -> list[str]:
    """The articles of gensim's shortened 2016 English Wikipedia dump, as plain prose."""
    return [text for _, text in iter_articles(_gensim_test_file(WIKI_DUMP)) if len(text) >= MIN_ARTICLE_CHARS]


def lee_articles() -> list[str]:
    """The Lee background corpus: short Australian news articles, one per line."""
    lines = _gensim_test_file(LEE_CORPUS).read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _dictd_number(digits: str) -> int:
    """A number as a dictd index writes it: base 64, most significant digit first."""
    value = 0
    for digit in digits:
        value = value * 64 + _DICTD_DIGITS.index(digit)
    return value


def dictd_entries(index: str, text: bytes) -> list[str]:
    """The entries of a dictd dictionary (each its headword's line, then the definition), in the order of its data
    file, each once however many headwords point at it, the dictionary's own ``00-database-*`` entries left out."""
    spans = {}
    for line in index.splitlines():
        offset, length = line.split("\t")[1:3]
        spans[_dictd_number(offset)] = _dictd_number(length)
    entries = (text[start:start + spans[start]].decode("utf-8") for start in sorted(spans))
    return [entry for entry in entries if not entry.startswith("00-database")]


def jargon_entries() -> list[str]:
    """The Jargon File's entries, each its headword and the definition's paragraphs (the line of pronunciation and
    part of speech, and the braces that mark cross-references, dropped)."""
    folder = _raw_dir(JARGON)
    files = {suffix: deb_member(JARGON, f"{JARGON_DATA}.{suffix}", folder / f"jargon.{suffix}")
             for suffix in ("index", "dict.dz")}
    documents = []
    for entry in dictd_entries(files["index"].read_text(encoding="utf-8"),
                               gzip.decompress(files["dict.dz"].read_bytes())):
        headword, _, rest = entry.replace("{", "").replace("}", "").partition("\n")
        body = rest.partition("\n\n")[2]  # below the line of pronunciation
        document = "\n\n".join([headword.strip(), *_paragraphs(body.splitlines())])
        if len(document) >= MIN_ARTICLE_CHARS:
            documents.append(document)
    return documents


# A corpus is a list of independent documents, or, when its documents are parts of larger works, each
# work's documents by title.
Corpus = list[str] | dict[str, list[str]]

_CORPORA: dict[str, Callable[[], Corpus]] = {
    "books": austen_novels,
    "wiki": wikipedia_articles,
    "news": lee_articles,
    "jargon": jargon_entries,
}
# The sources that calibrate, validate and hold one another out by default (:func:`.heldout.default_heldout`), and
# those far from all of them, for validation, never held out by default.
BUILTIN_SOURCES: tuple[str, ...] = ("books", "wiki", "news")
FAR_SOURCES: tuple[str, ...] = ("jargon",)
BUILTIN_TEXTS: tuple[str, ...] = tuple(_CORPORA)  # every built-in text: the sources, then the far ones
# Two kinds of text by default, so that validation does not reward fitting one of them.
DEFAULT_CALIBRATION: tuple[str, ...] = ("builtin:books", "builtin:wiki")


def _is_corpus(value: Any) -> bool:
    """Whether JSON read back from a cache file has a corpus's shape (a damaged file may not)."""
    if isinstance(value, dict):
        return all(isinstance(docs, list) and all(isinstance(d, str) for d in docs) for docs in value.values())
    return isinstance(value, list) and all(isinstance(d, str) for d in value)


def builtin_corpus(name: str) -> Corpus:
    """Built-in corpus ``name`` (see :data:`Corpus`), fetched and parsed on first use, then read from cache."""
    if name not in BUILTIN_TEXTS:
        raise AdaPrunerError(f"unknown built-in text source {name!r}; choose one of: {', '.join(BUILTIN_TEXTS)}")
    path = cache_dir("corpora") / f"{name}.v{FORMAT_VERSION}.json"
    if path.exists():
        try:
            corpus = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:  # a damaged cache file is rebuilt, not reported
            corpus = None
        if _is_corpus(corpus):
            return corpus
    try:
        corpus = _CORPORA[name]()
    except FetchError as exc:  # the package registry is out of reach: say how to go on without it
        raise FetchError(f"{' '.join(str(exc).split())}; {LOCAL_TEXT_HINT}") from None
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(corpus, ensure_ascii=False), encoding="utf-8")
    return corpus
