"""`pastiche evaluate` on real authors: train with the defaults, then check what the report shows.

    python benchmarks/evaluate_acceptance.py [--work DIR] [--gibran-steps 20] [--aesop-report REPORT]

1. aesop_jones: `pastiche prepare` (default fractions), `pastiche train` (every default),
   `pastiche export`, `pastiche evaluate`; then the checks: tuned test perplexity below the
   base's, at least 90% of tuned samples stop by EOS, copy rate no more than twice the author's
   own, and the Delta gap with its interval.
2. gibran_prophet: its default test split is too small for Cosine Delta; the report must say
   "not measured" and how many words it needs (a short training run is enough for that).

``--aesop-report`` checks the report.json of an aesop run trained with the defaults elsewhere
(e.g. by `benchmarks/sweep.py --budget full`) instead of training one here.

Each check prints PASS or FAIL; the exit code is the number of failures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pastiche.cli import main as cli

SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpora"


def stage(*args: str) -> None:
    started = time.monotonic()
    code = cli(list(args))
    print(f"== pastiche {args[0]}: exit {code} in {time.monotonic() - started:.0f} s", flush=True)
    if code != 0:
        raise SystemExit(f"pastiche {args[0]} failed with exit {code}")


def check(label: str, ok: bool, detail: str) -> int:
    print(f"{'PASS' if ok else 'FAIL'}  {label}: {detail}", flush=True)
    return 0 if ok else 1


def aesop(work: Path, report_file: Path | None) -> int:
    if report_file is None:
        data, runs = work / "aesop", work / "runs"
        stage("prepare", str(SHARED / "aesop_jones" / "pieces.jsonl"), "--out", str(data))
        stage("train", str(data), "--runs-dir", str(runs), "--name", "aesop")
        run = runs / "aesop-01"
        stage("export", str(run))
        stage("evaluate", str(run))
        report_file = run / "eval" / "report.json"
    report = json.loads(report_file.read_text())
    state = json.loads((Path(report["run"]) / "state.json").read_text())
    print(f"aesop run {report['run']}: {state['global_step']} steps, best eval loss {state['best_eval_loss']:.4f} "
          f"at step {state['best_step']}; report {report_file}")
    ppl, copy, delta = report["perplexity"], report["copying"], report["delta"]
    eos = report["stopping"]["tuned_eos_share"]
    limit = 2 * copy["test"]["copy_rate"]  # the report itself flags above max(this, a 1% floor)
    failures = check("tuned test perplexity below base", ppl["tuned_test"] < ppl["base_test"],
                     f"base {ppl['base_test']:.2f} -> tuned {ppl['tuned_test']:.2f}")
    failures += check("at least 90% of tuned samples stop by EOS", eos >= 0.9,
                      f"{eos:.1%} of {report['sampling']['tuned']['samples']}")
    failures += check("copy rate at most twice the author's", copy["tuned"]["copy_rate"] <= limit,
                      f"tuned {copy['tuned']['copy_rate']:.4f}, author {copy['test']['copy_rate']:.4f}, "
                      f"limit {limit:.4f}; longest shared run {copy['tuned']['longest_max']} words "
                      f"(author {copy['test']['longest_max']})")
    failures += check("Delta gap printed with its interval", bool(delta["measured"]),
                      f"{delta['gap']:.3f} ({delta['gap_low']:.3f} .. {delta['gap_high']:.3f}); D tuned "
                      f"{delta['tuned']['delta']:.3f}, base {delta['base']['delta']:.3f}, author's self "
                      f"{delta['train']['delta']:.3f}" if delta["measured"] else delta["reason"])
    verifier = report["verifier"]
    if verifier["measured"]:
        print(f"      verifier accepts tuned {verifier['tuned']:.0%}, test pieces {verifier['test']:.0%}, "
              f"base {verifier['base_heldout']:.0%}")
    return failures


def gibran(work: Path, steps: int) -> int:
    data, runs = work / "gibran", work / "runs"
    stage("prepare", str(SHARED / "gibran_prophet" / "pieces.jsonl"), "--out", str(data))
    stage("train", str(data), "--runs-dir", str(runs), "--name", "gibran", "--max-steps", str(steps))
    run = runs / "gibran-01"
    stage("evaluate", str(run))
    delta = json.loads((run / "eval" / "report.json").read_text())["delta"]
    return check("gibran: Delta marked not measured, with the words it needs",
                 delta["measured"] is False and "needs at least" in delta["reason"], delta["reason"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="Folder for data and runs (default: a new temp folder).")
    parser.add_argument("--gibran-steps", type=int, default=20)
    parser.add_argument("--aesop-report", type=Path, default=None, help="report.json of an aesop run trained with the defaults.")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="pastiche-acceptance-"))
    failures = aesop(work, args.aesop_report) + gibran(work, args.gibran_steps)
    print(f"{failures} check(s) failed; work folder {work}")
    raise SystemExit(failures)


if __name__ == "__main__":
    main()
