"""The whole road in one command: prepare -> train -> export -> evaluate -> one new piece.

Export comes before evaluate so that evaluation samples through llama.cpp with the verified
GGUF adapter, several times faster on a CPU than PyTorch generation.

``run`` only calls the stages' entry functions in order and reads what they wrote; each stage's
options come from the YAML file's section of the same name (the stage's own keys). Without a
source it uses the bundled Infinite Cities corpus and its config (``data/infinite_cities.yaml``).
Re-running makes a new numbered run folder; ``--resume`` picks up the newest run at the first
stage that has not finished (training continues from its last checkpoint).
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from pastiche import paths
from pastiche.config import (EvaluateConfig, ExportConfig, GenerateConfig, PrepareConfig, RunConfig,
                             TrainConfig, build, load_yaml)
from pastiche.errors import PasticheError

DEMO_CORPUS, DEMO_CONFIG = "infinite_cities.csv", "infinite_cities.yaml"
STAGE_SECTIONS = ("prepare", "train", "evaluate", "export", "generate")


def bundled(name: str) -> Path:
    return Path(str(resources.files("pastiche") / "data" / name))


def stage_options(cfg: RunConfig) -> dict[str, dict]:
    """Each stage's options from the config file (the bundled one for the demo corpus)."""
    config_file = cfg.config or (None if cfg.source else str(bundled(DEMO_CONFIG)))
    sections = load_yaml(config_file) if config_file else {}
    unknown = sorted(set(sections) - set(STAGE_SECTIONS))
    if unknown:
        raise PasticheError(f"--config: unknown section {unknown[0]!r}; expected {', '.join(STAGE_SECTIONS)}.")
    return {name: dict(sections.get(name) or {}) for name in STAGE_SECTIONS}


def banner(step: int, name: str, detail: str) -> None:
    print(f"\n=== [{step}/5] {name}: {detail}", flush=True)


def run(cfg: RunConfig) -> Path:
    """Run every stage not yet finished; return the run folder.

    Stages run through their ``main`` so each prints the summary it prints on its own.
    """
    options = stage_options(cfg)
    workdir = Path(cfg.workdir)
    source = Path(cfg.source) if cfg.source else bundled(DEMO_CORPUS)
    name = source.stem.replace("_", "-")
    if not source.exists():
        raise PasticheError(f"source: {source} does not exist.")

    data_dir = workdir / "data" / name
    if not (data_dir / paths.PREPARE_JSON).is_file():
        banner(1, "prepare", f"{source} -> {data_dir}")
        from pastiche import prepare

        prepare.main(build(PrepareConfig, options["prepare"], {"source": str(source), "out": str(data_dir)}))
    else:
        banner(1, "prepare", f"reusing {data_dir}")

    runs_dir = workdir / "runs"
    run_dir = paths.last_run_dir(runs_dir, name) if cfg.resume else None
    if run_dir is not None and _stage_done(run_dir, "train"):
        banner(2, "train", f"already finished in {run_dir}")
    else:
        detail = f"resuming {run_dir}" if run_dir else f"new run in {runs_dir}"
        banner(2, "train", detail)
        from pastiche.train import train

        train_opts = {**options["train"], "data": str(data_dir), "runs_dir": str(runs_dir), "name": name}
        if run_dir is not None:
            train_opts["resume"] = str(run_dir)
        if cfg.max_steps:
            train_opts["max_steps"] = cfg.max_steps
        run_dir = train(build(TrainConfig, train_opts))

    if _stage_done(run_dir, "export"):
        banner(3, "export", "already finished")
    else:
        banner(3, "export", "PEFT, GGUF adapter, merged GGUF, Modelfiles, verified with llama.cpp")
        from pastiche import export

        export.main(build(ExportConfig, options["export"], {"run": str(run_dir), "force": True}))

    if _stage_done(run_dir, "evaluate"):
        banner(4, "evaluate", "already finished")
    else:
        banner(4, "evaluate", "held-out perplexity, style distance, copying, stopping")
        from pastiche import evaluate

        evaluate.main(build(EvaluateConfig, options["evaluate"], {"run": str(run_dir)}))

    banner(5, "generate", "one new piece")
    sample = _one_sample(run_dir, options["generate"])
    summary(run_dir, sample, name)
    return run_dir


def _stage_done(run_dir: Path, stage: str) -> bool:
    if stage == "train":
        state = run_dir / paths.STATE_JSON
        return state.is_file() and json.loads(state.read_text()).get("status") == "done"
    if stage == "evaluate":
        return (run_dir / paths.EVAL_DIR / paths.REPORT_JSON).is_file()
    return (run_dir / paths.EXPORT_DIR / paths.EXPORT_JSON).is_file()


def _one_sample(run_dir: Path, generate_options: dict) -> str:
    """A new piece for an unseen title, streamed from the exported GGUF (llama.cpp)."""
    from pastiche.generate import generate_pieces

    opts = {"title": "The City of Mended Maps", "group": "Cities and Ledgers", **generate_options,
            "run": str(run_dir / paths.EXPORT_DIR)}
    return generate_pieces(build(GenerateConfig, opts))[0]


def _metric(report: dict, *keys: str, fmt: str = "{:.3f}") -> str:
    value = report
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return "not measured"
        value = value[key]
    return fmt.format(value) if isinstance(value, (int, float)) else str(value)


def _verified(verify: dict) -> str:
    if verify.get("passed"):
        return "yes: " + ", ".join(f"{k} KL {verify[k]['kl']:.1e}/token" for k in verify.get("checked", []))
    return "skipped (--no-verify)" if "skipped" in verify else "NO"


def summary(run_dir: Path, sample: str, name: str) -> None:
    report_file = run_dir / paths.EVAL_DIR / paths.REPORT_JSON
    verify_file = run_dir / paths.EXPORT_DIR / paths.VERIFY_JSON
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    verify = json.loads(verify_file.read_text()) if verify_file.is_file() else {}
    export_dir = run_dir / paths.EXPORT_DIR
    lines = [
        "",
        "=== pastiche run: done",
        f"run folder      {run_dir}",
        f"report          {run_dir / paths.EVAL_DIR / paths.REPORT_HTML}",
        f"export          {export_dir}",
        f"perplexity      base {_metric(report, 'perplexity', 'base_test', fmt='{:.2f}')}"
        f" -> tuned {_metric(report, 'perplexity', 'tuned_test', fmt='{:.2f}')} (test split)",
        f"Delta gap       {_metric(report, 'delta', 'gap')}"
        f" (interval {_metric(report, 'delta', 'gap_low')} .. {_metric(report, 'delta', 'gap_high')})",
        f"copy rate       {_metric(report, 'copying', 'tuned', 'copy_rate')}"
        f" (author's own {_metric(report, 'copying', 'test', 'copy_rate')})",
        f"stopped by EOS  {_metric(report, 'stopping', 'tuned_eos_share', fmt='{:.0%}')}",
        f"export verified {_verified(verify)}",
        "",
        "A new piece, never in the corpus:",
        "",
        sample.strip(),
        "",
        "Use it:",
        f"  pastiche generate {export_dir} --title 'Your title'",
        f"  pastiche serve {export_dir}",
        f"  ollama create {name} -f {export_dir / paths.MODELFILE}",
    ]
    print("\n".join(lines), flush=True)


def main(cfg: RunConfig) -> int:
    if cfg.config and not Path(cfg.config).is_file():
        raise PasticheError(f"--config: {cfg.config} is not a file.")
    start = time.monotonic()
    run(cfg)
    print(f"\n(total {time.monotonic() - start:.0f} s)")
    return 0
