"""Read an author's corpus (CSV/TSV, JSONL/JSON, .txt/.md, a folder of them, EPUB) into clean pieces.

Long-form sources (headings, Gutenberg, EPUB) are cut into sections by :mod:`pastiche.books`.

``read_corpus`` detects the format from the extension and the content, strips Project Gutenberg
boilerplate, cleans every text the same way (Unicode NFC, hard-wrapped lines joined into
paragraphs, whitespace tidied), drops exact duplicates and reports near-duplicates.
Every problem with the input is a :class:`PasticheError` naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from pastiche.books import read_epub, split_at_headings, strip_gutenberg
from pastiche.errors import PasticheError

TEXT_COLUMNS = ("text", "body", "content", "passage", "story", "response", "output", "completion")
TITLE_COLUMNS = ("title", "name", "city", "heading", "chapter")
GROUP_COLUMNS = ("series", "group", "section", "part", "book", "collection", "theme", "category")
NUMBER_COLUMNS = ("number", "num", "no", "index")
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text")
NEAR_DUPLICATE_JACCARD = 0.8  # word 5-gram overlap above which two pieces are reported


@dataclass
class Piece:
    title: str | None
    group: str | None
    text: str
    number: str | None = None


@dataclass
class Corpus:
    pieces: list[Piece]
    format: str  # csv, tsv, jsonl, json, folder, text, markdown, epub; '+gutenberg' when stripped
    warnings: list[str] = field(default_factory=list)
    duplicates_removed: int = 0
    near_duplicates: list[dict] = field(default_factory=list)  # {"a": index, "b": index, "similarity"}


def read_corpus(path: str | Path, cfg) -> Corpus:
    """All pieces of ``path`` (a file or folder), cleaned and de-duplicated."""
    path = Path(path)
    if not path.exists():
        raise PasticheError(f"{path} does not exist; expected a CSV/TSV, JSONL/JSON, .txt/.md or EPUB file, "
                            "or a folder of .txt/.md files.")
    warnings: list[str] = []
    fmt, raw = _read_raw(path, cfg, warnings)
    pieces = [Piece(p.title, p.group, clean_text(p.text), p.number) for p in raw]
    pieces = [p for p in pieces if p.text]
    if not pieces:
        raise PasticheError(f"{path} holds no text to learn from (every piece is empty).")
    unique = _drop_exact_duplicates(pieces)
    corpus = Corpus(unique, fmt, warnings, len(pieces) - len(unique), near_duplicates(unique))
    for pair in corpus.near_duplicates:
        a, b = unique[pair["a"]], unique[pair["b"]]
        warnings.append(f"near-duplicate pieces ({pair['similarity']:.0%} shared 5-grams): "
                        f"{a.title or 'piece ' + str(pair['a'])!r} and {b.title or 'piece ' + str(pair['b'])!r}")
    return corpus


def _read_raw(path: Path, cfg, warnings: list[str]) -> tuple[str, list[Piece]]:
    if path.is_dir():
        return "folder", _read_folder(path, warnings)
    data = path.read_bytes()
    if not data.strip():
        raise PasticheError(f"{path} is empty; expected an author's corpus.")
    suffix = path.suffix.lower()
    if suffix == ".epub" or data[:4] == b"PK\x03\x04":
        return "epub", [Piece(*section) for section in read_epub(path)]
    text = decode(data, path, warnings)
    fmt = _detect_text_format(suffix, text)
    if fmt in ("csv", "tsv"):
        return fmt, _read_table(path, text, "\t" if fmt == "tsv" else _delimiter(text), cfg)
    if fmt in ("jsonl", "json"):
        return fmt, _read_json(path, text, fmt, cfg)
    text, stripped = strip_gutenberg(text)
    fmt += "+gutenberg" if stripped else ""
    return fmt, [Piece(*section) for section in split_at_headings(text, cfg.split_on, path, warnings)]


def decode(data: bytes, path: Path, warnings: list[str]) -> str:
    """UTF-8 (with or without BOM), else cp1252, else Latin-1; binary data is refused."""
    if b"\x00" in data:
        raise PasticheError(f"{path} has undecodable bytes (NUL); expected text in UTF-8, cp1252 or Latin-1.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        position = exc.start
    for encoding in ("cp1252", "latin-1"):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        controls = sum(1 for ch in text if unicodedata.category(ch) == "Cc" and ch not in "\t\n\r\f")
        if controls > len(text) / 100:
            break
        warnings.append(f"{path} is not UTF-8 (byte {position}); read it as {encoding}")
        return text
    raise PasticheError(f"{path} has undecodable bytes (not UTF-8, cp1252 or Latin-1 text).")


def _detect_text_format(suffix: str, text: str) -> str:
    by_suffix = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                 ".json": "json", ".md": "markdown", ".markdown": "markdown", ".txt": "text", ".text": "text"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    head = text.lstrip()
    if head.startswith("["):
        return "json"
    if head.startswith("{"):
        return "jsonl"
    first_line = head.split("\n", 1)[0].lower()
    columns = [c.strip() for c in re.split(r"[,\t;|]", first_line)]
    return "csv" if any(c in TEXT_COLUMNS for c in columns) and len(columns) > 1 else "text"


def _delimiter(text: str) -> str:
    header = text.split("\n", 1)[0]
    return max(",\t;|", key=header.count)


def pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], flag: str,
                path: Path) -> str | None:
    """The column named by ``flag``, else the first candidate present (case-insensitive)."""
    lowered = {c.strip().lower(): c for c in columns}
    if wanted is not None:
        if wanted.strip().lower() not in lowered:
            raise PasticheError(f"{flag} {wanted!r}: {path} has no such column (columns seen: {', '.join(columns)}).")
        return lowered[wanted.strip().lower()]
    return next((lowered[c] for c in candidates if c in lowered), None)


def _rows_to_pieces(rows: list[dict], path: Path, cfg) -> list[Piece]:
    columns = list(dict.fromkeys(k for row in rows for k in row if k is not None))
    text_col = pick_column(columns, cfg.text_column, TEXT_COLUMNS, "--text-column", path)
    if text_col is None:
        raise PasticheError(f"{path} has no text column (columns seen: {', '.join(columns) or 'none'}); "
                            f"expected one of {', '.join(TEXT_COLUMNS)}, or name it with --text-column.")
    title_col = pick_column(columns, cfg.title_column, TITLE_COLUMNS, "--title-column", path)
    group_col = pick_column(columns, cfg.group_column, GROUP_COLUMNS, "--group-column", path)
    number_col = pick_column(columns, None, NUMBER_COLUMNS, "", path)

    def value(row: dict, col: str | None) -> str | None:
        raw = row.get(col) if col else None
        return None if raw is None or str(raw).strip() == "" else " ".join(str(raw).split())

    return [Piece(value(r, title_col), value(r, group_col), str(r.get(text_col) or ""), value(r, number_col))
            for r in rows]


def _read_table(path: Path, text: str, delimiter: str, cfg) -> list[Piece]:
    csv.field_size_limit(2**31 - 1)  # a whole chapter may sit in one cell
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))
    except csv.Error as exc:
        raise PasticheError(f"{path} is not a readable CSV/TSV file ({exc}).") from exc
    if not rows:
        raise PasticheError(f"{path} has a header but no rows; expected one row per piece.")
    return _rows_to_pieces(rows, path, cfg)


def _read_json(path: Path, text: str, fmt: str, cfg) -> list[Piece]:
    rows: list = []
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":  # one object per line under a .json name
                return _read_json(path, text, "jsonl", cfg)
            raise PasticheError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}).") from exc
        if isinstance(data, dict):  # {"pieces": [...]}: the one list of records inside
            data = next((v for v in data.values() if isinstance(v, list)), [data])
        rows = data if isinstance(data, list) else []
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise PasticheError(f"{path} line {number} is not valid JSON ({exc.msg}).") from exc
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise PasticheError(f"{path} must hold JSON objects, one per piece, each with a 'text' field.")
    return _rows_to_pieces(rows, path, cfg)


def _read_folder(path: Path, warnings: list[str]) -> list[Piece]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise PasticheError(f"{path} has no .txt or .md files; expected one file per piece.")
    pieces = []
    for file in files:
        data = file.read_bytes()
        text, _ = strip_gutenberg(decode(data, file, warnings))
        title, text = _leading_heading(text)
        number = re.match(r"\d+", file.stem)
        group = file.parent.name if file.parent != path else None  # a subfolder is a series
        pieces.append(Piece(title or _title_from_stem(file.stem), group, text, number and number.group()))
    return pieces


def _title_from_stem(stem: str) -> str:
    words = re.sub(r"^\d+[\s._-]*", "", stem).replace("_", " ").replace("-", " ").split()
    title = " ".join(words) or stem
    return title[:1].upper() + title[1:] if title.islower() else title


def _leading_heading(text: str) -> tuple[str | None, str]:
    match = re.match(r"\s*#{1,6}[ \t]+(.+?)[ \t#]*(\n|$)", text)
    return (match.group(1).strip(), text[match.end():]) if match else (None, text)


ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")


def clean_text(text: str) -> str:
    """NFC, hard-wrapped lines joined, one space between words, a blank line between paragraphs."""
    text = ZERO_WIDTH.sub("", unicodedata.normalize("NFC", text))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paragraphs = (" ".join(block.split()) for block in re.split(r"\n[ \t\f\v\u00a0]*\n", text))
    return "\n\n".join(p for p in paragraphs if p)


def _drop_exact_duplicates(pieces: list[Piece]) -> list[Piece]:
    seen: set[str] = set()
    unique = []
    for piece in pieces:
        if piece.text not in seen:
            seen.add(piece.text)
            unique.append(piece)
    return unique


def near_duplicates(pieces: list[Piece], threshold: float = NEAR_DUPLICATE_JACCARD) -> list[dict]:
    """Pairs of pieces whose word 5-gram sets overlap (Jaccard) at least ``threshold``."""
    shingles = []
    for piece in pieces:
        words = re.findall(r"\w+", piece.text.lower())
        shingles.append({tuple(words[i:i + 5]) for i in range(max(1, len(words) - 4))})
    index: dict[tuple, list[int]] = {}
    for i, grams in enumerate(shingles):
        for gram in grams:
            index.setdefault(gram, []).append(i)
    shared: dict[tuple[int, int], int] = {}
    for holders in index.values():
        if 1 < len(holders) <= 50:  # a 5-gram in very many pieces is a refrain, not a copy
            for x in range(len(holders)):
                for y in holders[x + 1:]:
                    shared[holders[x], y] = shared.get((holders[x], y), 0) + 1
    pairs = []
    for (a, b), common in sorted(shared.items()):
        similarity = common / (len(shingles[a]) + len(shingles[b]) - common)
        if similarity >= threshold:
            pairs.append({"a": a, "b": b, "similarity": round(similarity, 3)})
    return pairs
