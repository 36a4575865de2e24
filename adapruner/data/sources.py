"""Text sources: named collections of documents, cut into a calibration pool and two held-out parts.

A search picks calibration samples from ``pool``, scores candidates on ``validation`` and reports on
``test``. The parts are cut by document, never inside one, so no held-out text is ever seen during
calibration; and the cut depends only on the documents' content, so it is the same on every machine,
on every run and whatever order the documents arrive in. A source whose documents are parts of larger
works (``builtin:books``: chapters of six novels) is cut by work instead (see :func:`split_works`):
one whole novel is test (*Persuasion*), another validation (*Sense and Sensibility*), the other four
the pool, since chapters of one novel share its characters, names and plot, and a chapter whose novel
also calibrates is not really held out.

Spec strings name a source on the command line:

* ``builtin:books`` | ``builtin:wiki`` | ``builtin:news`` | ``builtin:jargon`` -- the corpora of :mod:`.builtin`;
* ``hf:PATH[:CONFIG][?split=NAME&field=FIELD]`` -- a Hugging Face dataset (hub id or local folder);
* a path -- a ``.txt``/``.md`` file, or a folder of them.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from ..cache import cache_dir
from ..errors import AdaPrunerError
from .builtin import BUILTIN_TEXTS, builtin_corpus

if TYPE_CHECKING:
    from datasets import Dataset

SPLITS = ("pool", "validation", "test")
# The dataset split each part is taken from, for Hugging Face datasets that come with all three.
HF_SPLIT_OF_PART = {"pool": "train", "validation": "validation", "test": "test"}
TEXT_SUFFIXES = (".txt", ".md")
# A folder with fewer files than this is treated as one long text cut at blank lines, since a handful
# of documents cannot be split three ways with any balance.
MIN_FOLDER_FILES = 10
# Blank-line blocks of a text file are merged into documents of about a page, so that a novel gives a
# few hundred documents rather than thousands of one-line replies; a short text is cut into about
# SHORT_TEXT_DOCUMENTS smaller ones instead, enough to fill three parts.
DOCUMENT_CHARS = 2000
SHORT_TEXT_DOCUMENTS = 40


@dataclass(frozen=True)
class TextSource:
    """A named text source, already cut into disjoint parts (each a tuple of documents).

    ``works`` names the works each part holds (``{"pool": (...), "validation": (...), "test": (...)}``)
    when the source was cut by work; it is empty when it was cut by document.
    """

    name: str
    pool: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]
    works: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)

    def part(self, split: str) -> tuple[str, ...]:
        """The documents of ``split``: ``"pool"``, ``"validation"`` or ``"test"``."""
        if split not in SPLITS:
            raise AdaPrunerError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
        return getattr(self, split)

    @property
    def hashes(self) -> dict[str, str]:
        """sha256 (hex) of each part's documents joined by blank lines: the text a model actually reads."""
        return dict(self._hashes)

    @functools.cached_property
    def _hashes(self) -> dict[str, str]:
        return {split: _sha256("\n\n".join(self.part(split))) for split in SPLITS}

    @property
    def split_description(self) -> str:
        """How the parts were cut, for a report: by work, naming the held-out works, or by document."""
        if self.works:
            return (f"by work: test = {', '.join(self.works['test'])}; "
                    f"validation = {', '.join(self.works['validation'])}; "
                    f"pool = {len(self.works['pool'])} other works")
        sizes = ", ".join(f"{split} {len(self.part(split))}" for split in SPLITS)
        return f"by document: {sizes} documents"

    def __repr__(self) -> str:
        sizes = ", ".join(f"{split}={len(self.part(split))}" for split in SPLITS)
        return f"TextSource({self.name!r}, {sizes} documents)"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _share(fraction: float, n: int, what: str) -> int:
    """How many of ``n`` documents a part of ``fraction`` gets: rounded up, at least one."""
    if not 0 <= fraction < 1:
        raise AdaPrunerError(f"the {what} fraction must be in [0, 1), got {fraction}")
    return max(1, math.ceil(fraction * n - 1e-9))  # 0.1 * 30 is 3.0000000000000004 in floating point


def split_documents(name: str, docs: Iterable[str], validation: float = 0.1, test: float = 0.1) -> TextSource:
    """Cut ``docs`` into pool, validation and test parts by document, deterministically.

    Duplicates and blank documents are dropped first, so the parts are disjoint. The rest are ordered
    by the sha256 of their text: the first ``ceil(test * n)`` go to test, the next
    ``ceil(validation * n)`` to validation, the others to the pool (each part gets at least one).
    """
    ordered = sorted({doc for doc in docs if doc.strip()}, key=_sha256)
    n = len(ordered)
    n_test, n_validation = _share(test, n, "test"), _share(validation, n, "validation")
    if n < 3 or n_test + n_validation >= n:
        raise AdaPrunerError(
            f"text source {name!r} has {n} distinct documents, too few to cut into pool, validation and test parts"
        )
    cut = n_test + n_validation
    return TextSource(name, pool=tuple(ordered[cut:]), validation=tuple(ordered[n_test:cut]),
                      test=tuple(ordered[:n_test]))


def split_works(name: str, works: Mapping[str, Iterable[str]]) -> TextSource:
    """Cut a source whose documents are parts of larger works (title -> documents) by work, deterministically.

    Works are ordered by the sha256 of their title: the first is the test part, the second the
    validation part, the others the pool. Titles rather than texts, so that a change to how the
    documents are parsed does not move a work to another part. Each part keeps its works' documents in
    reading order, work after work; blank documents, and documents already in an earlier part, are
    dropped, so the parts are disjoint.
    """
    titles = sorted(works, key=_sha256)
    if len(titles) < 3:
        raise AdaPrunerError(f"text source {name!r} has {len(titles)} works, too few to cut into pool, validation "
                             "and test parts")
    titles_of = {"pool": tuple(titles[2:]), "validation": (titles[1],), "test": (titles[0],)}
    seen: set[str] = set()
    documents: dict[str, tuple[str, ...]] = {}
    for split in ("test", "validation", "pool"):  # held out first: a document also in the pool stays held out
        fresh = (doc for title in titles_of[split] for doc in works[title] if doc.strip() and doc not in seen)
        documents[split] = tuple(dict.fromkeys(fresh))
        seen.update(documents[split])
    return TextSource(name, **documents, works=titles_of)


def load_source(spec: str) -> TextSource:
    """The text source a spec string names (see the module docstring)."""
    spec = spec.strip()
    if spec.startswith("builtin:"):
        return _builtin_source(spec.removeprefix("builtin:"), cache_dir())
    if spec.startswith("hf:"):
        return _hf_source(spec)
    return _local_source(spec)


def load_sources(specs: Iterable[str]) -> list[TextSource]:
    return [load_source(spec) for spec in specs]


@functools.cache
def _builtin_source(name: str, _cache_root: Path) -> TextSource:
    """Built-in sources are parsed once per process and cache root: a search asks for them again and again."""
    corpus = builtin_corpus(name)
    return split_works(name, corpus) if isinstance(corpus, dict) else split_documents(name, corpus)


# --- Hugging Face datasets --------------------------------------------------------------------------


def _parse_hf_spec(spec: str) -> tuple[str, str | None, str | None, str]:
    """``hf:PATH[:CONFIG][?split=NAME&field=FIELD]`` -> ``(path, config, split, field)``."""
    body, _, query = spec.removeprefix("hf:").partition("?")
    path, _, config = body.partition(":")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - {"split", "field"})
    if unknown:
        raise AdaPrunerError(f"unknown option {unknown[0]!r} in {spec!r}; only split= and field= are understood")
    if not path:
        raise AdaPrunerError(f"{spec!r} names no dataset; write hf:PATH[:CONFIG][?split=NAME&field=FIELD]")
    return path, config or None, options.get("split") or None, options.get("field") or "text"


def _hf_source(spec: str) -> TextSource:
    """A dataset's own train/validation/test splits when it has all three; else one split, cut by document."""
    import datasets  # slow to import; only specs that need it pay

    path, config, split, field = _parse_hf_spec(spec)
    if path.startswith(("/", ".", "~")):  # clearly a folder, not a hub id: do not ask the hub about it
        if not Path(path).expanduser().is_dir():
            raise AdaPrunerError(f"cannot load the Hugging Face dataset {path!r}: no such folder")
        path = str(Path(path).expanduser())
    try:
        dataset = datasets.load_dataset(path, config)
    except Exception as exc:  # datasets raises anything from ValueError to HTTP errors
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise AdaPrunerError(f"cannot load the Hugging Face dataset {path!r}: {reason}") from None
    if split is None and all(name in dataset for name in HF_SPLIT_OF_PART.values()):
        parts = {part: _texts(spec, dataset[name], field) for part, name in HF_SPLIT_OF_PART.items()}
        empty = [part for part, texts in parts.items() if not texts]
        if empty:
            raise AdaPrunerError(f"{spec}: the {empty[0]} split has no text in column {field!r}")
        return TextSource(spec, **parts)
    split = split or "train"
    if split not in dataset:
        raise AdaPrunerError(f"{spec}: no split {split!r}; the dataset has: {', '.join(dataset)}")
    return split_documents(spec, _texts(spec, dataset[split], field))


def _texts(spec: str, rows: Dataset, field: str) -> tuple[str, ...]:
    """The non-blank strings of column ``field``."""
    if field not in rows.column_names:
        raise AdaPrunerError(f"{spec}: no column {field!r}; the dataset has: {', '.join(rows.column_names)} "
                             "(choose one with ?field=NAME)")
    if getattr(rows.features[field], "dtype", None) not in ("string", "large_string"):
        raise AdaPrunerError(f"{spec}: column {field!r} holds {rows.features[field]}, not text")
    return tuple(text for text in rows[field] if text and text.strip())


# --- Local files ------------------------------------------------------------------------------------


def _local_source(spec: str) -> TextSource:
    path = Path(spec).expanduser()
    if not path.exists():
        hint = f" (did you mean builtin:{spec}?)" if spec in BUILTIN_TEXTS else ""
        raise AdaPrunerError(f"text source not found: no file or folder {spec}{hint}")
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise AdaPrunerError(f"folder {spec} holds no .txt or .md files")
        texts = [_read(p) for p in files]
        docs = [text for text in texts if text.strip()]
        if len(docs) < MIN_FOLDER_FILES:
            docs = _documents(texts)
    elif path.suffix.lower() in TEXT_SUFFIXES:
        docs = _documents([_read(path)])
    else:
        raise AdaPrunerError(f"unsupported text file {spec}: expected a .txt or .md file, or a folder of them")
    return split_documents(spec, docs)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as exc:
        raise AdaPrunerError(f"cannot read {path}: {exc.strerror or exc}") from None


def _documents(texts: list[str]) -> list[str]:
    """Documents of about a page from blank-line blocks; a document never spans two texts."""
    blocks = [[block.strip() for block in re.split(r"\n[ \t]*\n", text) if block.strip()] for text in texts]
    total = sum(len(block) for text_blocks in blocks for block in text_blocks)
    target = min(DOCUMENT_CHARS, total // SHORT_TEXT_DOCUMENTS)
    documents: list[str] = []
    for text_blocks in blocks:
        current: list[str] = []
        size = 0
        for block in text_blocks:
            current.append(block)
            size += len(block)
            if size >= target:
                documents.append("\n\n".join(current))
                current, size = [], 0
        if current:
            documents.append("\n\n".join(current))
    return documents
