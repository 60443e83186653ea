"""evaluate.py: the report on a tiny trained run, bad input, and `pastiche runs`."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from pastiche import paths
from pastiche.cli import main
from pastiche.report import fmt

FAST = ["--max-new-tokens", "16", "--bootstrap", "20"]


@pytest.fixture(scope="module")
def evaluated(tiny_run):
    assert main(["evaluate", str(tiny_run), "--min-words", "20", "--mfw", "20", *FAST]) == 0
    return tiny_run / paths.EVAL_DIR


def test_report_files_and_numbers(evaluated, tiny_run):
    assert sorted(p.name for p in evaluated.iterdir()) == [paths.REPORT_HTML, paths.REPORT_JSON, paths.REPORT_MD]
    report = json.loads((evaluated / paths.REPORT_JSON).read_text())
    test_records = [json.loads(line) for line in (report_data(report) / paths.TEST_JSONL).read_text().splitlines()]
    titled = [r for r in test_records if r["task"] == "title"]
    assert report["sampling"]["tuned"]["samples"] == report["sampling"]["base"]["samples"] == len(titled)
    assert len(report["samples"]) == len(titled)
    assert report["perplexity"]["test_records"] == len(test_records)
    assert report["perplexity"]["tuned_test"] > 1 and report["perplexity"]["base_test"] > 1
    assert report["delta"]["measured"] is True
    for name in ("tuned", "base", "train"):
        assert report["delta"][name]["low"] <= report["delta"][name]["high"]
    assert 0.0 <= report["stopping"]["tuned_eos_share"] <= 1.0
    assert report["copying"]["ngram"] == 8
    assert report["verifier"]["measured"] is True and 0.0 <= report["verifier"]["tuned"] <= 1.0


def report_data(report):
    from pathlib import Path

    return Path(report["data"])


def test_markdown_shows_the_json_numbers(evaluated):
    report = json.loads((evaluated / paths.REPORT_JSON).read_text())
    md = (evaluated / paths.REPORT_MD).read_text()
    ppl, delta, copy = report["perplexity"], report["delta"], report["copying"]
    assert f"| test | {fmt(ppl['base_test'])} | {fmt(ppl['tuned_test'])} | {ppl['test_tokens']} |" in md
    assert f"| train | {fmt(ppl['base_train'])} | {fmt(ppl['tuned_train'])} | {ppl['train_tokens']} |" in md
    assert (f"| gap (D_base - D_tuned) / (D_base - D_self) | {fmt(delta['gap'])} | {fmt(delta['gap_low'])} | "
            f"{fmt(delta['gap_high'])} |") in md
    assert f"| tuned | {fmt(copy['tuned']['copy_rate'])} | {copy['tuned']['longest_max']} |" in md
    assert f"tuned {fmt(report['stopping']['tuned_eos_share'])}, base {fmt(report['stopping']['base_eos_share'])}" in md


def test_html_is_self_contained(evaluated):
    page = (evaluated / paths.REPORT_HTML).read_text()
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 4  # loss, perplexity, Delta, lengths
    assert "http" not in page.replace("https://", "").split("<body>")[0]
    assert page.count("<section class=sample>") == len(json.loads((evaluated / paths.REPORT_JSON).read_text())["samples"])


def test_html_draws_an_interval_that_excludes_its_point(evaluated, tiny_run):
    """A bootstrap percentile interval need not contain the point estimate; the page still renders."""
    from pastiche import report as render

    report = json.loads((evaluated / paths.REPORT_JSON).read_text())
    report["delta"]["tuned"].update(delta=0.5, low=0.6, high=0.7)
    page = render.html(report, tiny_run / paths.METRICS_JSONL)
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 4


def test_too_little_text_is_not_a_failure(tiny_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_run), "--out", str(out), *FAST]) == 0
    delta = json.loads((out / paths.REPORT_JSON).read_text())["delta"]
    assert delta["measured"] is False
    assert delta["reason"].startswith("not measured: Cosine Delta needs at least 2500 words per bag (test has ")
    assert delta["reason"] in (out / paths.REPORT_MD).read_text()
    assert "Delta gap          not measured" in capsys.readouterr().out


def test_short_samples_are_topped_up_for_delta(evaluated, tiny_run, tmp_path, capsys):
    """Tuned and base samples of 2 tokens each never reach the test pieces' word count: the test
    prompts are sampled again, tuned and base alike, until --max-samples-per-prompt."""
    from pastiche import style
    from pastiche.evaluate import piece_texts, read_jsonl

    data = report_data(json.loads((evaluated / paths.REPORT_JSON).read_text()))
    test_records = read_jsonl(data / paths.TEST_JSONL)
    titled = [r for r in test_records if r["task"] == "title"]
    test_words = sum(len(style.words(t)) for t in piece_texts(test_records))
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_run), "--out", str(out), "--min-words", str(test_words), "--max-new-tokens", "2",
                 "--max-samples-per-prompt", "3", "--bootstrap", "20"]) == 0
    report = json.loads((out / paths.REPORT_JSON).read_text())
    assert report["sampling"]["samples_per_prompt"] == 3
    assert report["sampling"]["tuned"]["samples"] == report["sampling"]["base"]["samples"] == 3 * len(titled)
    assert report["sampling"]["base_other"]["samples"] <= 3 * len(titled)
    assert len(report["samples"]) == 3 * len(titled)
    assert report["delta"]["measured"] is False and "(tuned has " in report["delta"]["reason"]
    assert capsys.readouterr().out.count("sampling the test prompts again") == 2


def test_max_samples_below_samples_per_prompt_is_refused(tiny_run, capsys):
    assert main(["evaluate", str(tiny_run), "--samples-per-prompt", "3", "--max-samples-per-prompt", "2"]) == 2
    assert capsys.readouterr().err == ("pastiche evaluate: error: --max-samples-per-prompt must be a number no smaller "
                                       "than --samples-per-prompt (3).\n")


def test_run_without_adapter_exits_2(tiny_run, tmp_path, capsys):
    broken = tmp_path / "broken-01"
    shutil.copytree(tiny_run, broken, ignore=shutil.ignore_patterns(paths.ADAPTER_DIR, paths.EVAL_DIR))
    assert main(["evaluate", str(broken)]) == 2
    assert capsys.readouterr().err == (f"pastiche evaluate: error: run: {broken} has no adapter/adapter_config.json; "
                                       "expected a run folder written by `pastiche train` that finished.\n")


def test_prepared_data_without_test_split_exits_2(tiny_run, tmp_path, capsys):
    import yaml

    data = tmp_path / "data"
    shutil.copytree(yaml.safe_load((tiny_run / paths.CONFIG_YAML).read_text())["data"], data)
    (data / paths.TEST_JSONL).write_text("")
    run = tmp_path / "run-01"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(paths.EVAL_DIR))
    config = yaml.safe_load((run / paths.CONFIG_YAML).read_text())
    (run / paths.CONFIG_YAML).write_text(yaml.safe_dump({**config, "data": str(data)}))
    assert main(["evaluate", str(run)]) == 2
    assert capsys.readouterr().err == (f"pastiche evaluate: error: {data / paths.TEST_JSONL} is missing or empty: "
                                       "the prepared data has no test split; prepare it again with --test-fraction "
                                       "above 0.\n")


def test_runs_table(evaluated, tiny_run, capsys):
    assert main(["runs", str(tiny_run.parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    report = json.loads((evaluated / paths.REPORT_JSON).read_text())
    assert lines[0].split()[:3] == ["run", "status", "best"]
    row = lines[1].split()
    assert row[:2] == [tiny_run.name, "done"]
    assert row[3:5] == [fmt(report["perplexity"]["base_test"]), fmt(report["perplexity"]["tuned_test"])]
    assert main(["runs", str(tiny_run / "nowhere")]) == 2


def test_copied_words_are_marked_in_html():
    from pastiche.report import highlighted

    assert highlighted("The <salt> bell, rang. Then", [True, True, True, False, False]) == \
        "<mark>The &lt;salt&gt; bell</mark>, rang. Then"
    assert highlighted("a b", [False, True]) == "a <mark>b</mark>"
