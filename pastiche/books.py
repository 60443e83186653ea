"""Long-form sources: one .txt/.md split into sections at headings, Project Gutenberg
boilerplate, EPUB chapters. Each section is a (title, group, raw text) triple; ``corpus`` cleans it.
"""

from __future__ import annotations

import re
from pathlib import Path

from pastiche.errors import PasticheError

Section = tuple[str | None, str | None, str]  # (title, group, raw text)


GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
GUTENBERG_END = re.compile(r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)",
                           re.I | re.M)


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """The text between Project Gutenberg's START and END markers (and without 'Produced by')."""
    start, end = GUTENBERG_START.search(text), GUTENBERG_END.search(text)
    if not start and not end:
        return text, False
    body = text[start.end() if start else 0: end.start() if end else len(text)]
    body = re.sub(r"^\s*(Produced by|E-text prepared by)[^\n]*(\n[^\n]+)*", "", body, flags=re.I)
    return body, True


def _all_caps_heading(lines: list[str], i: int) -> bool:
    line = lines[i].strip()
    letters = [c for c in line if c.isalpha()]
    alone = (i == 0 or not lines[i - 1].strip()) and (i + 1 == len(lines) or not lines[i + 1].strip())
    return (alone and len(letters) >= 2 and all(c.isupper() for c in letters)
            and len(line) <= 80 and not line.endswith((".", ",", ";")))


SMALL_WORDS = {"a", "an", "and", "the", "of", "in", "on", "at", "to", "for", "by", "or", "but", "with", "from"}


def title_case(heading: str) -> str:
    """'THE FOX AND THE GRAPES' -> 'The Fox and the Grapes'; Roman numerals stay upper case."""
    words = heading.split()

    def word_case(i: int, word: str) -> str:
        if re.fullmatch(r"[IVXLC]+[.:]?", word):
            return word
        lower = word.lower()
        starts_phrase = i == 0 or words[i - 1].endswith((".", ":", "!", "?"))
        return lower if lower in SMALL_WORDS and not starts_phrase else lower[:1].upper() + lower[1:]

    return " ".join(word_case(i, w) for i, w in enumerate(words))


def split_at_headings(text: str, split_on: str | None, path: Path, warnings: list[str]) -> list[Section]:
    """Pieces of one file: a new piece at each --split-on line, else Markdown heading, else ALL-CAPS line."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    headings = _heading_lines(lines, split_on)
    if not headings and split_on is not None:
        raise PasticheError(f"--split-on {split_on!r} matches no line of {path}.")
    if not headings:
        return [(None, None, text)]
    preface = "\n".join(lines[: min(headings)])
    if preface.strip():
        warnings.append(f"{path}: skipped {len(preface.split())} words before the first heading")
    pieces, group = [], None
    starts = sorted(headings)
    for i, start in enumerate(starts):
        level, title = headings[start]
        body = "\n".join(lines[start + 1: starts[i + 1] if i + 1 < len(starts) else len(lines)])
        if level < 0:  # a higher-level Markdown heading names the series of the pieces below it
            group = title
            if body.strip():
                warnings.append(f"{path}: skipped {len(body.split())} words under the heading {title!r}")
        elif body.strip():
            pieces.append((title, group, body))
    return pieces


def _heading_lines(lines: list[str], split_on: str | None) -> dict[int, tuple[int, str]]:
    """{line index: (level, title)}; level -1 marks a group heading above the piece headings."""
    if split_on is not None:
        try:
            pattern = re.compile(split_on)
        except re.error as exc:
            raise PasticheError(f"--split-on {split_on!r} is not a valid regular expression ({exc}).") from exc
        return {i: (0, re.sub(r"^#+\s*", "", ln.strip()) or None) for i, ln in enumerate(lines) if pattern.search(ln)}
    marks = {i: m for i, ln in enumerate(lines) if (m := re.match(r"(#{1,6})[ \t]+(.+?)[ \t#]*$", ln))}
    if marks:
        depths = [len(m.group(1)) for m in marks.values()]
        # Pieces sit at the most frequent level ('# Book' twice, '## Chapter' many times); shallower
        # headings name the group, deeper ones stay inside the piece's text.
        piece_level = max(sorted(set(depths)), key=depths.count)
        return {i: (0 if len(m.group(1)) == piece_level else -1, m.group(2).strip())
                for i, m in marks.items() if len(m.group(1)) <= piece_level}
    caps = {i: (0, title_case(lines[i].strip())) for i in range(len(lines)) if _all_caps_heading(lines, i)}
    return caps if len(caps) >= 2 else {}


class _HtmlText:
    """Paragraph text and the first heading of an XHTML chapter (stdlib parser, no lxml needed)."""

    BLOCKS = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "blockquote", "section", "tr", "pre"}

    def __init__(self, html: str):
        from html.parser import HTMLParser

        self.parts: list[str] = []
        self.heading: str | None = None
        self._skip = 0
        self._in_heading: list[str] | None = None
        parser = HTMLParser(convert_charrefs=True)
        parser.handle_starttag = self._start
        parser.handle_endtag = self._end
        parser.handle_data = self._data
        parser.feed(html)
        parser.close()

    def _start(self, tag, attrs):
        if tag in ("script", "style", "head"):
            self._skip += 1
        elif tag == "br":
            self.parts.append("\n")
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")
        if tag in ("h1", "h2", "h3") and self.heading is None:
            self._in_heading = []

    def _end(self, tag):
        if tag in ("script", "style", "head"):
            self._skip -= 1
        elif tag in ("h1", "h2", "h3") and self._in_heading is not None:
            self.heading = " ".join("".join(self._in_heading).split()) or None
            self._in_heading = None
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def _data(self, data):
        if self._skip:
            return
        if self._in_heading is not None:
            self._in_heading.append(data)
        else:
            self.parts.append(data)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def read_epub(path: Path) -> list[Section]:
    import warnings as pywarnings

    import ebooklib
    from ebooklib import epub

    try:
        with pywarnings.catch_warnings():
            pywarnings.simplefilter("ignore")
            book = epub.read_epub(str(path), options={"ignore_ncx": True})
    except Exception as exc:  # ebooklib raises zipfile, lxml and its own errors alike
        raise PasticheError(f"{path} is not a readable EPUB ({exc.__class__.__name__}: {exc}).") from exc
    toc_titles = {link.href.split("#")[0]: link.title for link in _flat_toc(book.toc)}
    pieces = []
    for idref, _ in book.spine:
        item = book.get_item_with_id(idref)
        if item is None or item.get_type() != ebooklib.ITEM_DOCUMENT or isinstance(item, epub.EpubNav):
            continue
        chapter = _HtmlText(item.get_content().decode("utf-8", errors="replace"))
        body, _ = strip_gutenberg(chapter.text)
        if body.strip():
            pieces.append((chapter.heading or toc_titles.get(item.get_name()), None, body))
    if not pieces:
        raise PasticheError(f"{path} has no chapters with text; expected an EPUB of XHTML chapters.")
    return pieces


def _flat_toc(toc) -> list:
    links = []
    for entry in toc:
        if isinstance(entry, (list, tuple)):  # (Section, [children])
            links.extend(_flat_toc(entry[1]))
        elif hasattr(entry, "href"):
            links.append(entry)
    return links
