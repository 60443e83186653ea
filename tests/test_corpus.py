"""corpus.py: every input format from files written here, cleaning, decoding, duplicates, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pastiche.config import PrepareConfig
from pastiche.books import strip_gutenberg, title_case
from pastiche.corpus import Piece, clean_text, read_corpus
from pastiche.errors import PasticheError


def read(path: Path, **options):
    return read_corpus(path, PrepareConfig(source=str(path), out="unused", **options))


def triples(corpus) -> list[tuple]:
    return [(p.title, p.group, p.text) for p in corpus.pieces]


def test_csv_columns_are_detected_with_numbers(tmp_path):
    src = tmp_path / "cities.csv"
    src.write_text('series,number,city,text\nCities and Salt,1,Orvanne,"Salt walls.\n\nSalt stairs."\n'
                   "Thin Cities,2,Ilde,Wires only.\n", encoding="utf-8")
    corpus = read(src)
    assert corpus.format == "csv"
    assert triples(corpus) == [("Orvanne", "Cities and Salt", "Salt walls.\n\nSalt stairs."),
                               ("Ilde", "Thin Cities", "Wires only.")]
    assert [p.number for p in corpus.pieces] == ["1", "2"]


def test_tsv_with_other_column_names(tmp_path):
    src = tmp_path / "book.tsv"
    src.write_text("Name\tSection\tBody\nFirst\tOne\tAlpha text.\nSecond\t\tBeta text.\n", encoding="utf-8")
    corpus = read(src)
    assert corpus.format == "tsv"
    assert triples(corpus) == [("First", "One", "Alpha text."), ("Second", None, "Beta text.")]
    unnamed = tmp_path / "export"
    unnamed.write_text("title,text\nA,Hello there.\n", encoding="utf-8")
    assert read(unnamed).format == "csv" and triples(read(unnamed)) == [("A", None, "Hello there.")]


def test_semicolon_csv_with_columns_named_by_flags(tmp_path):
    src = tmp_path / "odd.csv"
    src.write_text("heading;words;shelf\nA;Some words here.;S1\nB;More words here.;S2\n", encoding="utf-8")
    corpus = read(src, text_column="words", title_column="heading", group_column="shelf")
    assert triples(corpus) == [("A", "S1", "Some words here."), ("B", "S2", "More words here.")]
    with pytest.raises(PasticheError) as err:
        read(src, text_column="prose")
    assert str(err.value) == f"--text-column 'prose': {src} has no such column (columns seen: heading, words, shelf)."


def test_csv_without_text_column_lists_columns(tmp_path):
    src = tmp_path / "nums.csv"
    src.write_text("id,score,label\n1,2,x\n", encoding="utf-8")
    with pytest.raises(PasticheError) as err:
        read(src)
    assert str(err.value) == (f"{src} has no text column (columns seen: id, score, label); expected one of text, "
                              "body, content, passage, story, response, output, completion, or name it with --text-column.")


def test_jsonl_and_json(tmp_path):
    rows = [{"title": "One", "group": "G", "text": "First  piece.\nStill first."}, {"text": "Second piece."}]
    jsonl = tmp_path / "pieces.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    expected = [("One", "G", "First piece. Still first."), (None, None, "Second piece.")]
    assert triples(read(jsonl)) == expected and read(jsonl).format == "jsonl"
    as_list = tmp_path / "pieces.json"
    as_list.write_text(json.dumps(rows), encoding="utf-8")
    assert triples(read(as_list)) == expected and read(as_list).format == "json"
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"author": "X", "pieces": rows}), encoding="utf-8")
    assert triples(read(wrapped)) == expected
    lines_named_json = tmp_path / "lines.json"
    lines_named_json.write_text(jsonl.read_text(encoding="utf-8"), encoding="utf-8")
    assert triples(read(lines_named_json)) == expected
    no_extension = tmp_path / "pieces"
    no_extension.write_text(jsonl.read_text(encoding="utf-8"), encoding="utf-8")
    assert read(no_extension).format == "jsonl"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(PasticheError, match=r"broken.jsonl line 2 is not valid JSON"):
        read(broken)


def test_folder_of_txt_and_md(tmp_path):
    folder = tmp_path / "works"
    (folder / "Winter Poems").mkdir(parents=True)
    (folder / "01_the-glass-harbour.txt").write_text("Boats of glass\nring at dawn.\n", encoding="utf-8")
    (folder / "02_untitled.md").write_text("# The Salt Road\n\nDust and *salt*.\n", encoding="utf-8")
    (folder / "Winter Poems" / "frost.txt").write_text("Frost on the bell.", encoding="utf-8")
    (folder / "notes.json").write_text("{}", encoding="utf-8")  # not a piece
    corpus = read(folder)
    assert corpus.format == "folder"
    assert triples(corpus) == [("The glass harbour", None, "Boats of glass ring at dawn."),
                               ("The Salt Road", None, "Dust and *salt*."),
                               ("Frost", "Winter Poems", "Frost on the bell.")]
    assert [p.number for p in corpus.pieces] == ["01", "02", None]


def test_markdown_file_split_at_headings_with_book_as_group(tmp_path):
    src = tmp_path / "book.md"
    src.write_text("Front matter.\n\n# Book One\n\nIntro.\n\n## Opening\n\nFirst text.\n\n## Second\n\nSecond\ntext.\n\n"
                   "# Book Two\n\n## Third\n\nThird text.\n", encoding="utf-8")
    corpus = read(src)
    assert corpus.format == "markdown"
    assert triples(corpus) == [("Opening", "Book One", "First text."), ("Second", "Book One", "Second text."),
                               ("Third", "Book Two", "Third text.")]
    assert corpus.warnings == [f"{src}: skipped 2 words before the first heading",
                               f"{src}: skipped 1 words under the heading 'Book One'"]


def test_text_split_at_all_caps_titles(tmp_path):
    src = tmp_path / "fables.txt"
    src.write_text("THE FOX AND THE GRAPES\n\nA Fox saw grapes\nhigh on a vine.\n\nHe left.\n\n"
                   "THE LION'S SHARE\n\nA Lion shared nothing.\n", encoding="utf-8")
    corpus = read(src)
    assert corpus.format == "text"
    assert triples(corpus) == [("The Fox and the Grapes", None, "A Fox saw grapes high on a vine.\n\nHe left."),
                               ("The Lion's Share", None, "A Lion shared nothing.")]


def test_split_on_regex(tmp_path):
    src = tmp_path / "diary.txt"
    src.write_text("Day 1\nRain all day.\nDay 2\nSun at last.\nDAY NOT\n", encoding="utf-8")
    corpus = read(src, split_on=r"^Day \d+$")
    assert triples(corpus) == [("Day 1", None, "Rain all day."), ("Day 2", None, "Sun at last. DAY NOT")]
    with pytest.raises(PasticheError, match=r"^--split-on '\(' is not a valid regular expression"):
        read(src, split_on="(")
    with pytest.raises(PasticheError) as err:
        read(src, split_on="^Night")
    assert str(err.value) == f"--split-on '^Night' matches no line of {src}."


def test_gutenberg_boilerplate_removed(tmp_path):
    src = tmp_path / "pg.txt"
    src.write_text("The Project Gutenberg eBook of Fables\n\nLicence words.\n\n"
                   "*** START OF THE PROJECT GUTENBERG EBOOK FABLES ***\n\nProduced by Someone\nand Friends\n\n"
                   "THE ANT\n\nAn ant worked.\n\nTHE BEE\n\nA bee hummed.\n\n"
                   "*** END OF THE PROJECT GUTENBERG EBOOK FABLES ***\n\nMore licence words.\n", encoding="utf-8")
    corpus = read(src)
    assert corpus.format == "text+gutenberg"
    assert triples(corpus) == [("The Ant", None, "An ant worked."), ("The Bee", None, "A bee hummed.")]
    assert strip_gutenberg("no markers") == ("no markers", False)


def write_epub(path: Path) -> Path:
    from ebooklib import epub

    book = epub.EpubBook()
    book.set_identifier("test-book")
    book.set_title("Test Book")
    book.set_language("en")
    chapters = []
    for i, (title, paragraphs) in enumerate([("First Light", ["Dawn came &amp; went.", "Then noon."]),
                                             ("Second Wind", ["A gust<br/>arrived."])]):
        chapter = epub.EpubHtml(title=title, file_name=f"ch{i}.xhtml", lang="en")
        chapter.content = f"<h1>{title}</h1>" + "".join(f"<p>{p}</p>" for p in paragraphs)
        book.add_item(chapter)
        chapters.append(chapter)
    book.toc = chapters
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = ["nav", *chapters]
    epub.write_epub(str(path), book)
    return path


def test_epub_chapters(tmp_path):
    corpus = read(write_epub(tmp_path / "book.epub"))
    assert corpus.format == "epub"
    assert triples(corpus) == [("First Light", None, "Dawn came & went.\n\nThen noon."),
                               ("Second Wind", None, "A gust arrived.")]
    not_epub = tmp_path / "fake.epub"
    not_epub.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PasticheError, match=r"fake.epub is not a readable EPUB"):
        read(not_epub)


def test_cleaning():
    decomposed = "Cafe\u0301  au\u00a0lait,\r\nserved\thot.\r\n \r\nNext\u200b paragraph.  "
    assert clean_text(decomposed) == "Caf\u00e9 au lait, served hot.\n\nNext paragraph."
    assert title_case("THE MILLER, HIS SON, AND THEIR ASS") == "The Miller, His Son, and Their Ass"
    assert title_case("CHAPTER XIV. A LION'S SHARE") == "Chapter XIV. A Lion's Share"


def test_decoding_bom_cp1252_and_binary(tmp_path):
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufefftext,title\nna\u00efve,T\n".encode("utf-8"))
    corpus = read(bom)
    assert triples(corpus) == [("T", None, "na\u00efve")] and corpus.warnings == []
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_bytes('{"text": "caf\u00e9 \u201cquoted\u201d"}\n'.encode("cp1252"))
    corpus = read(legacy)
    assert triples(corpus) == [(None, None, "caf\u00e9 \u201cquoted\u201d")]
    assert corpus.warnings == [f"{legacy} is not UTF-8 (byte 13); read it as cp1252"]
    binary = tmp_path / "image.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(PasticheError) as err:
        read(binary)
    assert str(err.value) == f"{binary} has undecodable bytes (NUL); expected text in UTF-8, cp1252 or Latin-1."


def test_duplicates_removed_and_near_duplicates_reported(tmp_path):
    story = "the lantern hung over the harbour and the bell rang for the tide every evening at seven"
    rows = [{"title": "A", "text": story}, {"title": "B", "text": "Something else entirely, about rope."},
            {"title": "A again", "text": story + "\n"}, {"title": "C", "text": story + " sharp"}]
    src = tmp_path / "dups.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    corpus = read(src)
    assert [p.title for p in corpus.pieces] == ["A", "B", "C"]
    assert corpus.duplicates_removed == 1
    assert corpus.near_duplicates == [{"a": 0, "b": 2, "similarity": 0.929}]
    assert corpus.warnings == ["near-duplicate pieces (93% shared 5-grams): 'A' and 'C'"]


@pytest.mark.parametrize("name, content, message", [
    ("missing.csv", None, "{src} does not exist; expected a CSV/TSV, JSONL/JSON, .txt/.md or EPUB file, "
                          "or a folder of .txt/.md files."),
    ("empty.txt", "  \n\n", "{src} is empty; expected an author's corpus."),
    ("header.csv", "title,text\n", "{src} has a header but no rows; expected one row per piece."),
    ("blank.csv", "title,text\nA,\nB,  \n", "{src} holds no text to learn from (every piece is empty)."),
    ("numbers.json", "[1, 2]", "{src} must hold JSON objects, one per piece, each with a 'text' field."),
])
def test_bad_sources(tmp_path, name, content, message):
    src = tmp_path / name
    if content is not None:
        src.write_text(content, encoding="utf-8")
    with pytest.raises(PasticheError) as err:
        read(src)
    assert str(err.value) == message.format(src=src)


def test_folder_without_texts(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"x")
    with pytest.raises(PasticheError) as err:
        read(tmp_path)
    assert str(err.value) == f"{tmp_path} has no .txt or .md files; expected one file per piece."


def test_piece_defaults():
    assert Piece("T", None, "x").number is None
