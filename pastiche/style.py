"""Stylometry on plain texts: Cosine Delta over the most frequent words, copying, diversity, and
an author-verification classifier. Pure functions of word lists; evaluate.py supplies the texts.

Cosine Delta (Smith & Aldridge 2011; Evert et al. 2017): relative frequencies of the N most
frequent words of the training split are z-scored with a mean and standard deviation measured
across reference documents, and two texts are as far apart as one minus the cosine of their
z-score vectors (0: same profile, 2: opposite).
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
PRONOUNS = frozenset("""i me my mine myself we us our ours ourselves you your yours yourself yourselves he him
his himself she her hers herself it its itself they them their theirs themselves thee thou thy thine ye""".split())
FUNCTION_WORDS = tuple("""the a an and but or nor for so yet of in on at by to from with without into onto upon
over under above below between among through during before after since until while as than that which who whom
whose what when where why how if then there here this these those not no all any both each every few more most
other some such only own same too very can could may might must shall should will would is are was were be been
being have has had do does did i me my we our you your he him his she her it its they them their""".split())
COPY_NGRAM = 8  # a run of 8 words shared with training text counts as copied


def words(text: str) -> list[str]:
    return WORD.findall(text.lower().replace("’", "'"))


# --- Cosine Delta ---------------------------------------------------------------------------

@dataclass
class DeltaBasis:
    """The MFW list (from the training split) and the z-score statistics of each word's rate."""

    mfw: list[str]
    mean: np.ndarray
    std: np.ndarray


def relative_frequencies(tokens: list[str], mfw: list[str]) -> np.ndarray:
    counts = Counter(tokens)
    return np.array([counts[w] for w in mfw], dtype=float) / max(len(tokens), 1)


def delta_basis(train_docs: list[list[str]], n_mfw: int, drop_pronouns: bool = False,
                contrast_docs: list[list[str]] | None = None) -> DeltaBasis:
    """MFW over the pooled training words; each word's mean and std across the documents.

    With ``contrast_docs`` (another voice, e.g. base-model samples for training prompts) the
    mean is the midpoint of the two voices' means: z-scores measured around one author alone
    put the author's pooled text at the origin, where the cosine has no direction.
    """
    counts = Counter(w for doc in train_docs for w in doc)
    ranked = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
              if not (drop_pronouns and w in PRONOUNS)][:n_mfw]
    groups = [np.array([relative_frequencies(d, ranked) for d in docs if d])
              for docs in (train_docs, contrast_docs or []) if any(docs)]
    rates = np.concatenate(groups)
    std = rates.std(axis=0, ddof=1) if len(rates) > 1 else np.zeros(len(ranked))
    mean = np.mean([g.mean(axis=0) for g in groups], axis=0)
    keep = std > 0  # a word with the same rate in every document cannot be z-scored
    return DeltaBasis([w for w, k in zip(ranked, keep) if k], mean[keep], std[keep])


def cosine_delta(a: list[str], b: list[str], basis: DeltaBasis) -> float:
    """1 - cos(z(a), z(b)): 0 for texts with the same MFW profile, up to 2 for opposite ones."""
    za = (relative_frequencies(a, basis.mfw) - basis.mean) / basis.std
    zb = (relative_frequencies(b, basis.mfw) - basis.mean) / basis.std
    norm = np.linalg.norm(za) * np.linalg.norm(zb)
    return float(1.0 - np.clip(za @ zb / norm, -1.0, 1.0)) if norm else 0.0


def _pool(docs: list[list[str]], pick: np.ndarray) -> list[str]:
    return [w for i in pick for w in docs[i]]


def delta_report(bags: dict[str, list[list[str]]], test: list[list[str]], basis: DeltaBasis,
                 resamples: int, seed: int) -> dict:
    """D(bag, test) for every bag with 95% bootstrap intervals (documents resampled with
    replacement, the test bag shared within a resample), plus the gap score
    (D_base - D_tuned) / (D_base - D_self) when bags 'tuned', 'base' and 'train' are given."""
    rng = np.random.default_rng(seed)
    pooled_test = _pool(test, np.arange(len(test)))
    point = {name: cosine_delta(_pool(docs, np.arange(len(docs))), pooled_test, basis) for name, docs in bags.items()}
    draws: dict[str, list[float]] = {name: [] for name in [*bags, "gap"]}
    for _ in range(resamples):
        test_bag = _pool(test, rng.integers(0, len(test), len(test)))
        d = {name: cosine_delta(_pool(docs, rng.integers(0, len(docs), len(docs))), test_bag, basis)
             for name, docs in bags.items()}
        for name, value in d.items():
            draws[name].append(value)
        if {"tuned", "base", "train"} <= d.keys() and d["base"] != d["train"]:
            draws["gap"].append((d["base"] - d["tuned"]) / (d["base"] - d["train"]))
    out = {name: {"delta": point[name], **_interval(draws[name])} for name in bags}
    if {"tuned", "base", "train"} <= point.keys():
        span = point["base"] - point["train"]
        out["gap"] = {"gap": (point["base"] - point["tuned"]) / span if span else None, **_interval(draws["gap"])}
    return out


def _interval(values: list[float]) -> dict:
    if not values:
        return {"low": None, "high": None}
    low, high = np.percentile(values, [2.5, 97.5])
    return {"low": float(low), "high": float(high)}


# --- Copying --------------------------------------------------------------------------------

class SharedRuns:
    """Longest run of words shared with a reference corpus, at every position of a text.

    A suffix automaton over the reference words (documents kept apart by unique separators)
    answers each query text in one left-to-right pass.
    """

    def __init__(self, docs: list[list[str]]):
        self.next: list[dict] = [{}]
        self.link, self.length = [-1], [0]
        last = 0
        for index, doc in enumerate(docs):
            for symbol in [*doc, -1 - index]:
                last = self._extend(last, symbol)

    def _extend(self, last: int, symbol) -> int:
        nxt, link, length = self.next, self.link, self.length
        cur = len(nxt)
        nxt.append({}), link.append(-1), length.append(length[last] + 1)
        p = last
        while p != -1 and symbol not in nxt[p]:
            nxt[p][symbol] = cur
            p = link[p]
        if p == -1:
            link[cur] = 0
        elif length[p] + 1 == length[q := nxt[p][symbol]]:
            link[cur] = q
        else:
            clone = len(nxt)
            nxt.append(dict(nxt[q])), link.append(link[q]), length.append(length[p] + 1)
            while p != -1 and nxt[p].get(symbol) == q:
                nxt[p][symbol] = clone
                p = link[p]
            link[q] = link[cur] = clone
        return cur

    def match_lengths(self, text: list[str]) -> list[int]:
        """For each word, the length of the longest shared run ending at it."""
        state, run, out = 0, 0, []
        for word in text:
            while state and word not in self.next[state]:
                state = self.link[state]
                run = self.length[state]
            if word in self.next[state]:
                state, run = self.next[state][word], run + 1
            out.append(run)
        return out


def copied_mask(match: list[int], n: int = COPY_NGRAM) -> list[bool]:
    """Words inside a run of at least ``n`` words shared with the reference."""
    mask = [False] * len(match)
    for end, run in enumerate(match):
        if run >= n:
            for i in range(end - run + 1, end + 1):
                mask[i] = True
    return mask


def copy_report(texts: list[list[str]], runs: SharedRuns, n: int = COPY_NGRAM) -> dict:
    """Share of the texts' word n-grams found verbatim in the reference, and longest shared runs."""
    matches = [runs.match_lengths(t) for t in texts]
    ngrams = sum(max(len(t) - n + 1, 0) for t in texts)
    copied = sum(sum(1 for run in m if run >= n) for m in matches)
    longest = [max(m, default=0) for m in matches]
    return {"copy_rate": copied / ngrams if ngrams else 0.0, "ngrams": ngrams,
            "longest_max": max(longest, default=0),
            "longest_p95": float(np.percentile(longest, 95)) if longest else 0.0}


# --- Diversity and length -------------------------------------------------------------------

def distinct_n(texts: list[list[str]], n: int) -> float:
    """Unique word n-grams / all word n-grams, pooled over the texts."""
    grams = [tuple(t[i:i + n]) for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def compression_ratio(texts: list[str]) -> float:
    """Raw bytes / zlib bytes of the texts joined: higher means more repetitive."""
    raw = "\n".join(texts).encode("utf-8")
    return len(raw) / len(zlib.compress(raw, 9)) if raw else 0.0


def diversity(texts: list[str]) -> dict:
    tokens = [words(t) for t in texts]
    return {"distinct_1": distinct_n(tokens, 1), "distinct_2": distinct_n(tokens, 2),
            "distinct_3": distinct_n(tokens, 3), "compression_ratio": compression_ratio(texts)}


def length_summary(texts: list[str]) -> dict:
    counts = np.array([len(words(t)) for t in texts], dtype=float)
    if not len(counts):
        return {"count": 0}
    p10, median, p90 = np.percentile(counts, [10, 50, 90])
    return {"count": len(counts), "mean": float(counts.mean()), "median": float(median),
            "p10": float(p10), "p90": float(p90), "words": [int(c) for c in counts]}


# --- Author verification --------------------------------------------------------------------

def author_verifier(author_texts: list[str], other_texts: list[str], seed: int = 0):
    """A classifier (char 3-5-grams + function-word rates) that says 1 for the author."""
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union
    from sklearn.preprocessing import Normalizer

    features = make_union(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, min_df=2, max_features=50000),
        make_pipeline(CountVectorizer(vocabulary=sorted(set(FUNCTION_WORDS)), token_pattern=WORD.pattern),
                      Normalizer(norm="l1")),
    )
    model = make_pipeline(features, LogisticRegression(C=10.0, class_weight="balanced", max_iter=2000,
                                                       random_state=seed))
    labels = [1] * len(author_texts) + [0] * len(other_texts)
    return model.fit(author_texts + other_texts, labels)


def accepted_share(verifier, texts: list[str]) -> float | None:
    return float(np.mean(verifier.predict(texts))) if texts else None
