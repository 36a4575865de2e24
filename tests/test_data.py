"""Text sources without the network: the R and MediaWiki readers on files written here, the
document split, and every kind of spec string except the built-in corpora (see test_data_real.py)."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import struct
import zlib
from pathlib import Path

import pytest
from helpers import make_documents

from adapruner.cache import cache_dir
from adapruner.data import (
    BUILTIN_SOURCES,
    BUILTIN_TEXTS,
    FAR_SOURCES,
    SPLITS,
    TextSource,
    load_source,
    load_sources,
    split_documents,
)
from adapruner.data import builtin as builtin_module
from adapruner.data.rdata import RDataError, read_lazyload, unserialize
from adapruner.data.sources import split_works
from adapruner.data.wikimarkup import iter_articles, strip_markup
from adapruner.errors import AdaPrunerError, FetchError
from adapruner.fetch import LOCAL_TEXT_HINT

# --- R lazy-load databases ----------------------------------------------------------------------


class XdrWriter:
    """Just enough of R's XDR serialization to write what the reader must read back."""

    def __init__(self) -> None:
        self.out = bytearray(b"X\n")
        self.symbols: list[str] = []
        self.ints(3, 0x040201, 0x030500)  # format 3, written by R 4.2.1, readable from R 3.5.0
        self.ints(5)
        self.out += b"UTF-8"

    def ints(self, *values: int) -> None:
        self.out += struct.pack(f">{len(values)}i", *values)

    def charsxp(self, text: str | None, latin1: bool = False) -> None:
        if text is None:
            self.ints(9, -1)
            return
        raw = text.encode("latin-1" if latin1 else "utf-8")
        levels = 4 if latin1 else (64 if text.isascii() else 8)  # LATIN1 / ASCII / UTF8 masks
        self.ints(9 | levels << 12, len(raw))
        self.out += raw

    def strings(self, values: list[str | None], latin1: bool = False) -> None:
        self.ints(16, len(values))
        for value in values:
            self.charsxp(value, latin1)

    def symbol(self, name: str) -> None:
        if name in self.symbols:  # later uses are back-references, packed into the flags word
            self.ints((self.symbols.index(name) + 1) << 8 | 255)
        else:
            self.symbols.append(name)
            self.ints(1)
            self.charsxp(name)

    def named_list(self, items: dict[str, object]) -> None:
        self.ints(19 | 1 << 9, len(items))  # VECSXP with attributes
        for value in items.values():
            self.value(value)
        self.ints(2 | 1 << 10)  # pairlist node with a tag: names = c(...)
        self.symbol("names")
        self.strings(list(items))
        self.ints(254)

    def value(self, value: object) -> None:
        if isinstance(value, dict):
            self.named_list(value)
        elif isinstance(value, bool):
            self.ints(10, 1, int(value))
        elif isinstance(value, int):
            self.ints(13, 1, value)
        elif isinstance(value, tuple):
            self.ints(13, len(value), *value)
        else:
            self.strings(value)

    @classmethod
    def serialize(cls, value: object) -> bytes:
        writer = cls()
        writer.value(value)
        return bytes(writer.out)


def compress_entry(data: bytes, compression: int) -> bytes:
    """An .rdb entry as R writes it: big-endian length, then the data compressed by ``compression``."""
    length = struct.pack(">I", len(data))
    if compression == 1:
        return length + zlib.compress(data)
    if compression == 2:
        return length + b"2" + bz2.compress(data)
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
    return length + b"Z" + lzma.compress(data, format=lzma.FORMAT_RAW, filters=filters)


def write_lazyload(folder: Path, variables: dict[str, list], compression: int = 1) -> tuple[Path, Path, dict]:
    store, keys = bytearray(), {}
    for name, value in variables.items():
        entry = compress_entry(XdrWriter.serialize(value), compression)
        keys[name] = (len(store), len(entry))
        store += entry
    flag = True if compression == 1 else compression
    index = {"variables": keys, "references": {}, "compressed": flag}
    (folder / "Rdata.rdb").write_bytes(store)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(XdrWriter.serialize(index)))
    return folder / "Rdata.rdx", folder / "Rdata.rdb", keys


NOVEL = ["EMMA", "", "CHAPTER I", "", "Emma Woodhouse, handsome,", "clever, and rich", None, "Café ünïcode ✓"]


@pytest.mark.parametrize("compression", [1, 2, 3])
def test_lazyload_round_trip(tmp_path, compression):
    rdx, rdb, keys = write_lazyload(tmp_path, {"emma": NOVEL, "other": ["a", "b"]}, compression)
    index = unserialize(gzip.decompress(rdx.read_bytes()))
    assert index["variables"] == {name: list(key) for name, key in keys.items()}
    assert read_lazyload(rdx, rdb) == {"emma": NOVEL, "other": ["a", "b"]}


def test_lazyload_latin1_and_errors(tmp_path):
    writer = XdrWriter()
    writer.strings(["naïve"], latin1=True)
    assert unserialize(bytes(writer.out)) == ["naïve"]
    with pytest.raises(RDataError, match="unsupported R object type 3"):
        unserialize(bytes(XdrWriter().out) + struct.pack(">i", 3))  # a closure
    with pytest.raises(RDataError, match="truncated"):
        unserialize(XdrWriter.serialize(["abc"])[:-2])
    rdx, rdb, _ = write_lazyload(tmp_path, {"emma": NOVEL})
    rdb.write_bytes(rdb.read_bytes()[:10])
    with pytest.raises(RDataError, match="outside the file"):
        read_lazyload(rdx, rdb)


# --- MediaWiki markup ---------------------------------------------------------------------------


def test_strip_markup_templates_refs_and_links():
    text = (
        "{{Infobox person|name=X|birth={{birth date|1900|1|1}}|spouse={{marriage|[[Y]]}}}}\n"
        "'''Ada''' ({{IPA|ˈeɪdə}}) was a [[mathematician|mathematical]] [[pioneer]]s "
        "<!-- editors: cite this -->who wrote notes.<ref name=\"a\">{{cite book|title=T}}</ref> "
        "She met [[Charles Babbage]].<ref name=\"a\" /> See [http://example.org the site] "
        "and [http://example.org/bare].&nbsp;Fish &amp; chips &lt;3 ''italic'' <span class=\"x\">kept</span>.\n"
        "[[File:Ada.jpg|thumb|Ada with [[Charles Babbage|Babbage]] and a [[cat]].]]\n"
        "[[Image:B.png|left]]\n"
        "[[Category:Mathematicians]]\n[[de:Ada Lovelace]]"
    )
    assert strip_markup(text) == (
        "Ada was a mathematical pioneers who wrote notes. She met Charles Babbage. See the site "
        "and. Fish & chips <3 italic kept."
    )


def test_strip_markup_structure():
    text = (
        "Intro line one\nwith a break.\n\n"
        "{| class=\"wikitable\"\n|-\n| cell {{flag|X}} || [[a|b]]\n|}\n"
        "== History ==\n"
        "Early text.\n"
        "=== Origins ===\n"
        "* first item\n# numbered item\n: indented\n"
        "== Data ==\n"
        "{|\n| only a table\n|}\n"
        "== See also ==\n* [[Other]]\n"
        "== References ==\n{{reflist}}\n"
        "=== Notes ===\nmore\n"
        "== Legacy ==\n"
        "Later &mdash; text.\n"
        "==External links==\n* [http://x.org X]\n[[Category:Y]]\n"
    )
    assert strip_markup(text) == (
        "Intro line one\nwith a break.\n\n"
        "History\n\nEarly text.\n\n"
        "Origins\n\nfirst item\nnumbered item\nindented\n\n"
        "Legacy\n\nLater — text."
    )


def test_strip_markup_survives_broken_markup():
    assert strip_markup("Open {{template and text}} }} end") == "Open end"
    assert strip_markup("Stray {{ opener then {{t}} words") == "Stray opener then words"
    assert strip_markup("[[:Category:Foo]] and [[Paris (band)|]]") == "Category:Foo and Paris"


DUMP = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">
  <siteinfo><sitename>Wikipedia</sitename></siteinfo>
  <page><title>Alpha</title><ns>0</ns><id>1</id>
    <revision><text xml:space="preserve">'''Alpha''' is the [[Greek alphabet|first]] letter.{{stub}}</text></revision>
  </page>
  <page><title>AlphaRedirect</title><ns>0</ns><id>2</id><redirect title="Alpha" />
    <revision><text xml:space="preserve">#REDIRECT [[Alpha]]</text></revision>
  </page>
  <page><title>Old redirect</title><ns>0</ns><id>3</id>
    <revision><text xml:space="preserve">#redirect [[Alpha]]</text></revision>
  </page>
  <page><title>Talk:Alpha</title><ns>1</ns><id>4</id>
    <revision><text xml:space="preserve">Discussion.</text></revision>
  </page>
  <page><title>Alpha (disambiguation)</title><ns>0</ns><id>5</id>
    <revision><text xml:space="preserve">'''Alpha''' may refer to: {{disambiguation}}</text></revision>
  </page>
  <page><title>Beta</title><ns>0</ns><id>6</id>
    <revision><text xml:space="preserve">Beta &amp;amp; gamma.&lt;ref&gt;A source.&lt;/ref&gt;</text></revision>
  </page>
</mediawiki>
"""


def test_iter_articles(tmp_path):
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(DUMP.encode()))
    assert list(iter_articles(path)) == [("Alpha", "Alpha is the first letter."), ("Beta", "Beta & gamma.")]


# --- Splitting documents ------------------------------------------------------------------------


def test_dictd_entries_follow_the_data_file_once_each():
    def number(value: int) -> str:  # dictd's base 64, most significant digit first
        digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        out = digits[value % 64]
        while value >= 64:
            value //= 64
            out = digits[value % 64] + out
        return out

    parts = ["00-database-short\n  A dictionary\n", "zeta\n /zay·t*/, n.\n\n    Last, ‘here’.\n",
             "alpha\n //\n\n    First.\n" + "x" * 70]  # offsets past 64 need two digits
    text = "".join(parts).encode()
    starts = [0]
    for part in parts[:-1]:
        starts.append(starts[-1] + len(part.encode()))
    index = [f"{word}\t{number(start)}\t{number(len(part.encode()))}"
             for word, start, part in zip(("00-database-short", "zeta", "alpha"), starts, parts, strict=True)]
    index.append(f"omega\t{number(starts[1])}\t{number(len(parts[1].encode()))}")  # a second headword, one entry
    assert number(starts[2]) != number(starts[2])[-1:]  # the test reaches a two-digit offset
    entries = builtin_module.dictd_entries("\n".join(sorted(index)), text)
    assert entries == parts[1:]


def test_split_documents_is_disjoint_stable_and_order_free():
    docs = make_documents(40, words_per_doc=30)
    source = split_documents("s", docs + docs[:5] + ["  \n"])
    assert (len(source.test), len(source.validation), len(source.pool)) == (4, 4, 32)
    parts = [set(source.part(split)) for split in ("pool", "validation", "test")]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 40
    assert split_documents("s", list(reversed(docs))) == source
    assert split_documents("s", docs).hashes == source.hashes
    assert len(set(source.hashes.values())) == 3
    assert all(len(h) == 64 for h in source.hashes.values())


def test_split_documents_sizes_and_hash_changes():
    docs = make_documents(12, words_per_doc=20)
    source = split_documents("s", docs, validation=0.25, test=0.2)
    assert (len(source.test), len(source.validation), len(source.pool)) == (3, 3, 6)
    tiny = split_documents("tiny", ["a", "b", "c"])
    assert sorted(tiny.pool + tiny.validation + tiny.test) == ["a", "b", "c"]
    changed = split_documents("s", [*docs[:-1], docs[-1] + " More."], validation=0.25, test=0.2)
    assert changed.hashes != source.hashes
    assert isinstance(source, TextSource)
    assert "pool=6" in repr(source)


def test_split_documents_errors():
    with pytest.raises(AdaPrunerError, match="2 distinct documents, too few"):
        split_documents("s", ["a", "b", "a", " "])
    with pytest.raises(AdaPrunerError, match="too few"):
        split_documents("s", ["a", "b", "c", "d"], validation=0.5, test=0.5)
    with pytest.raises(AdaPrunerError, match="unknown split 'train'"):
        split_documents("s", ["a", "b", "c"]).part("train")


def test_split_description_by_document():
    source = split_documents("s", make_documents(20, words_per_doc=20))
    assert source.works == {}
    assert source.split_description == "by document: pool 16, validation 2, test 2 documents"


def make_works(n_works: int = 6, chapters: int = 5) -> dict[str, list[str]]:
    """Novels of a few chapters each, by title."""
    return {f"Novel {i}": make_documents(chapters, words_per_doc=30, seed=i + 1) for i in range(n_works)}


def parts_holding(source: TextSource, chapters: list[str]) -> list[str]:
    """The parts holding any of ``chapters``."""
    return [split for split in SPLITS if set(chapters) & set(source.part(split))]


def test_split_works_keeps_each_work_in_one_part():
    works = make_works()
    source = split_works("s", works)
    assert all(len(parts_holding(source, chapters)) == 1 for chapters in works.values())
    assert sorted(title for split in SPLITS for title in source.works[split]) == sorted(works)
    assert all(set(works[title]) <= set(source.part(split)) for split in SPLITS for title in source.works[split])


def test_split_works_holds_out_one_whole_work_each():
    works = make_works()
    source = split_works("s", works)
    [test_title], [validation_title] = source.works["test"], source.works["validation"]
    assert source.test == tuple(works[test_title])  # whole, chapters in reading order
    assert source.validation == tuple(works[validation_title])
    assert len(source.pool) == 4 * 5
    described = f"by work: test = {test_title}; validation = {validation_title}; pool = 4 other works"
    assert source.split_description == described


def test_split_works_is_order_free():
    works = make_works()
    source = split_works("s", works)
    again = split_works("s", dict(reversed(works.items())))
    assert again == source
    assert again.hashes == source.hashes


def test_split_works_drops_blanks_and_repeats_and_needs_three_works():
    works = make_works(3, chapters=2)
    test_title = split_works("s", works).works["test"][0]
    repeated = {title: [*chapters, " ", works[test_title][0]] for title, chapters in works.items()}
    source = split_works("s", repeated)
    assert len(source.pool + source.validation + source.test) == 6
    with pytest.raises(AdaPrunerError, match="has 2 works, too few"):
        split_works("s", dict(list(works.items())[:2]))


def test_books_are_cut_by_novel_and_a_damaged_cache_is_rebuilt(monkeypatch):
    works = make_works()
    monkeypatch.setitem(builtin_module._CORPORA, "books", lambda: works)  # no package fetch
    cache = cache_dir("corpora") / f"books.v{builtin_module.FORMAT_VERSION}.json"
    cache.write_text(json.dumps({"Novel 0": ["A chapter.", 3]}))  # damaged: a chapter that is not text
    assert load_source("builtin:books") == split_works("books", works)
    assert json.loads(cache.read_text()) == works


# --- Spec strings ---------------------------------------------------------------------------------


def test_local_text_file(tmp_path):
    path = tmp_path / "novel.txt"
    path.write_text("\n\n\n".join(make_documents(60, words_per_doc=100)), encoding="utf-8")
    source = load_source(str(path))
    assert source.name == str(path)
    docs = source.pool + source.validation + source.test
    assert 20 <= len(docs) <= 60
    assert len(source.test) >= 2
    assert sum(map(len, docs)) >= 0.95 * len(path.read_text())


def test_local_folder(tmp_path):
    for i, doc in enumerate(make_documents(12, words_per_doc=40)):
        folder = tmp_path / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        (folder / f"{i}.md").write_text(doc, encoding="utf-8")
    (tmp_path / "notes.csv").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("ignored too")
    source = load_source(str(tmp_path))
    assert len(source.pool + source.validation + source.test) == 12
    assert "ignored" not in "".join(source.pool + source.validation + source.test)


def test_small_folder_is_cut_at_blank_lines(tmp_path):
    (tmp_path / "one.txt").write_text("\n\n".join(make_documents(30, words_per_doc=40, seed=1)))
    (tmp_path / "two.txt").write_text("\n\n".join(make_documents(30, words_per_doc=40, seed=2)))
    assert len(load_sources([str(tmp_path)])[0].pool) > 10


def test_spec_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(AdaPrunerError, match=f"not found.*{re.escape(str(missing))}"):
        load_source(str(missing))
    with pytest.raises(AdaPrunerError, match="did you mean builtin:books"):
        load_source("books")
    with pytest.raises(AdaPrunerError, match="unknown built-in text source 'novels'; choose one of: books, wiki, news, "
                                             "jargon"):
        load_source("builtin:novels")
    assert BUILTIN_SOURCES == ("books", "wiki", "news")  # held out from one another by default; not the far text
    assert BUILTIN_TEXTS == BUILTIN_SOURCES + FAR_SOURCES == ("books", "wiki", "news", "jargon")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(AdaPrunerError, match="expected a .txt or .md file"):
        load_source(str(tmp_path / "data.csv"))
    with pytest.raises(AdaPrunerError, match="unknown option 'subset'"):
        load_source("hf:wikitext?subset=x")


def test_fetch_failure_says_how_to_go_on(monkeypatch):
    def unreachable(package, member, dest):
        raise FetchError(f"could not fetch the Debian package {package}: E: Unable to locate package {package}")

    monkeypatch.setattr("adapruner.data.builtin.deb_member", unreachable)
    with pytest.raises(FetchError) as failure:
        load_source("builtin:books")
    message = str(failure.value)
    assert "r-cran-janeaustenr" in message
    assert "\n" not in message
    assert message.endswith(LOCAL_TEXT_HINT)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_hf_dataset_with_its_own_splits(tmp_path):
    docs = make_documents(30, words_per_doc=20)
    train = [{"text": d, "id": i} for i, d in enumerate(docs[:20])] + [{"text": " ", "id": 99}]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "validation.jsonl", [{"text": d, "id": 0} for d in docs[20:25]])
    write_jsonl(tmp_path / "test.jsonl", [{"text": d, "id": 0} for d in docs[25:]])
    source = load_source(f"hf:{tmp_path}")
    assert (source.pool, source.validation, source.test) == (tuple(docs[:20]), tuple(docs[20:25]), tuple(docs[25:]))
    cut = load_source(f"hf:{tmp_path}?split=validation")
    assert len(cut.pool + cut.validation + cut.test) == 5
    with pytest.raises(AdaPrunerError, match=r"no column 'content'; the dataset has: text, id \(choose one"):
        load_source(f"hf:{tmp_path}?field=content")
    with pytest.raises(AdaPrunerError, match="column 'id' holds .*int64.*, not text"):
        load_source(f"hf:{tmp_path}?field=id")


def test_hf_dataset_with_one_split(tmp_path):
    docs = make_documents(20, words_per_doc=20)
    write_jsonl(tmp_path / "train.jsonl", [{"body": d} for d in docs])
    source = load_source(f"hf:{tmp_path}?field=body")
    assert (len(source.test), len(source.validation), len(source.pool)) == (2, 2, 16)
    assert source == split_documents(f"hf:{tmp_path}?field=body", docs)
    with pytest.raises(AdaPrunerError, match="no split 'test'; the dataset has: train"):
        load_source(f"hf:{tmp_path}?split=test&field=body")
    with pytest.raises(AdaPrunerError, match="cannot load the Hugging Face dataset .*missing.*: no such folder"):
        load_source(f"hf:{tmp_path / 'missing'}")
