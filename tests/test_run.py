"""`pastiche run`: the whole road on the real default base, shortened to a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pastiche import paths
from pastiche.cli import main

# Same sections a user writes; small numbers so the real 135M model finishes in CI.
QUICK = {
    "prepare": {"test_fraction": 0.2, "max_tokens": 384},
    "train": {"eval_steps": 2, "save_steps": 2},
    "evaluate": {"samples_per_prompt": 1, "max_new_tokens": 48, "bootstrap": 50},
    "export": {"verify_tokens": 256},
    "generate": {"max_new_tokens": 48},
}


def test_unknown_config_section_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"trian": {"epochs": 1}}))
    assert main(["run", "--config", str(bad), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "pastiche run: error: --config: unknown section 'trian'" in err
    assert not (tmp_path / "w").exists()


def test_missing_source_is_refused(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.csv"), "--workdir", str(tmp_path / "w")]) == 2
    assert f"source: {tmp_path / 'nope.csv'} does not exist." in capsys.readouterr().err


@pytest.mark.slow
def test_run_on_the_embedded_default_writes_every_stage_and_resumes(tmp_path, capsys):
    config = tmp_path / "quick.yaml"
    config.write_text(yaml.safe_dump(QUICK))
    workdir = tmp_path / "work"
    assert main(["run", "--config", str(config), "--max-steps", "2", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out

    run = workdir / "runs" / "infinite-cities-01"
    assert {p.name for p in (workdir / "data").iterdir()} == {"infinite-cities"}
    for name in (paths.CONFIG_YAML, paths.BASE_JSON, paths.METRICS_JSONL, paths.LOSS_PNG, paths.STATE_JSON):
        assert (run / name).is_file(), name
    assert (run / paths.ADAPTER_DIR / "adapter_model.safetensors").is_file()
    export = run / paths.EXPORT_DIR
    for name in (paths.ADAPTER_GGUF, paths.MERGED_GGUF, paths.MODELFILE, paths.MODELFILE_ADAPTER,
                 paths.VERIFY_JSON, paths.EXPORT_JSON):
        assert (export / name).is_file(), name
    assert json.loads((export / paths.VERIFY_JSON).read_text())["passed"] is True
    for name in (paths.REPORT_JSON, paths.REPORT_MD, paths.REPORT_HTML):
        assert (run / paths.EVAL_DIR / name).is_file(), name
    report = json.loads((run / paths.EVAL_DIR / paths.REPORT_JSON).read_text())
    assert report["perplexity"]["base_test"] > 1 and report["perplexity"]["tuned_test"] > 1

    assert "=== pastiche run: done" in out
    assert "export verified yes: adapter KL" in out
    assert f"ollama create infinite-cities -f {export / paths.MODELFILE}" in out
    assert [line for line in out.splitlines() if line.startswith("=== [")] == [
        f"=== [1/5] prepare: {Path(paths.__file__).parent / 'data' / 'infinite_cities.csv'} -> {workdir / 'data' / 'infinite-cities'}",
        f"=== [2/5] train: new run in {workdir / 'runs'}",
        "=== [3/5] export: PEFT, GGUF adapter, merged GGUF, Modelfiles, verified with llama.cpp",
        "=== [4/5] evaluate: held-out perplexity, style distance, copying, stopping",
        "=== [5/5] generate: one new piece",
    ]

    # --resume finds every stage finished and only writes the new piece; nothing is overwritten.
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert main(["run", "--config", str(config), "--workdir", str(workdir), "--resume"]) == 0
    banners = [line for line in capsys.readouterr().out.splitlines() if line.startswith("=== [")]
    assert banners[1:4] == [f"=== [2/5] train: already finished in {run}", "=== [3/5] export: already finished",
                            "=== [4/5] evaluate: already finished"]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == ["infinite-cities-01"]
