"""Does the tuned model write like the author, on text it never saw, without copying?

On the test split of the run's prepared data, with the base model as the control and the
author's own test pieces as the ceiling, and the same prompts, seeds and decoding for base and
tuned: held-out perplexity, Cosine Delta, copying, diversity, length and stopping, and an author
verifier. Writes RUN/eval/report.json, report.md and a self-contained report.html.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from pastiche import chat, paths, style
from pastiche.config import EvaluateConfig, to_dict
from pastiche.errors import PasticheError

TRAIN_PPL_RECORDS = 64  # train-split perplexity on a fixed random subset: it only has to show overfitting
COPY_FLAG_RATIO = 2.0  # flag samples that copy more than twice the author's own overlap with training text
COPY_FLAG_FLOOR = 0.01  # ...and more than 1% of their 8-grams (an author with no overlap flags any copy)
SEED_STRIDE = 100_003  # each extra sampling round of the test prompts starts its seeds this far on


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_splits(run: Path) -> tuple[Path, dict[str, list[dict]]]:
    """The prepared data folder named in the run's config.yaml, and its three splits."""
    import yaml

    for name in (paths.BASE_JSON, paths.CONFIG_YAML):
        if not (run / name).is_file():
            raise PasticheError(f"run: {run} has no {name}; expected a run folder written by `pastiche train`.")
    if not (run / paths.ADAPTER_DIR / "adapter_config.json").is_file():
        raise PasticheError(f"run: {run} has no {paths.ADAPTER_DIR}/adapter_config.json; "
                            "expected a run folder written by `pastiche train` that finished.")
    data = Path(str((yaml.safe_load((run / paths.CONFIG_YAML).read_text(encoding="utf-8")) or {}).get("data", "")))
    splits = {}
    for split, name in paths.SPLIT_FILES.items():
        file = data / name
        splits[split] = read_jsonl(file) if file.is_file() else []
    if not splits["test"]:
        raise PasticheError(f"{data / paths.TEST_JSONL} is missing or empty: the prepared data has no test split; "
                            "prepare it again with --test-fraction above 0.")
    if not splits["train"]:
        raise PasticheError(f"{data / paths.TRAIN_JSONL} is missing or empty; expected a `pastiche prepare` folder.")
    return data, splits


def piece_texts(records: list[dict]) -> list[str]:
    """The author's text per piece: its title-task chunks in order (continuations repeat them)."""
    by_piece: dict[str, list[dict]] = {}
    for record in records:
        by_piece.setdefault(record["piece"], []).append(record)
    texts = []
    for chunks in by_piece.values():
        titled = [r for r in chunks if r.get("task") == "title"] or chunks
        texts.append("\n\n".join(r["completion"] for r in sorted(titled, key=lambda r: r["id"])))
    return texts


def requests_for(records: list[dict]) -> list[list[dict]]:
    """One request per test prompt: title prompts when there are any (one per piece chunk)."""
    chosen = [r for r in records if r.get("task") == "title"] or records
    return [chat.messages_for(r["prompt"], r.get("system")) for r in chosen]


def perplexity(generator, tokenizer, records: list[dict]) -> dict:
    pairs = [chat.encode_record(tokenizer, r["prompt"], r["completion"], r.get("system")) for r in records]
    scored = generator.completion_nll(pairs)
    nll, tokens = sum(s for s, _ in scored), sum(n for _, n in scored)
    return {"perplexity": math.exp(nll / tokens), "tokens": tokens, "records": len(records)}


def perplexities(tuned, base, splits: dict[str, list[dict]], seed: int) -> dict:
    train = splits["train"]
    if len(train) > TRAIN_PPL_RECORDS:
        train = random.Random(seed).sample(train, TRAIN_PPL_RECORDS)
    print(f"pastiche evaluate: perplexity of {len(splits['test'])} test and {len(train)} train records, "
          "base and tuned", flush=True)
    out = {}
    for split, records in (("test", splits["test"]), ("train", train)):
        for name, generator in (("base", base), ("tuned", tuned)):
            measured = perplexity(generator, tuned.tokenizer, records)
            out[f"{name}_{split}"] = measured["perplexity"]
        out[f"{split}_tokens"], out[f"{split}_records"] = measured["tokens"], measured["records"]
    return out


def sample_all(tuned, base, requests: list[list[dict]], negatives: list[list[dict]], cfg: EvaluateConfig,
               top_up: bool = True) -> dict:
    """Tuned and base samples for the test prompts (same seeds), base samples for train prompts.

    The test prompts are sampled ``samples_per_prompt`` times, then again (new seeds) for the
    tuned or base bag while it is short of ``min_words`` for Cosine Delta, up to
    ``max_samples_per_prompt`` rounds: a base model that answers briefly still gets a full bag.
    Round k uses the same seeds for tuned and base, so their first samples stay paired.
    No extra rounds when ``top_up`` is false (the test pieces are too short for Delta anyway).
    """
    from pastiche.generate import SamplingParams

    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty,
                            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    out = {"tuned": [], "base": [], "base_other": [], "requests": []}
    timing = {name: {"samples": 0, "tokens": 0, "seconds": 0.0} for name in out if name != "requests"}

    def draw(name: str, generator, batch: list[list[dict]], seed: int) -> None:
        start = time.perf_counter()
        print(f"pastiche evaluate: sampling {len(batch)} {name} pieces with {generator.name}", flush=True)
        out[name] += generator.generate_batch(batch, replace(params, seed=seed))
        timing[name]["seconds"] += time.perf_counter() - start
        timing[name]["samples"] = len(out[name])
        timing[name]["tokens"] = sum(c.completion_tokens for c in out[name])

    def words(name: str) -> int:
        return sum(len(style.words(c.text)) for c in out[name])

    rounds, per_round = 0, cfg.samples_per_prompt

    def short() -> bool:
        return top_up and rounds < cfg.max_samples_per_prompt and min(words("tuned"), words("base")) < cfg.min_words

    while rounds == 0 or short():
        per_round = min(per_round, cfg.max_samples_per_prompt - rounds)
        batch = [m for m in requests for _ in range(per_round)]
        seed = cfg.seed + rounds * SEED_STRIDE
        for name, generator in (("tuned", tuned), ("base", base)):
            if rounds == 0 or words(name) < cfg.min_words:  # only a short bag is sampled again
                draw(name, generator, batch, seed)
        out["requests"] += batch
        rounds, per_round = rounds + per_round, 1
        if short():
            print(f"pastiche evaluate: {words('tuned'):,} tuned and {words('base'):,} base words so far; "
                  f"Cosine Delta needs {cfg.min_words:,} each, sampling the test prompts again", flush=True)
    draw("base_other", base, negatives[:len(out["base"])], cfg.seed)
    for entry in timing.values():
        entry["tokens_per_s"] = entry["tokens"] / entry["seconds"] if entry["seconds"] else 0.0
    out["timing"] = timing
    out["params"] = {k: getattr(params, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty",
                                                     "max_new_tokens", "seed")}
    out["samples_per_prompt"] = rounds
    return out


def delta_section(texts: dict[str, list[str]], cfg: EvaluateConfig) -> dict:
    """Cosine Delta of tuned, base and train bags to the test pieces, or why it was not measured."""
    docs = {name: [style.words(t) for t in group] for name, group in texts.items()}
    counts = {name: sum(map(len, group)) for name, group in docs.items()}
    section = {"mfw": cfg.mfw, "drop_pronouns": cfg.drop_pronouns, "min_words": cfg.min_words, "words": counts}
    short = [name for name in ("test", "tuned", "base") if counts[name] < cfg.min_words]
    if short:
        reason = "; ".join(f"{name} has {counts[name]} words" for name in short)
        remedy = ("a larger --test-fraction in `pastiche prepare`" if "test" in short
                  else "more samples with --max-samples-per-prompt")
        return {**section, "measured": False,
                "reason": f"not measured: Cosine Delta needs at least {cfg.min_words} words per bag ({reason}); "
                          f"give it {remedy}."}
    basis = style.delta_basis(docs["train"], cfg.mfw, cfg.drop_pronouns, contrast_docs=docs["base_other"])
    bags = {name: docs[name] for name in ("tuned", "base", "train")}
    result = style.delta_report(bags, docs["test"], basis, cfg.bootstrap, cfg.seed)
    gap = result.pop("gap")
    return {**section, "measured": True, "reason": None, "mfw_used": len(basis.mfw), **result,
            "gap": gap["gap"], "gap_low": gap["low"], "gap_high": gap["high"]}


def copying_section(texts: dict[str, list[str]], train_texts: list[str]) -> tuple[dict, style.SharedRuns]:
    runs = style.SharedRuns([style.words(t) for t in train_texts])
    section = {name: style.copy_report([style.words(t) for t in texts[name]], runs) for name in ("tuned", "base", "test")}
    limit = max(COPY_FLAG_RATIO * section["test"]["copy_rate"], COPY_FLAG_FLOOR)
    section.update(ngram=style.COPY_NGRAM, flag_above=limit, flagged=section["tuned"]["copy_rate"] > limit)
    return section, runs


def verifier_section(train_texts: list[str], texts: dict[str, list[str]], seed: int) -> dict:
    if not texts["base_other"]:
        return {"measured": False, "reason": "no train prompts left for the verifier's base-model examples."}
    verifier = style.author_verifier(train_texts, texts["base_other"], seed)
    return {"measured": True, "trained_on": {"author": len(train_texts), "base_other": len(texts["base_other"])},
            "tuned": style.accepted_share(verifier, texts["tuned"]),
            "test": style.accepted_share(verifier, texts["test"]),
            "base_heldout": style.accepted_share(verifier, texts["base"])}


def build_report(cfg: EvaluateConfig, run: Path, data: Path, splits: dict, sampled: dict, ppl: dict) -> tuple[dict, dict]:
    texts = {"tuned": [c.text for c in sampled["tuned"]], "base": [c.text for c in sampled["base"]],
             "base_other": [c.text for c in sampled["base_other"]],
             "test": piece_texts(splits["test"]), "train": piece_texts(splits["train"])}
    copying, runs = copying_section(texts, texts["train"])
    report = {
        "run": str(run.resolve()), "data": str(data.resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": to_dict(cfg),
        "sampling": {"backend": sampled["backend"], "params": sampled["params"],
                     "samples_per_prompt": sampled["samples_per_prompt"], **sampled["timing"]},
        "perplexity": ppl,
        "delta": delta_section({k: texts[k] for k in ("tuned", "base", "test", "train", "base_other")}, cfg),
        "copying": copying,
        "diversity": {name: style.diversity(texts[name]) for name in ("tuned", "base", "test")},
        "length": {name: style.length_summary(texts[name]) for name in ("tuned", "base", "test")},
        "stopping": {f"{name}_eos_share": sum(c.finish_reason == "stop" for c in sampled[name]) / len(sampled[name])
                     for name in ("tuned", "base")},
        "verifier": verifier_section(texts["train"], texts, cfg.seed),
    }
    report["samples"] = [{"prompt": m[-1]["content"], "tuned": t.text, "base": b.text,
                          "tuned_finish": t.finish_reason, "base_finish": b.finish_reason,
                          "tuned_copied": style.copied_mask(runs.match_lengths(style.words(t.text)))}
                         for m, t, b in zip(sampled["requests"], sampled["tuned"], sampled["base"])]
    return report, texts


def evaluate(cfg: EvaluateConfig) -> Path:
    """Write the report folder for ``cfg.run``; return its path."""
    from pastiche import report as render
    from pastiche.generate import load_generator

    run = Path(cfg.run)
    data, splits = load_splits(run)
    out = Path(cfg.out) if cfg.out else run / paths.EVAL_DIR
    tuned = load_generator(run, "torch")
    base = tuned.variant(False)
    ppl = perplexities(tuned, base, splits, cfg.seed)
    requests = requests_for(splits["test"])
    negatives = requests_for(splits["train"])
    negatives = random.Random(cfg.seed).sample(negatives, min(len(negatives), len(requests) * cfg.max_samples_per_prompt))
    backend = cfg.backend
    if backend == "auto":  # once exported, sample what users will run, with the faster CPU engine
        backend = "llama.cpp" if (run / paths.EXPORT_DIR / paths.EXPORT_JSON).is_file() else "torch"
    if backend == "llama.cpp":
        tuned = load_generator(run, "llama.cpp")
        base = tuned.variant(False)
    test_words = sum(len(style.words(t)) for t in piece_texts(splits["test"]))
    sampled = sample_all(tuned, base, requests, negatives, cfg, top_up=test_words >= cfg.min_words)
    sampled["backend"] = backend
    report, _ = build_report(cfg, run, data, splits, sampled, ppl)
    with paths.atomic_dir(out, force=True) as tmp:
        (tmp / paths.REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
        (tmp / paths.REPORT_MD).write_text(render.markdown(report), encoding="utf-8")
        (tmp / paths.REPORT_HTML).write_text(render.html(report, run / paths.METRICS_JSONL), encoding="utf-8")
    print(render.summary(report, out), flush=True)
    return out


def main(cfg: EvaluateConfig) -> int:
    evaluate(cfg)
    return 0


def _last_metric(metrics_file: Path, key: str) -> float | None:
    if not metrics_file.is_file():
        return None
    values = [json.loads(line).get(key) for line in metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    values = [v for v in values if isinstance(v, (int, float))]
    return min(values) if key == "eval_loss" and values else (values[-1] if values else None)


def list_runs(runs_dir: str | Path) -> int:
    """Print one line per run folder: status, best eval loss, and the evaluation's key numbers."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise PasticheError(f"runs_dir: {runs_dir} is not a folder of runs.")
    runs = sorted(p for p in runs_dir.iterdir() if (p / paths.BASE_JSON).is_file() or (p / paths.STATE_JSON).is_file())
    header = ("run", "status", "best eval loss", "ppl base", "ppl tuned", "Delta gap", "copy rate", "EOS share")
    rows = [header]
    for run in runs:
        state = _json_or_empty(run / paths.STATE_JSON)
        report = _json_or_empty(run / paths.EVAL_DIR / paths.REPORT_JSON)
        ppl, delta = report.get("perplexity", {}), report.get("delta", {})
        rows.append((run.name, state.get("status", "?"), _cell(_last_metric(run / paths.METRICS_JSONL, "eval_loss")),
                     _cell(ppl.get("base_test")), _cell(ppl.get("tuned_test")),
                     _cell(delta.get("gap")) if delta.get("measured") else ("-" if not report else "not measured"),
                     _cell(report.get("copying", {}).get("tuned", {}).get("copy_rate")),
                     _cell(report.get("stopping", {}).get("tuned_eos_share"))))
    if len(rows) == 1:
        print(f"no runs in {runs_dir}")
        return 0
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _json_or_empty(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"
