"""Choose training defaults by measurement: train and evaluate configurations with pastiche itself.

Every configuration runs through pastiche's own pipeline (prepare -> train -> evaluate) on each
corpus with the embedded base on CPU, and is scored by `pastiche evaluate`'s figures on the test
split. Rows go to benchmarks/results/sweep.csv and sweep.md (one per configuration and corpus,
with wall time). A configuration is eligible when its samples copy no more than the author's own
test pieces do and at least 95% of them stop by EOS; eligible ones rank by perplexity ratio
(tuned/base, lower is better) and Cosine Delta gap (higher is better).

    python benchmarks/sweep.py --budget small      # 3 configurations x 2 corpora, under an hour
    python benchmarks/sweep.py --budget full       # every configuration below
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

from pastiche.config import EvaluateConfig, PrepareConfig, TrainConfig, build

SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpora"
CORPORA = {
    "aesop_jones": SHARED / "aesop_jones" / "pieces.jsonl",
    "gibran_prophet": SHARED / "gibran_prophet" / "pieces.jsonl",
}
BUNDLED = Path(__file__).resolve().parents[1] / "pastiche" / "data" / "infinite_cities.csv"

# The original write-up's hyperparameters, run through the same pipeline.
ORIGINAL = {"train": {"lora_r": 4, "lora_alpha": 16, "lora_dropout": 0.1,
                      "target_modules": ["q_proj", "v_proj"], "learning_rate": 5e-5, "epochs": 3}}
CONFIGS: dict[str, dict] = {
    "original": ORIGINAL,
    "defaults": {},
    "r8-all-lr2e-4": {"train": {"lora_r": 8, "lora_alpha": 16}},
    "r16-attn-lr2e-4": {"train": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
    "r16-all-lr5e-4": {"train": {"learning_rate": 5e-4}},
    "r16-all-lr1e-4": {"train": {"learning_rate": 1e-4}},
    "r32-all-a64": {"train": {"lora_r": 32, "lora_alpha": 64}},
    "titled-only": {"prepare": {"continuation": False}},
    "defaults-5ep": {"train": {"epochs": 5}},
    "sampling-t0.7": {"evaluate": {"temperature": 0.7, "repetition_penalty": 1.05}},
    "sampling-t1.0": {"evaluate": {"temperature": 1.0, "top_p": 0.9}},
}
BUDGETS = {
    "small": {"configs": ["original", "defaults", "r16-all-lr5e-4"], "max_steps": 120},
    "full": {"configs": list(CONFIGS), "max_steps": None},
}
COLUMNS = ["corpus", "config", "ppl_base", "ppl_tuned", "ppl_ratio", "delta_gap", "gap_low", "gap_high",
           "verifier_tuned", "copy_rate", "author_copy_rate", "eos_share", "eligible", "wall_s"]


def one_run(corpus: str, source: Path, name: str, options: dict, work: Path, max_steps: int | None) -> dict:
    from pastiche.evaluate import evaluate
    from pastiche.prepare import prepare
    from pastiche.train import train

    start = time.monotonic()
    prep_opts = options.get("prepare", {})
    data = work / "data" / f"{corpus}-{json.dumps(prep_opts, sort_keys=True).__hash__() & 0xffff:04x}"
    if not data.exists():
        prepare(build(PrepareConfig, {"test_fraction": 0.15}, prep_opts, {"source": str(source), "out": str(data)}))
    train_opts = {**options.get("train", {}), "data": str(data), "runs_dir": str(work / "runs"), "name": f"{corpus}-{name}"}
    if max_steps:
        train_opts["max_steps"] = max_steps
    run_dir = train(build(TrainConfig, train_opts))
    report_path = evaluate(build(EvaluateConfig, options.get("evaluate", {}), {"run": str(run_dir)}))
    report = json.loads(Path(report_path).read_text()) if Path(report_path).is_file() else {}
    return row(corpus, name, report, time.monotonic() - start)


def row(corpus: str, name: str, report: dict, wall: float) -> dict:
    def get(*keys, default=None):
        value = report
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return default if value is None else value

    ppl_base, ppl_tuned = get("perplexity", "base_test"), get("perplexity", "tuned_test")
    copy, author_copy = get("copying", "tuned", "copy_rate"), get("copying", "test", "copy_rate")
    eos = get("stopping", "tuned_eos_share")
    eligible = None not in (copy, author_copy, eos) and copy <= max(author_copy, 1e-9) and eos >= 0.95
    return {"corpus": corpus, "config": name, "ppl_base": ppl_base, "ppl_tuned": ppl_tuned,
            "ppl_ratio": ppl_tuned / ppl_base if ppl_base and ppl_tuned else None,
            "delta_gap": get("delta", "gap"), "gap_low": get("delta", "gap_low"), "gap_high": get("delta", "gap_high"),
            "verifier_tuned": get("verifier", "tuned_accepted"), "copy_rate": copy, "author_copy_rate": author_copy,
            "eos_share": eos, "eligible": eligible, "wall_s": round(wall)}


def write_tables(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "sweep.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--corpora", nargs="+", default=[*CORPORA, "infinite_cities"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--work", default=None, help="Folder for prepared data and runs (default: a temp folder).")
    args = parser.parse_args()
    budget = BUDGETS[args.budget]
    sources = {**CORPORA, "infinite_cities": BUNDLED}
    work = Path(args.work or tempfile.mkdtemp(prefix="pastiche-sweep-"))
    rows = []
    for corpus in args.corpora:
        for name in budget["configs"]:
            rows.append(one_run(corpus, sources[corpus], name, CONFIGS[name], work, budget["max_steps"]))
            print(json.dumps(rows[-1]), flush=True)
            write_tables(rows, Path(args.out))
    print(f"wrote {args.out}/sweep.csv and sweep.md ({len(rows)} rows; work folder {work})")


if __name__ == "__main__":
    main()
