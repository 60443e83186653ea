"""Choose training defaults by measurement: train and evaluate configurations with pastiche itself.

Every configuration runs through pastiche's own pipeline (prepare -> train -> export -> evaluate)
on each corpus with the embedded base on CPU, and is scored by `pastiche evaluate`'s figures on
the test split (samples drawn through llama.cpp with the exported adapter, as `pastiche run`
does). Rows go to benchmarks/results/sweep-BUDGET.csv and .md (one per configuration and corpus,
with wall time), followed by each corpus's ranking and the defaults-vs-original comparison.

A configuration is eligible when its samples copy no more than the author's own test pieces do
and at least 95% of them stop by EOS; eligible ones rank by held-out perplexity ratio (tuned /
base, lower is better), then by Cosine Delta gap (higher is better).

    python benchmarks/sweep.py --budget small      # 3 configurations x 3 corpora, under an hour
    python benchmarks/sweep.py --budget full       # every configuration, full epochs (hours)

Configurations that only change sampling (an ``evaluate`` section alone) reuse the trained run of
``defaults`` and cost one evaluation.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
import time
from pathlib import Path

from pastiche.config import (
    EvaluateConfig,
    ExportConfig,
    PrepareConfig,
    TrainConfig,
    build,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpora"
BUNDLED = Path(__file__).resolve().parents[1] / "pastiche" / "data" / "infinite_cities.csv"
# Test fractions that give each corpus's test split the ~2,500 words Cosine Delta needs.
CORPORA = {
    "aesop_jones": (SHARED / "aesop_jones" / "pieces.jsonl", 0.1),
    "gibran_prophet": (SHARED / "gibran_prophet" / "pieces.jsonl", 0.25),
    "infinite_cities": (BUNDLED, 0.2),
}

# The original write-up's hyperparameters, run through the same pipeline.
ORIGINAL = {"train": {"lora_r": 4, "lora_alpha": 16, "lora_dropout": 0.1,
                      "target_modules": ["q_proj", "v_proj"], "learning_rate": 5e-5, "epochs": 3}}
CONFIGS: dict[str, dict] = {
    "original": ORIGINAL,
    "defaults": {},
    "lr2e-4": {"train": {"learning_rate": 2e-4}},
    "lr1e-3": {"train": {"learning_rate": 1e-3}},
    "lr1e-4": {"train": {"learning_rate": 1e-4}},
    "r8-a16": {"train": {"lora_r": 8, "lora_alpha": 16}},
    "r32-a64": {"train": {"lora_r": 32, "lora_alpha": 64}},
    "attention-only": {"train": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
    "constant-lr": {"train": {"lr_scheduler": "constant_with_warmup"}},
    "5-epochs": {"train": {"epochs": 5}},
    "titled-only": {"prepare": {"continuation": False}},
    "sampling-t0.7": {"evaluate": {"temperature": 0.7, "repetition_penalty": 1.05}},
    "sampling-t1.0": {"evaluate": {"temperature": 1.0, "top_p": 0.9}},
}
BUDGETS = {
    "small": {"configs": ["original", "defaults", "lr2e-4"], "max_steps": 40,
              "max_new_tokens": 320},
    "full": {"configs": list(CONFIGS), "max_steps": None, "max_new_tokens": 400},
}
COLUMNS = ["corpus", "config", "steps", "best_eval_loss", "ppl_base", "ppl_tuned", "ppl_ratio", "delta_gap",
           "gap_low", "gap_high", "verifier_tuned", "verifier_test", "copy_rate", "author_copy_rate", "eos_share",
           "eligible", "train_s", "wall_s"]


def prepared(corpus: str, options: dict, work: Path) -> Path:
    source, test_fraction = CORPORA[corpus]
    key = "-".join(f"{k}={v}" for k, v in sorted(options.items())) or "default"
    data = work / "data" / f"{corpus}-{key}"
    if not data.exists():
        from pastiche.prepare import prepare

        prepare(build(PrepareConfig, {"test_fraction": test_fraction}, options,
                      {"source": str(source), "out": str(data)}))
    return data


def trained(corpus: str, name: str, options: dict, data: Path, work: Path, max_steps: int | None) -> Path:
    """The run folder for these training options (trained once, exported for llama.cpp sampling)."""
    from pastiche.export import export
    from pastiche.train import train

    train_opts = {**options.get("train", {}), "data": str(data), "runs_dir": str(work / "runs"),
                  "name": f"{corpus}-{name}"}
    if max_steps:  # evaluate (and keep the best adapter) twice within the shortened run
        train_opts.update(max_steps=max_steps, eval_steps=max_steps // 2, save_steps=max_steps // 2)
    run = train(build(TrainConfig, train_opts))
    exported = export(build(ExportConfig, {"run": str(run), "verify": False}))
    for big in ("merged.gguf", "merged"):  # not needed for sampling; 270 MB each
        target = exported / big
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    return run


def one_run(corpus: str, name: str, work: Path, budget: dict, runs: dict) -> dict:
    from pastiche.evaluate import evaluate

    options = CONFIGS[name]
    start = time.monotonic()
    train_key = json.dumps({k: options.get(k, {}) for k in ("prepare", "train")}, sort_keys=True)
    if (corpus, train_key) not in runs:
        data = prepared(corpus, options.get("prepare", {}), work)
        runs[corpus, train_key] = trained(corpus, name, options, data, work, budget["max_steps"])
    run = runs[corpus, train_key]
    train_s = time.monotonic() - start
    eval_opts = {"max_new_tokens": budget["max_new_tokens"], **options.get("evaluate", {}),
                 "run": str(run), "out": str(work / "eval" / f"{corpus}-{name}")}
    report = json.loads((evaluate(build(EvaluateConfig, eval_opts)) / "report.json").read_text())
    state = json.loads((run / "state.json").read_text())
    return row(corpus, name, report, state, train_s, time.monotonic() - start)


def row(corpus: str, name: str, report: dict, state: dict, train_s: float, wall: float) -> dict:
    def get(*keys):
        value = report
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    ppl_base, ppl_tuned = get("perplexity", "base_test"), get("perplexity", "tuned_test")
    copy, author_copy = get("copying", "tuned", "copy_rate"), get("copying", "test", "copy_rate")
    eos = get("stopping", "tuned_eos_share")
    eligible = None not in (copy, author_copy, eos) and copy <= author_copy and eos >= 0.95
    return {"corpus": corpus, "config": name, "steps": state.get("global_step"),
            "best_eval_loss": state.get("best_eval_loss"), "ppl_base": ppl_base, "ppl_tuned": ppl_tuned,
            "ppl_ratio": ppl_tuned / ppl_base if ppl_base and ppl_tuned else None,
            "delta_gap": get("delta", "gap"), "gap_low": get("delta", "gap_low"), "gap_high": get("delta", "gap_high"),
            "verifier_tuned": get("verifier", "tuned"), "verifier_test": get("verifier", "test"),
            "copy_rate": copy, "author_copy_rate": author_copy, "eos_share": eos, "eligible": eligible,
            "train_s": round(train_s), "wall_s": round(wall)}


def fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("-" if value is None else str(value))


def ranking(rows: list[dict]) -> list[str]:
    """Per corpus: eligible configurations by perplexity ratio, then Delta gap; defaults vs original."""
    lines = []
    for corpus in dict.fromkeys(r["corpus"] for r in rows):
        mine = [r for r in rows if r["corpus"] == corpus]
        ranked = sorted((r for r in mine if r["eligible"] and r["ppl_ratio"] is not None),
                        key=lambda r: (r["ppl_ratio"], -(r["delta_gap"] or -1e9)))
        lines.append(f"- {corpus}: eligible by perplexity ratio: "
                     + (", ".join(f"{r['config']} ({fmt(r['ppl_ratio'])}, gap {fmt(r['delta_gap'])})" for r in ranked)
                        or "none"))
        by_name = {r["config"]: r for r in mine}
        if "defaults" in by_name and "original" in by_name:
            d, o = by_name["defaults"], by_name["original"]
            better_ppl = None not in (d["ppl_ratio"], o["ppl_ratio"]) and d["ppl_ratio"] < o["ppl_ratio"]
            better_gap = None not in (d["delta_gap"], o["delta_gap"]) and d["delta_gap"] > o["delta_gap"]
            lines.append(f"  defaults vs original: perplexity ratio {fmt(d['ppl_ratio'])} vs {fmt(o['ppl_ratio'])} "
                         f"({'better' if better_ppl else 'NOT better'}), Delta gap {fmt(d['delta_gap'])} vs "
                         f"{fmt(o['delta_gap'])} ({'better' if better_gap else 'NOT better'}), copy rate "
                         f"{fmt(d['copy_rate'])} (author {fmt(d['author_copy_rate'])})")
    return lines


def write_tables(rows: list[dict], out: Path, stem: str, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{stem}.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join([*lines, "", *ranking(rows)]) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--corpora", nargs="+", choices=list(CORPORA), default=list(CORPORA))
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="Override the budget's configurations.")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--work", default=None, help="Folder for prepared data and runs (default: a temp folder).")
    args = parser.parse_args()
    budget = dict(BUDGETS[args.budget])
    if args.configs:
        budget["configs"] = args.configs
    work = Path(args.work or tempfile.mkdtemp(prefix="pastiche-sweep-"))
    header = (f"# pastiche sweep: `python benchmarks/sweep.py --budget {args.budget}`"
              + (f" --configs {' '.join(args.configs)}" if args.configs else "")
              + f"\n\nmax steps per run: {budget['max_steps'] or 'none (full epochs)'}; evaluation samples of at most "
              f"{budget['max_new_tokens']} tokens; embedded SmolLM2-135M-Instruct on CPU.")
    rows, runs = [], {}
    started = time.monotonic()
    for corpus in args.corpora:
        for name in budget["configs"]:
            rows.append(one_run(corpus, name, work, budget, runs))
            print("sweep: " + json.dumps(rows[-1]), flush=True)
            write_tables(rows, Path(args.out), f"sweep-{args.budget}", header)
    print("\n".join(ranking(rows)))
    print(f"wrote {args.out}/sweep-{args.budget}.csv and .md ({len(rows)} rows in {time.monotonic() - started:.0f} s; "
          f"work folder {work})")


if __name__ == "__main__":
    main()
