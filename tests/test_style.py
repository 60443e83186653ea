"""style.py metrics on hand-made texts with known answers."""

from __future__ import annotations

import random

import pytest

from pastiche import style

VOCAB_A = "lantern harbour salt bell ledger rope tide brass window bridge the of and a".split()
VOCAB_B = "engine rocket laser orbit signal planet crater module the of and a".split()


def text_from(vocab: list[str], words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(vocab) for _ in range(words))


def test_words_lowercase_keeps_contractions_drops_numbers():
    assert style.words("Don't STOP—the 3 cats’ bell!") == ["don't", "stop", "the", "cats", "bell"]


def test_mfw_basis_ranks_by_frequency_and_can_drop_pronouns():
    docs = [style.words("he he he the the of she"), style.words("the of he a he")]
    assert style.delta_basis(docs, 3).mfw == ["he", "the", "of"]
    assert style.delta_basis(docs, 3, drop_pronouns=True).mfw == ["the", "of", "a"]


def test_cosine_delta_identical_is_zero_mirrored_is_two():
    a, b = style.words("x x y"), style.words("x y y")
    basis = style.delta_basis([a, b], 2)
    assert basis.mean.tolist() == pytest.approx([0.5, 0.5])
    assert style.cosine_delta(a, a, basis) == 0.0
    assert style.cosine_delta(a, b, basis) == pytest.approx(2.0, abs=1e-12)


def test_gap_is_one_when_tuned_writes_like_train_and_zero_like_base():
    docs = {name: [style.words(text_from(vocab, 200, seed + i)) for i in range(4)]
            for name, vocab, seed in (("train", VOCAB_A, 0), ("test", VOCAB_A, 10), ("base", VOCAB_B, 20),
                                                  ("other", VOCAB_B, 30))}
    basis = style.delta_basis(docs["train"], 10, contrast_docs=docs["other"])
    like_train = style.delta_report({"tuned": docs["train"], "base": docs["base"], "train": docs["train"]},
                                    docs["test"], basis, resamples=30, seed=0)
    assert like_train["gap"]["gap"] == pytest.approx(1.0)
    assert like_train["tuned"]["delta"] == like_train["train"]["delta"] < like_train["base"]["delta"]
    like_base = style.delta_report({"tuned": docs["base"], "base": docs["base"], "train": docs["train"]},
                                   docs["test"], basis, resamples=30, seed=0)
    assert like_base["gap"]["gap"] == 0.0
    for name in ("tuned", "base", "train"):
        assert like_base[name]["low"] <= like_base[name]["delta"] <= like_base[name]["high"]


def test_copied_sample_has_copy_rate_one():
    train = [style.words(text_from(VOCAB_A, 40, 1)), style.words(text_from(VOCAB_A, 40, 2))]
    runs = style.SharedRuns(train)
    copied = train[0][5:25]
    assert style.copy_report([copied], runs) == {"copy_rate": 1.0, "ngrams": 13, "longest_max": 20,
                                                 "longest_p95": 20.0}
    assert style.copied_mask(runs.match_lengths(["zzz", *copied[:8], "zzz"])) == [False] + [True] * 8 + [False]


def test_seven_shared_words_are_not_copying_and_runs_stop_at_document_ends():
    runs = style.SharedRuns([style.words("a b c d e f g h"), style.words("i j k l m n o p")])
    report = style.copy_report([style.words("x a b c d e f g y")], runs)
    assert (report["copy_rate"], report["longest_max"]) == (0.0, 7)
    assert max(runs.match_lengths(style.words("f g h i j k"))) == 3  # h|i is a document boundary


def test_distinct_n_of_one_repeated_word_is_near_zero():
    same = [["word"] * 100]
    assert style.distinct_n(same, 1) == 0.01
    assert style.distinct_n(same, 2) == pytest.approx(1 / 99)
    assert style.distinct_n([style.words("a b c d")], 1) == 1.0
    assert style.compression_ratio(["word " * 100]) > 10 * style.compression_ratio([text_from(VOCAB_A + VOCAB_B, 100, 3)]) / 3


def test_length_summary_percentiles():
    summary = style.length_summary(["a", "a b", "a b c", "a b c d", "a b c d e"])
    assert {k: summary[k] for k in ("count", "mean", "median", "p10", "p90")} == {
        "count": 5, "mean": 3.0, "median": 3.0, "p10": pytest.approx(1.4), "p90": pytest.approx(4.6)}
    assert summary["words"] == [1, 2, 3, 4, 5]


def test_verifier_accepts_the_author_and_rejects_the_other_voice():
    author = [text_from(VOCAB_A, 120, i) for i in range(12)]
    other = [text_from(VOCAB_B, 120, 100 + i) for i in range(12)]
    verifier = style.author_verifier(author, other)
    assert style.accepted_share(verifier, [text_from(VOCAB_A, 120, 50 + i) for i in range(5)]) == 1.0
    assert style.accepted_share(verifier, [text_from(VOCAB_B, 120, 200 + i) for i in range(5)]) == 0.0
    assert style.accepted_share(verifier, []) is None
