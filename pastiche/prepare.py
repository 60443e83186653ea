"""pastiche prepare: an author's corpus -> chat-style prompt/completion records -> train/eval/test.

Pieces are split by piece (never a piece's chunks across splits), deterministically for --seed.
Each piece gives a "title" record (a request built from its metadata -> the text) and, with
--continuation, a "continuation" record (its opening sentence -> the rest). A record longer
than --max-tokens, counted with the base's tokenizer and chat template, is cut into chunks at
paragraph, then sentence, then (reported) word boundaries; nothing is dropped. training_data.csv
holds the train split only, so the test split can never be trained on by accident.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import sys
from collections import deque
from pathlib import Path

from pastiche import __version__, chat, models, paths
from pastiche.config import PrepareConfig, to_dict
from pastiche.corpus import Piece, read_corpus
from pastiche.errors import PasticheError

SPLITS = ("train", "eval", "test")
CUT_LEVELS = ("paragraphs", "sentences", "words")
TITLE_PROMPTS = {  # keyed by (has title, has group)
    (True, True): ('Write the piece titled "{title}", from the series "{group}"{by}.',
                   'From the series "{group}", write "{title}"{by}.',
                   'Write "{title}"{by}. It belongs to the series "{group}".'),
    (True, False): ('Write the piece titled "{title}"{by}.', 'Write a piece called "{title}"{by}.',
                    'Compose "{title}"{by}.'),
    (False, True): ('Write a piece from the series "{group}"{by}.', 'Write a new piece for the series "{group}"{by}.'),
    (False, False): ("Write a piece{by}.", "Write a new piece{by}.", "Compose a piece{by}."),
}
PART_SUFFIX = " Write part {part}, which continues from part {previous}."
CONTINUATION_PROMPTS = ("Continue this piece{called}{by}. It opens:\n\n{opening}",
                        "Here is the first sentence of a piece{called}{by}. Write the rest.\n\n{opening}")
SENTENCE_END = re.compile(r"[.!?…]+[\"”’')\]]*\s+")
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "mt", "vs", "etc", "jr", "sr", "prof", "capt", "col", "gen"}


def sentences(paragraph: str) -> list[str]:
    """Cut a paragraph after . ! ? … (and closing quotes) when a capital or digit follows."""
    parts, start = [], 0
    for match in SENTENCE_END.finditer(paragraph):
        following = paragraph[match.end():match.end() + 3].lstrip("\"“‘'([")[:1]
        previous = re.search(r"(\w+)$", paragraph[start:match.start()])
        if not (following.isupper() or following.isdigit()):
            continue
        if previous and previous.group(1).lower() in ABBREVIATIONS and match.group().startswith("."):
            continue
        parts.append(paragraph[start:match.end()].rstrip())
        start = match.end()
    rest = paragraph[start:].strip()
    return parts + [rest] if rest else parts


def pack(text: str, fits) -> tuple[list[str], int]:
    """Greedy chunks of ``text`` with ``fits(chunk_index, chunk_text)``, and the finest cut level used.

    Paragraphs are kept whole when they fit; a paragraph that cannot fit alone is split into
    sentences, a sentence into words. Level: -1 not cut, 0 paragraphs, 1 sentences, 2 words.
    """
    queue = deque(("\n\n", p, 0) for p in text.split("\n\n"))
    chunks: list[str] = []
    current, level = "", -1
    while queue:
        sep, atom, depth = queue.popleft()
        candidate = current + sep + atom if current else atom
        if fits(len(chunks), candidate):
            current = candidate
        elif current:
            chunks.append(current)
            current, level = "", max(level, 0)
            queue.appendleft((sep, atom, depth))
        elif depth < 2:
            parts, depth = (sentences(atom), 1) if depth == 0 else (atom.split(), 2)
            if len(parts) == 1 and depth == 1:  # one long sentence: straight to words
                parts, depth = atom.split(), 2
            level = max(level, depth)
            queue.extendleft(reversed([(sep, parts[0], depth)] + [(" ", p, depth) for p in parts[1:]]))
        else:
            raise PasticheError(f"--max-tokens: the word {atom[:40]!r} does not fit in one record even alone "
                                "with its prompt; raise --max-tokens.")
    chunks.append(current)
    return chunks, level


class RecordBuilder:
    """Turns one piece into records that each fit --max-tokens, template included."""

    def __init__(self, tokenizer, cfg: PrepareConfig):
        self.tokenizer, self.cfg = tokenizer, cfg
        self.by = f" in the style of {cfg.author}" if cfg.author else ""
        self.skipped = 0  # records dropped because the prompt would contain their completion
        self._counted: dict[tuple[str, str], int] = {}  # packing asks for the same record twice

    def tokens(self, prompt: str, completion: str) -> int:
        key = (prompt, completion)
        if key not in self._counted:
            if len(self._counted) > 10_000:  # bound the memory on very large corpora
                self._counted.clear()
            ids = chat.encode_record(self.tokenizer, prompt, completion, self.cfg.system_prompt)
            self._counted[key] = len(ids[0]) + len(ids[1])
        return self._counted[key]

    def _choose(self, options: tuple[str, ...], *key: object) -> str:
        return options[random.Random(":".join(map(str, (self.cfg.seed, *key)))).randrange(len(options))]

    def title_prompt(self, pid: str, piece: Piece, chunk: int) -> str:
        options = TITLE_PROMPTS[bool(piece.title), bool(piece.group)]
        prompt = self._choose(options, pid, "title").format(title=piece.title, group=piece.group, by=self.by)
        return prompt + (PART_SUFFIX.format(part=chunk + 1, previous=chunk) if chunk else "")

    def continuation(self, pid: str, piece: Piece, text: str) -> tuple[str, str] | None:
        """(prompt with the opening sentence, the rest) or None when there is no rest."""
        opening = sentences(text.split("\n\n", 1)[0])[0]
        rest = text[len(opening):].strip()
        if not rest:
            return None
        called = f' titled "{piece.title}"' if piece.title else ""
        template = self._choose(CONTINUATION_PROMPTS, pid, "continuation")
        return template.format(called=called, by=self.by, opening=opening), rest

    def piece_records(self, pid: str, piece: Piece, split: str) -> tuple[list[dict], list[int], int, int]:
        """(records, their token lengths, number of chunks, cut level as in ``pack``)."""
        limit = self.cfg.max_tokens

        def fits(chunk: int, text: str) -> bool:
            if self.tokens(self.title_prompt(pid, piece, chunk), text) > limit:
                return False
            pair = self.continuation(pid, piece, text) if chunk == 0 and self.cfg.continuation else None
            return pair is None or self.tokens(*pair) <= limit

        chunks, level = pack(piece.text, fits)
        pairs = [(f"c{i}-title", self.title_prompt(pid, piece, i), text) for i, text in enumerate(chunks)]
        if self.cfg.continuation and (pair := self.continuation(pid, piece, chunks[0])):
            pairs.insert(1, ("c0-continuation", *pair))
        records, lengths = [], []
        for suffix, prompt, completion in pairs:
            if completion in prompt:  # a prompt must never contain the text it asks for
                self.skipped += 1
                continue
            records.append({"id": f"{pid}-{suffix}", "piece": pid, "title": piece.title, "group": piece.group,
                            "split": split, "task": suffix.split("-", 1)[1], "system": self.cfg.system_prompt,
                            "prompt": prompt, "completion": completion})
            lengths.append(self.tokens(prompt, completion))
        return records, lengths, len(chunks), level


def split_pieces(ids: list[str], cfg: PrepareConfig) -> dict[str, list[str]]:
    """Piece ids per split: a seeded shuffle, at least one piece in each requested split."""
    n = len(ids)
    fractions = {"eval": cfg.eval_fraction, "test": cfg.test_fraction}
    sizes = {name: max(1, round(n * f)) if f > 0 else 0 for name, f in fractions.items()}
    while n - sum(sizes.values()) < 1 and max(sizes.values()) > 1:
        sizes[max(sizes, key=sizes.get)] -= 1
    needed = 1 + sum(1 for f in fractions.values() if f > 0)
    if n < needed:
        raise PasticheError(f"{cfg.source} has {n} piece{'s' * (n != 1)}, but --eval-fraction {cfg.eval_fraction} "
                            f"and --test-fraction {cfg.test_fraction} need at least {needed} (one per split).")
    order = sorted(ids)
    random.Random(cfg.seed).shuffle(order)
    test, held = order[: sizes["test"]], order[sizes["test"]: sizes["test"] + sizes["eval"]]
    return {"train": sorted(order[len(test) + len(held):]), "eval": sorted(held), "test": sorted(test)}


def token_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {"records": 0, "total": 0}
    s = sorted(lengths)
    return {"records": len(s), "min": s[0], "mean": round(sum(s) / len(s), 1), "median": s[len(s) // 2],
            "p95": s[min(len(s) - 1, int(0.95 * len(s)))], "max": s[-1], "total": sum(s)}


def source_sha256(path: Path) -> str:
    """sha256 of the file, or of every file's relative path and bytes for a folder."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def versions() -> dict:
    import platform
    from importlib import metadata

    found = {"python": platform.python_version(), "pastiche": __version__}
    for package in ("transformers", "tokenizers", "datasets", "ebooklib", "matplotlib"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def prepare(cfg: PrepareConfig) -> Path:
    """Read ``cfg.source``, build and split the records, write the prepared folder; returns it."""
    source, out = Path(cfg.source), Path(cfg.out)
    paths.refuse_existing(out, cfg.force)
    corpus = read_corpus(source, cfg)
    for warning in corpus.warnings:
        print(f"pastiche prepare: warning: {warning}", file=sys.stderr)
    width = max(4, len(str(len(corpus.pieces) - 1)))
    ids = [f"p{i:0{width}d}" for i in range(len(corpus.pieces))]
    splits = split_pieces(ids, cfg)
    base = models.resolve_base(cfg.base)
    builder = RecordBuilder(models.load_tokenizer(base), cfg)
    records, lengths, pieces_info, cuts = build_records(builder, dict(zip(ids, corpus.pieces)), splits)
    info = {
        "config": to_dict(cfg),
        "source": {"path": str(source.resolve()), "sha256": source_sha256(source), "format": corpus.format},
        "base": base.to_json(),
        "template": {"end_of_turn": chat.end_of_turn(builder.tokenizer), "system": cfg.system_prompt},
        "counts": {"pieces": len(ids), "words": sum(p["words"] for p in pieces_info.values()),
                   "pieces_per_split": {name: len(members) for name, members in splits.items()},
                   "records": {name: sum(r["split"] == name for r in records) for name in SPLITS},
                   "tasks": {task: sum(r["task"] == task for r in records) for task in ("title", "continuation")},
                   "cut": cuts, "duplicates_removed": corpus.duplicates_removed,
                   "near_duplicates": len(corpus.near_duplicates), "skipped_records": builder.skipped},
        "tokens": {"max_tokens": cfg.max_tokens, "all": token_stats(lengths),
                   **{name: token_stats([n for r, n in zip(records, lengths) if r["split"] == name])
                      for name in SPLITS}},
        "splits": splits,
        "pieces": pieces_info,
        "near_duplicates": [{"a": ids[p["a"]], "b": ids[p["b"]], "similarity": p["similarity"]}
                            for p in corpus.near_duplicates],
        "warnings": corpus.warnings,
        "versions": versions(),
    }
    with paths.atomic_dir(out, cfg.force) as folder:
        write_outputs(folder, records, lengths, info)
    return out


def build_records(builder: RecordBuilder, pieces: dict[str, Piece], splits: dict[str, list[str]]):
    """(records, token lengths, per-piece metadata, cut counts) for every piece, in piece order."""
    split_of = {pid: name for name, members in splits.items() for pid in members}
    records, lengths, pieces_info = [], [], {}
    cuts = {"pieces": 0, "chunks": 0, **{f"at_{name}": 0 for name in CUT_LEVELS}}
    for pid, piece in pieces.items():
        piece_records, piece_lengths, n_chunks, level = builder.piece_records(pid, piece, split_of[pid])
        records += piece_records
        lengths += piece_lengths
        if level >= 0:
            cuts["pieces"] += 1
            cuts["chunks"] += n_chunks
            cuts[f"at_{CUT_LEVELS[level]}"] += 1
        pieces_info[pid] = {"title": piece.title, "group": piece.group, "number": piece.number,
                            "words": len(piece.text.split()), "chunks": n_chunks}
    return records, lengths, pieces_info, cuts


def write_outputs(folder: Path, records: list[dict], lengths: list[int], info: dict) -> None:
    import datasets
    from datasets import Dataset, Features, Value

    datasets.disable_progress_bars()
    by_split = {name: [r for r in records if r["split"] == name] for name in SPLITS}
    for name, file in paths.SPLIT_FILES.items():
        with (folder / file).open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in by_split[name])
    features = Features({key: Value("string") for key in
                         ("id", "piece", "title", "group", "split", "task", "system", "prompt", "completion")})
    for name, folder_name in (("train", paths.TRAIN_DATASET_DIR), ("eval", paths.EVAL_DATASET_DIR)):
        # from_dict and one shard: an empty split (--eval-fraction 0) still saves and reloads.
        columns = {key: [r[key] for r in by_split[name]] for key in features}
        Dataset.from_dict(columns, features=features).save_to_disk(str(folder / folder_name), num_shards=1)
    with (folder / paths.TRAINING_CSV).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["input", "output"])
        writer.writerows([r["prompt"], r["completion"]] for r in by_split["train"])
    plot_lengths(folder / paths.LENGTHS_PNG, records, lengths, info["tokens"]["max_tokens"])
    (folder / paths.PREPARE_JSON).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def plot_lengths(file: Path, records: list[dict], lengths: list[int], max_tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    per_split = [[n for r, n in zip(records, lengths) if r["split"] == name] for name in SPLITS]
    ax.hist(per_split, bins=30, stacked=True, label=list(SPLITS))
    ax.axvline(max_tokens, color="black", linestyle="--", label=f"--max-tokens {max_tokens}")
    ax.set(xlabel="tokens per record (chat template included)", ylabel="records", title="Record lengths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)


def summary(info: dict, out: Path) -> str:
    """The terminal table, read back from prepare.json so it shows what was written."""
    counts, tokens, cut = info["counts"], info["tokens"], info["counts"]["cut"]
    lines = [f"pastiche prepare: {counts['pieces']} pieces ({counts['words']:,} words) from "
             f"{Path(info['source']['path']).name} [{info['source']['format']}] -> {out}",
             f"  {'split':<6} {'pieces':>7} {'records':>8} {'tokens':>9} {'mean':>7} {'max':>6}"]
    for name in SPLITS:
        stats = tokens[name]
        lines.append(f"  {name:<6} {counts['pieces_per_split'][name]:>7} {counts['records'][name]:>8} "
                     f"{stats['total']:>9,} {stats.get('mean', 0):>7} {stats.get('max', 0):>6}")
    cuts = (f"{cut['pieces']} pieces into {cut['chunks']} chunks ({cut['at_paragraphs']} at paragraphs, "
            f"{cut['at_sentences']} inside a paragraph at sentences, {cut['at_words']} inside a sentence at words)")
    lines.append(f"  cut at --max-tokens {tokens['max_tokens']}: {cuts if cut['pieces'] else 'none'}")
    lines.append(f"  duplicates removed: {counts['duplicates_removed']}; "
                 f"near-duplicates reported: {counts['near_duplicates']}")
    return "\n".join(lines)


def main(cfg: PrepareConfig) -> int:
    out = prepare(cfg)
    print(summary(json.loads((out / paths.PREPARE_JSON).read_text(encoding="utf-8")), out))
    return 0
