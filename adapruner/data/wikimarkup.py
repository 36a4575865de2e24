"""Plain prose from MediaWiki dumps: walk the pages of an XML dump and strip their wikitext.

This is not a MediaWiki parser. It removes what never reads as prose (templates, tables, references,
file and category links, reference sections) and unwraps what does (link labels, formatting), which
is all a language model's calibration and evaluation text needs.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

# Sections that list sources or links rather than say anything; dropped with everything below them
# up to the next heading of the same or a higher level.
DROPPED_SECTIONS = frozenset({
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "notes and references", "references and notes", "footnotes", "citations", "sources",
})

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_HEADING = re.compile(r"^(={1,6})[ \t]*(.+?)[ \t]*\1[ \t]*$", re.M)
# Elements whose content is not prose: citations, formulas, galleries, code, inline data.
_DROPPED_ELEMENT = re.compile(
    r"<(ref|references|math|chem|ce|gallery|imagemap|timeline|score|hiero|graph|templatedata"
    r"|syntaxhighlight|source)\b[^>]*?(?:/>|>.*?</\1\s*>)",
    re.S | re.I,
)
_TEMPLATE_TOKEN = re.compile(r"(?P<open>\{\{)|(?P<close>\}\})")
_TABLE_TOKEN = re.compile(r"(?P<open>^[ \t:]*\{\|)|(?P<close>^[ \t]*\|\})", re.M)
_INNERMOST_LINK = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*)\]\]", re.S)
# Links that render as something other than their text: media, categories, and (lowercase language
# codes like "de:" or "zh-min-nan:") links to other-language editions.
_HIDDEN_LINK = re.compile(r"(?i:\s*(?:file|image|media|category)\s*:)|[a-z]{2,3}(?:-[a-z]+)*:")
_EXTERNAL_LINK = re.compile(r"\[(?:https?://|ftp://|//|mailto:|news:|irc://)[^\s\]]*(?:\s+([^\]\n]*))?\]")
_LINE_BREAK = re.compile(r"<br\s*/?>", re.I)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*>")
_BOLD_ITALIC = re.compile(r"'{2,}")
_BEHAVIOUR_SWITCH = re.compile(r"__[A-Z]+__")
_LIST_MARKER = re.compile(r"^[*#:;]+[ \t]*", re.M)
_RULE = re.compile(r"^-{4,}[ \t]*$", re.M)
_EMPTY_BRACKETS = re.compile(r"\([\s,;:]*\)")
_LEADING_SEPARATOR = re.compile(r"\([\s,;:]+")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"[ \t]+([,.;:!?])(?=\s|$)")
_SPACES = re.compile(r"[^\S\n]+|\u200b")
_BLANK_LINES = re.compile(r"\n{3,}")
# Marks a heading line while stripping, so that headings left without any text can be dropped at the
# end (sections that were only tables or lists of links). NUL cannot occur in XML, hence in a dump.
_HEADING_MARK = "\0"
# Disambiguation pages are lists of links to other pages, tagged by one of these templates.
_DISAMBIGUATION = re.compile(r"\{\{\s*(?:[\w ]*disambig[\w ]*|dab|hndis|geodis)\s*[|}]", re.I)


def _local_name(tag: str) -> str:
    """``{http://www.mediawiki.org/xml/export-0.10/}page`` -> ``page``: dumps change namespace by version."""
    return tag.rsplit("}", 1)[-1]


def iter_articles(path: str | Path) -> Iterator[tuple[str, str]]:
    """``(title, plain text)`` of each article in a bz2-compressed MediaWiki XML dump.

    Articles are main-namespace pages that are neither redirects nor disambiguation lists. Pages are
    streamed and freed as they are read, so a dump of any size runs in little memory.
    """
    with bz2.open(path, "rb") as stream:
        context = ET.iterparse(stream, events=("start", "end"))
        _, root = next(context)
        for event, elem in context:
            if event != "end" or _local_name(elem.tag) != "page":
                continue
            fields = {_local_name(child.tag): child for child in elem.iter()}
            title = (fields["title"].text or "") if "title" in fields else ""
            namespace = (fields["ns"].text or "").strip() if "ns" in fields else "0"
            text = (fields["text"].text or "") if "text" in fields else ""
            root.clear()  # the page is read: drop it (and the pages before it) from the tree
            if namespace != "0" or "redirect" in fields or text.lstrip()[:9].lower() == "#redirect":
                continue
            if _DISAMBIGUATION.search(text):
                continue
            yield title, strip_markup(text)


def strip_markup(wikitext: str) -> str:
    """The readable prose of a page's wikitext: paragraphs separated by blank lines."""
    text = _COMMENT.sub("", wikitext.replace(_HEADING_MARK, ""))
    text = _drop_sections(text)
    text = _DROPPED_ELEMENT.sub("", text)
    text = _remove_nested(text, _TEMPLATE_TOKEN)
    text = _remove_nested(text, _TABLE_TOKEN)  # after templates, whose closing "|}}" reads as a table's end
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)  # first, as image captions hold them
    text = _unwrap_links(text)
    text = _LINE_BREAK.sub("\n", text)
    text = _TAG.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _BEHAVIOUR_SWITCH.sub("", text)
    text = _HEADING.sub(lambda m: f"\n\n{_HEADING_MARK}{len(m.group(1))}{m.group(2)}\n\n", text)
    text = _LIST_MARKER.sub("", text)
    text = _RULE.sub("", text)
    text = html.unescape(text)  # last of the markup: "&lt;ref&gt;" is text that reads "<ref>"
    return _drop_empty_headings(_tidy(text))


def _section_title(raw: str) -> str:
    """A heading's words, lowercased, so that ``== '''See also''' ==`` matches ``see also``."""
    return " ".join(re.sub(r"[^a-z]+", " ", raw.lower()).split())


def _drop_sections(text: str) -> str:
    kept: list[str] = []
    dropping_level: int | None = None
    for line in text.split("\n"):
        heading = _HEADING.match(line)
        if heading:
            level = len(heading.group(1))
            if dropping_level is not None and level <= dropping_level:
                dropping_level = None
            if dropping_level is None and _section_title(heading.group(2)) in DROPPED_SECTIONS:
                dropping_level = level
        if dropping_level is None:
            kept.append(line)
    return "\n".join(kept)


def _remove_nested(text: str, tokens: re.Pattern[str]) -> str:
    """``text`` without the spans that ``tokens`` open and close, however deeply they nest.

    Editors leave stray delimiters: a closer with nothing open is dropped, and an opener that is never
    closed is dropped alone instead of taking the rest of the page with it.
    """
    kept: list[str] = []
    depth, resume, opened_end = 0, 0, 0
    for match in tokens.finditer(text):
        if match.group("open"):
            if depth == 0:
                kept.append(text[resume : match.start()])
                opened_end = match.end()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                resume = match.end()
        else:
            kept.append(text[resume : match.start()])
            resume = match.end()
    if depth > 0:
        kept.append(_remove_nested(text[opened_end:], tokens))
    else:
        kept.append(text[resume:])
    return "".join(kept)


def _link_text(match: re.Match[str]) -> str:
    target, pipe, label = match.group(1).partition("|")
    if target.startswith(":"):  # [[:Category:X]] shows the link instead of filing the page
        target = target[1:]
    elif _HIDDEN_LINK.match(target):
        return ""
    if pipe and label.strip():
        return label
    if pipe:  # the "pipe trick": [[Paris (band)|]] shows "Paris"
        return re.sub(r"\s*\(.*\)\s*$", "", target.split(":", 1)[-1])
    return target


def _unwrap_links(text: str) -> str:
    """Replace wiki links by their label, innermost first: image captions contain links themselves."""
    while True:
        text, count = _INNERMOST_LINK.subn(_link_text, text)
        if count == 0:
            return text


def _tidy(text: str) -> str:
    """Normalise spacing, and mend what removals leave behind: ``( )``, ``(; ``, `` ,``, runs of blank lines."""
    text = _EMPTY_BRACKETS.sub("", text)
    text = _LEADING_SEPARATOR.sub("(", text)
    text = _SPACES.sub(" ", text)
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)
    lines = [line.strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()



def _drop_empty_headings(text: str) -> str:
    """Unmark headings, dropping those with no prose below them before the next heading of their rank."""
    paragraphs = text.split("\n\n")
    levels = [int(p[1]) if p.startswith(_HEADING_MARK) else None for p in paragraphs]
    kept = []
    for i, (paragraph, level) in enumerate(zip(paragraphs, levels, strict=True)):
        if level is None:
            kept.append(paragraph)
        elif paragraph[2:] and _section_has_prose(levels[i + 1 :], level):
            kept.append(paragraph[2:])
    return "\n\n".join(kept)


def _section_has_prose(levels_below: list[int | None], level: int) -> bool:
    for below in levels_below:
        if below is None:
            return True
        if below <= level:
            return False
    return False
