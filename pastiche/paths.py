"""Artifact names and folder layouts, defined once for every stage."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from pastiche.errors import PasticheError

# prepare
TRAIN_JSONL, EVAL_JSONL, TEST_JSONL = "train.jsonl", "eval.jsonl", "test.jsonl"
SPLIT_FILES = {"train": TRAIN_JSONL, "eval": EVAL_JSONL, "test": TEST_JSONL}
PREPARE_JSON = "prepare.json"
TRAIN_DATASET_DIR, EVAL_DATASET_DIR = "train_dataset", "eval_dataset"
TRAINING_CSV = "training_data.csv"
LENGTHS_PNG = "token_lengths.png"

# train (a run folder)
CONFIG_YAML = "config.yaml"
BASE_JSON = "base.json"
ADAPTER_DIR = "adapter"
TOKENIZER_DIR = "tokenizer"
METRICS_JSONL = "metrics.jsonl"
LOSS_PNG = "loss.png"
TRAIN_LOG = "train.log"
CHECKPOINTS_DIR = "checkpoints"
STATE_JSON = "state.json"

# evaluate
EVAL_DIR = "eval"
REPORT_JSON, REPORT_MD, REPORT_HTML = "report.json", "report.md", "report.html"

# export
EXPORT_DIR = "export"
ADAPTER_GGUF, MERGED_GGUF, BASE_GGUF = "adapter.gguf", "merged.gguf", "base.gguf"
MERGED_DIR = "merged"
MODELFILE, MODELFILE_ADAPTER = "Modelfile", "Modelfile.adapter"
VERIFY_JSON, EXPORT_JSON = "verify.json", "export.json"


def home() -> Path:
    """pastiche's cache folder (dequantized bases); PASTICHE_HOME overrides it."""
    root = os.environ.get("PASTICHE_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pastiche"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def next_run_dir(runs_dir: str | Path, name: str) -> Path:
    """runs/NAME-01, runs/NAME-02, ...: the first number not yet taken."""
    runs_dir = Path(runs_dir)
    pattern = re.compile(rf"^{re.escape(name)}-(\d+)$")
    taken = [int(m.group(1)) for p in runs_dir.glob(f"{name}-*") if (m := pattern.match(p.name))]
    return runs_dir / f"{name}-{max(taken, default=0) + 1:02d}"


def last_run_dir(runs_dir: str | Path, name: str) -> Path | None:
    runs = sorted(Path(runs_dir).glob(f"{name}-[0-9]*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    return runs[-1] if runs else None


def refuse_existing(final: str | Path, force: bool = False, flag: str = "--out") -> None:
    """Fail early (before any slow work) when an output folder exists and --force is not given."""
    if Path(final).exists() and not force:
        raise PasticheError(f"{flag}: {final} already exists; choose another folder or pass --force.")


@contextlib.contextmanager
def atomic_dir(final: str | Path, force: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``final`` only if the block succeeds."""
    final = Path(final)
    refuse_existing(final, force, flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
