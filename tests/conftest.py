"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, a small synthetic corpus,
its prepared splits and a short training run. Everything real, only small."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest

WORDS = ("lantern harbour salt bell ledger rope tide brass window bridge stair garden mirror "
         "river tower market clock archive canal whisper evening traveller stone").split()


@pytest.fixture(autouse=True, scope="session")
def _pastiche_home(tmp_path_factory):
    """Point pastiche's cache at a test folder (PASTICHE_TEST_CACHE keeps it between sessions)."""
    home = os.environ.get("PASTICHE_TEST_CACHE") or str(tmp_path_factory.mktemp("pastiche-home"))
    os.environ["PASTICHE_HOME"] = home
    yield Path(home)


def synthetic_text(rng: random.Random, sentences: int) -> str:
    paragraphs, current = [], []
    for i in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        current.append(" ".join(words).capitalize() + ".")
        if len(current) == 3 or i == sentences - 1:
            paragraphs.append(" ".join(current))
            current = []
    return "\n\n".join(paragraphs)


def write_corpus_csv(path: Path, pieces: int = 30, seed: int = 0) -> Path:
    """A CSV of the original write-up's shape: series, number, city, text."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["series", "number", "city", "text"])
        for i in range(pieces):
            writer.writerow([f"Cities and the {WORDS[i % 5].title()}", i // 5 + 1, f"City{i:02d}",
                             synthetic_text(rng, rng.randint(4, 9))])
    return path


@pytest.fixture(scope="session")
def smol_tokenizer():
    from pastiche import models

    return models.load_tokenizer(models.resolve_base("embedded"))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, smol_tokenizer) -> Path:
    """A 2-layer random Llama (hidden 64) saved with the real SmolLM2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id,
                         pad_token_id=smol_tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-base")
    model.save_pretrained(folder, safe_serialization=True)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def corpus_csv(tmp_path_factory) -> Path:
    return write_corpus_csv(tmp_path_factory.mktemp("corpus") / "cities.csv")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus_csv, tiny_base) -> Path:
    from pastiche.cli import main

    out = tmp_path_factory.mktemp("prepared") / "cities"
    assert main(["prepare", str(corpus_csv), "--out", str(out), "--base", str(tiny_base),
                 "--max-tokens", "256"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, prepared, tiny_base) -> Path:
    from pastiche.cli import main

    runs = tmp_path_factory.mktemp("runs")
    assert main(["train", str(prepared), "--base", str(tiny_base), "--runs-dir", str(runs),
                 "--max-steps", "6", "--eval-steps", "3", "--save-steps", "3", "--learning-rate", "1e-3"]) == 0
    return runs / "cities-01"
