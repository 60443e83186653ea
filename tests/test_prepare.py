"""prepare.py: records, splits by piece, chunking at paragraph/sentence/word, outputs, bad input."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from pastiche import chat
from pastiche.cli import main
from pastiche.prepare import pack, sentences

EXPECTED_FILES = {"train.jsonl", "eval.jsonl", "test.jsonl", "train_dataset", "eval_dataset",
                  "training_data.csv", "token_lengths.png", "prepare.json"}
RECORD_KEYS = ["id", "piece", "title", "group", "split", "task", "system", "prompt", "completion"]


def load_records(folder: Path) -> dict[str, list[dict]]:
    return {s: [json.loads(line) for line in (folder / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()]
            for s in ("train", "eval", "test")}


def run_prepare(source: Path, out: Path, base: Path, *flags: str) -> int:
    return main(["prepare", str(source), "--out", str(out), "--base", str(base), *flags])


def test_prepared_folder_contract(prepared, smol_tokenizer):
    assert {p.name for p in prepared.iterdir()} == EXPECTED_FILES
    info = json.loads((prepared / "prepare.json").read_text())
    records = load_records(prepared)
    assert info["counts"]["pieces_per_split"] == {"train": 24, "eval": 3, "test": 3}
    assert {s: len(r) for s, r in records.items()} == info["counts"]["records"] == {"train": 48, "eval": 6, "test": 6}
    assert info["counts"]["tasks"] == {"title": 30, "continuation": 30}
    assert info["counts"]["cut"]["pieces"] == 0
    assert info["source"]["format"] == "csv" and len(info["source"]["sha256"]) == 64
    assert info["config"]["max_tokens"] == 256 and info["template"]["end_of_turn"] == "<|im_end|>"
    splits = {s: set(ids) for s, ids in info["splits"].items()}
    assert not (splits["train"] & splits["eval"] or splits["train"] & splits["test"] or splits["eval"] & splits["test"])
    assert splits["train"] | splits["eval"] | splits["test"] == set(info["pieces"]) and len(info["pieces"]) == 30
    lengths = []
    for split, rows in records.items():
        for r in rows:
            assert list(r) == RECORD_KEYS and r["split"] == split and r["piece"] in splits[split]
            assert re.fullmatch(r"p\d{4}-c\d+-(title|continuation)", r["id"]) and r["id"].endswith(r["task"])
            assert r["completion"] not in r["prompt"] and r["completion"] == r["completion"].strip()
            prompt_ids, completion_ids = chat.encode_record(smol_tokenizer, r["prompt"], r["completion"])
            lengths.append(len(prompt_ids) + len(completion_ids))
    assert max(lengths) <= 256 and sum(lengths) == info["tokens"]["all"]["total"]
    first = records["train"][0]
    assert first["title"] == "City00" and first["group"] == "Cities and the Lantern"
    assert first["prompt"] in {'Write the piece titled "City00", from the series "Cities and the Lantern".',
                               'From the series "Cities and the Lantern", write "City00".',
                               'Write "City00". It belongs to the series "Cities and the Lantern".'}


def test_datasets_and_csv_match_the_jsonl(prepared):
    from datasets import load_from_disk

    records = load_records(prepared)
    for split in ("train", "eval"):
        dataset = load_from_disk(str(prepared / f"{split}_dataset"))
        assert dataset.num_rows == len(records[split]) and dataset.column_names == RECORD_KEYS
        assert dataset[0] == records[split][0]
    with (prepared / "training_data.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["input"], r["output"]) for r in rows] == [(r["prompt"], r["completion"]) for r in records["train"]]
    assert (prepared / "token_lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_split_is_deterministic_and_depends_on_seed(tmp_path, corpus_csv, tiny_base, prepared):
    again = tmp_path / "again"
    assert run_prepare(corpus_csv, again, tiny_base, "--max-tokens", "256") == 0
    for name in ("train.jsonl", "eval.jsonl", "test.jsonl", "training_data.csv"):
        assert (again / name).read_bytes() == (prepared / name).read_bytes()
    other = tmp_path / "other"
    assert run_prepare(corpus_csv, other, tiny_base, "--max-tokens", "256", "--seed", "7",
                       "--eval-fraction", "0.2", "--no-continuation") == 0
    info = json.loads((other / "prepare.json").read_text())
    assert info["counts"]["pieces_per_split"] == {"train": 21, "eval": 6, "test": 3}
    assert info["splits"]["test"] != json.loads((prepared / "prepare.json").read_text())["splits"]["test"]
    assert info["counts"]["tasks"] == {"title": 30, "continuation": 0}


def test_no_eval_split_still_writes_an_empty_dataset(corpus_csv, tiny_base, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "no-eval"
    assert run_prepare(corpus_csv, out, tiny_base, "--max-tokens", "256", "--eval-fraction", "0") == 0
    assert json.loads((out / "prepare.json").read_text())["counts"]["pieces_per_split"] == {"train": 27, "eval": 0, "test": 3}
    assert (out / "eval.jsonl").read_text() == ""
    empty = load_from_disk(str(out / "eval_dataset"))
    assert (empty.num_rows, sorted(empty.column_names)) == (0, sorted(["id", "piece", "title", "group", "split", "task",
                                                                       "system", "prompt", "completion"]))


def test_sentences():
    text = 'He said, "Go." Then Mr. Lee left! Was it 3 p.m.? 4 more. lower case stays.'
    assert sentences(text) == ['He said, "Go."', "Then Mr. Lee left!", "Was it 3 p.m.?", "4 more. lower case stays."]


def test_pack_cuts_at_paragraphs_then_sentences_then_words():
    def fits(chunk, text):
        return len(text) <= 30

    assert pack("Short one.\n\nShort two.", fits) == (["Short one.\n\nShort two."], -1)
    assert pack("Para number one.\n\nPara number two.", fits) == (["Para number one.", "Para number two."], 0)
    assert pack("One sentence here. Two sentence here.\n\nEnd.", fits) == (
        ["One sentence here.", "Two sentence here.\n\nEnd."], 1)
    assert pack("a bb ccc dddd eeeee ffffff ggggggg hhhhhhhh.", fits) == (
        ["a bb ccc dddd eeeee ffffff", "ggggggg hhhhhhhh."], 2)


def long_paragraph(word: str, sentences_count: int) -> str:
    return " ".join(f"The {word} number {i} rang over the quiet grey harbour at dusk." for i in range(sentences_count))


def test_long_piece_is_cut_into_chunks_that_stay_in_one_split(tmp_path, tiny_base, smol_tokenizer):
    paragraphs = [long_paragraph(w, 4) for w in ("bell", "lamp", "rope")]
    rows = [{"title": "Long", "text": "\n\n".join(paragraphs)},  # cut at paragraphs
            {"title": "Longer", "text": long_paragraph("tide", 14)}]  # one paragraph: cut at sentences
    rows += [{"title": f"Short {i}", "text": f"A short piece, number {i}. It ends here."} for i in range(4)]
    src = tmp_path / "long.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    assert run_prepare(src, out, tiny_base, "--max-tokens", "120", "--eval-fraction", "0.2",
                       "--test-fraction", "0.2") == 0
    info = json.loads((out / "prepare.json").read_text())
    assert info["counts"]["cut"] == {"pieces": 2, "chunks": 7, "at_paragraphs": 1, "at_sentences": 1, "at_words": 0}
    records = [r for rows in load_records(out).values() for r in rows]
    by_piece = {pid: [r for r in records if r["piece"] == pid] for pid in ("p0000", "p0001")}
    long_titles = [r for r in by_piece["p0000"] if r["task"] == "title"]
    assert [r["completion"] for r in long_titles] == paragraphs
    assert [r["id"] for r in long_titles] == ["p0000-c0-title", "p0000-c1-title", "p0000-c2-title"]
    assert long_titles[1]["prompt"].endswith(" Write part 2, which continues from part 1.")
    longer = [r["completion"] for r in by_piece["p0001"] if r["task"] == "title"]
    assert len(longer) == 4 and " ".join(longer) == rows[1]["text"]
    assert all(chunk.endswith("dusk.") for chunk in longer)
    for pid, piece_records in by_piece.items():
        assert len({r["split"] for r in piece_records}) == 1
    for r in records:
        prompt_ids, completion_ids = chat.encode_record(smol_tokenizer, r["prompt"], r["completion"])
        assert len(prompt_ids) + len(completion_ids) <= 120


def test_summary_is_printed(tmp_path, corpus_csv, tiny_base, capsys):
    out = tmp_path / "cities"
    assert run_prepare(corpus_csv, out, tiny_base, "--max-tokens", "256") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"pastiche prepare: 30 pieces (1,910 words) from cities.csv [csv] -> {out}"
    assert lines[2].split()[:3] == ["train", "24", "48"]
    assert lines[5] == "  cut at --max-tokens 256: none"


def test_words_that_cannot_fit_are_refused(tmp_path, tiny_base, capsys):
    src = tmp_path / "tiny.jsonl"
    src.write_text("\n".join(json.dumps({"title": "T" * 60, "text": f"Word{i}."}) for i in range(3)), encoding="utf-8")
    assert run_prepare(src, tmp_path / "out", tiny_base, "--max-tokens", "32") == 2
    assert capsys.readouterr().err == ("pastiche prepare: error: --max-tokens: the word 'Word0.' does not fit in one "
                                       "record even alone with its prompt; raise --max-tokens.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.jsonl"]


def bad_source(tmp_path: Path, kind: str) -> Path:
    src = {"missing": tmp_path / "nothing.csv", "empty": tmp_path / "empty.txt", "binary": tmp_path / "blob.txt",
           "columns": tmp_path / "nums.csv", "few": tmp_path / "two.jsonl"}[kind]
    content = {"empty": b"", "binary": b"\x00\x01\x02\xff", "columns": b"id,score\n1,2\n",
               "few": b'{"text": "One."}\n{"text": "Two."}\n'}.get(kind)
    if content is not None:
        src.write_bytes(content)
    return src


@pytest.mark.parametrize("kind, message", [
    ("missing", "{src} does not exist; expected a CSV/TSV, JSONL/JSON, .txt/.md or EPUB file, or a folder of .txt/.md files."),
    ("empty", "{src} is empty; expected an author's corpus."),
    ("binary", "{src} has undecodable bytes (NUL); expected text in UTF-8, cp1252 or Latin-1."),
    ("columns", "{src} has no text column (columns seen: id, score); expected one of text, body, content, passage, "
                "story, response, output, completion, or name it with --text-column."),
    ("few", "{src} has 2 pieces, but --eval-fraction 0.1 and --test-fraction 0.1 need at least 3 (one per split)."),
])
def test_bad_input_exits_2_and_leaves_nothing(tmp_path, tiny_base, capsys, kind, message):
    src = bad_source(tmp_path, kind)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run_prepare(src, tmp_path / "out", tiny_base) == 2
    captured = capsys.readouterr()
    assert captured.err == f"pastiche prepare: error: {message.format(src=src)}\n" and captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_existing_output_refused_unless_force(tmp_path, corpus_csv, tiny_base, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_prepare(corpus_csv, out, tiny_base) == 2
    assert capsys.readouterr().err == (f"pastiche prepare: error: --out: {out} already exists; "
                                       "choose another folder or pass --force.\n")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert run_prepare(corpus_csv, out, tiny_base, "--force") == 0
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_every_format_prepares(tmp_path, tiny_base):
    from test_corpus import write_epub

    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i:02d}_piece.md").write_text(f"# Piece {i}\n\nText of piece {i}. It has two sentences.")
    caps = tmp_path / "caps.txt"
    caps.write_text("".join(f"TITLE {n}\n\nBody {n} line one\nand line two.\n\n" for n in ("ONE", "TWO", "THREE")))
    epub = write_epub(tmp_path / "book.epub")
    formats = {}
    for src in (folder, caps, epub):
        out = tmp_path / f"out-{src.name}"
        assert run_prepare(src, out, tiny_base, "--eval-fraction", "0.3", "--test-fraction", "0.3"
                           if src != epub else "0") == 0
        info = json.loads((out / "prepare.json").read_text())
        formats[src.name] = (info["source"]["format"], info["counts"]["pieces"],
                             sorted(p["title"] for p in info["pieces"].values()))
    assert formats == {"folder": ("folder", 3, ["Piece 0", "Piece 1", "Piece 2"]),
                       "caps.txt": ("text", 3, ["Title One", "Title Three", "Title Two"]),
                       "book.epub": ("epub", 2, ["First Light", "Second Wind"])}


def test_author_system_prompt_and_prompt_never_holds_its_completion(tmp_path, tiny_base, smol_tokenizer):
    rows = [{"title": f"T{i}", "text": f"Story {i} begins. Story {i} ends."} for i in range(3)]
    rows.append({"text": "Ada Lovelace."})  # every untitled prompt ends with it: no record for this piece
    src = tmp_path / "styled.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    assert run_prepare(src, out, tiny_base, "--author", "Ada Lovelace", "--system-prompt", "You write fables.",
                       "--no-continuation", "--eval-fraction", "0.25", "--test-fraction", "0.25") == 0
    info = json.loads((out / "prepare.json").read_text())
    assert info["counts"]["skipped_records"] == 1 and info["counts"]["tasks"] == {"title": 3, "continuation": 0}
    records = [r for rows in load_records(out).values() for r in rows]
    assert sorted(r["piece"] for r in records) == ["p0000", "p0001", "p0002"]
    assert all(r["system"] == "You write fables." and r["prompt"].endswith(" in the style of Ada Lovelace.")
               for r in records)
    total = sum(len(p) + len(c) for p, c in
                (chat.encode_record(smol_tokenizer, r["prompt"], r["completion"], r["system"]) for r in records))
    assert total == info["tokens"]["all"]["total"]
