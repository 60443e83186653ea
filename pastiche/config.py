"""One dataclass of defaults per stage; CLI flags and YAML keys are derived from them.

A field's ``help`` metadata is its documentation and its ``--flag`` help text. Fields with
``positional=True`` metadata become positional arguments. Precedence: command line beats
config file beats the dataclass default. Validation lives in each ``__post_init__`` and
raises :class:`ConfigError` naming the flag, so the CLI can print one sentence and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pastiche.errors import ConfigError


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A documented dataclass field; ``extra`` goes into metadata (positional, choices, flag)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check(condition: bool, name: str, expected: str) -> None:
    if not condition:
        raise ConfigError(f"{flag_name(name)} must be {expected}.")


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        _check(value is None or value > 0, name, f"a positive number (got {value!r})")


def _fraction(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        _check(0.0 <= value < 1.0, name, f"a fraction in [0, 1) (got {value!r})")


@dataclass
class PrepareConfig:
    source: str = opt("", "Author corpus: CSV/TSV, JSONL/JSON, .txt/.md, EPUB, or a folder of .txt/.md files.", positional=True)
    out: str = opt("", "Output folder for the prepared splits (must not exist unless --force).")
    force: bool = opt(False, "Replace an existing output folder.")
    text_column: str | None = opt(None, "CSV/JSON column holding the text (auto-detected when unset).")
    title_column: str | None = opt(None, "CSV/JSON column holding a piece's title (auto-detected when unset).")
    group_column: str | None = opt(None, "CSV/JSON column holding a series/group name (auto-detected when unset).")
    split_on: str | None = opt(None, "Regex whose matching lines start a new piece in a single .txt/.md file.")
    base: str = opt("embedded", "Base model whose tokenizer counts tokens: 'embedded', a .gguf file, ollama:NAME, an HF folder or id.")
    max_tokens: int = opt(512, "Longest record in tokens (chat template included); longer pieces are cut at paragraph, then sentence, boundaries.")
    eval_fraction: float = opt(0.1, "Share of pieces held out for evaluation during training (early stopping).")
    test_fraction: float = opt(0.1, "Share of pieces reserved for `pastiche evaluate` (never trained on).")
    seed: int = opt(1234, "Seed for the split and the choice of prompt phrasings.")
    continuation: bool = opt(True, "Also write continuation records (opening sentence -> rest of the piece).")
    system_prompt: str | None = opt(None, "System message put before every prompt (none by default).")
    author: str | None = opt(None, "Author's name, used in prompts ('in the style of ...').")

    def __post_init__(self) -> None:
        _check(bool(self.source), "source", "a path to the author's corpus")
        _check(bool(self.out), "out", "an output folder path")
        _positive(self, "max_tokens")
        _check(self.max_tokens >= 32, "max_tokens", f"at least 32 (got {self.max_tokens})")
        _fraction(self, "eval_fraction", "test_fraction")
        _check(self.eval_fraction + self.test_fraction < 0.9, "test_fraction",
               "small enough that eval + test fractions leave pieces to train on")


@dataclass
class TrainConfig:
    data: str = opt("", "Folder written by `pastiche prepare`.", positional=True)
    base: str = opt("embedded", "Base model: 'embedded', a .gguf file, ollama:NAME[:TAG], an HF folder or hub id.")
    name: str | None = opt(None, "Run name; runs are numbered NAME-01, NAME-02, ... (default: the data folder's name).")
    runs_dir: str = opt("runs", "Folder that holds the numbered run folders.")
    resume: str | None = opt(None, "Continue an interrupted run: its folder, or 'last' for the newest run of this name.")
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: float = opt(32.0, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.")
    target_modules: list[str] = opt(["all-linear"], "Modules that get adapters ('all-linear' or names such as q_proj v_proj).")
    qlora: bool = opt(False, "Load the base in 4-bit (bitsandbytes, CUDA only).")
    # 5e-4 beat 2e-4 and the original write-up's 5e-5 on all three corpora of benchmarks/sweep.py
    # (perplexity ratio, Delta gap, EOS share; benchmarks/results/sweep-*.md).
    learning_rate: float = opt(5e-4, "Peak learning rate.")
    lr_scheduler: str = opt("cosine", "Learning-rate schedule.", choices=["cosine", "linear", "constant", "constant_with_warmup"])
    warmup_ratio: float = opt(0.05, "Share of steps spent warming up the learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    epochs: float = opt(3.0, "Passes over the training split.")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (smoke runs); overrides --epochs.")
    batch_tokens: int = opt(1024, "Token budget of one micro-batch (length-grouped, dynamically padded); memory grows with it.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    packing: bool = opt(False, "Pack several records into one row, with attention kept inside each record.")
    gradient_checkpointing: bool = opt(False, "Recompute activations to save memory.")
    device: str = opt("auto", "Where to train.", choices=["auto", "cpu", "cuda", "mps"])
    precision: str = opt("auto", "Arithmetic precision (auto: bf16 on CUDA and capable CPUs, fp32 elsewhere).", choices=["auto", "fp32", "bf16", "fp16"])
    eval_steps: int = opt(50, "Evaluate on the eval split every N optimizer steps.")
    save_steps: int = opt(50, "Checkpoint every N optimizer steps.")
    save_limit: int = opt(2, "Checkpoints kept (the best one is always kept).")
    early_stopping: int | None = opt(3, "Stop after this many evaluations without improvement (unset: never).")
    seed: int = opt(1234, "Random seed.")
    logging_steps: int = opt(5, "Log the training loss every N optimizer steps.")

    def __post_init__(self) -> None:
        _check(bool(self.data), "data", "the folder written by `pastiche prepare`")
        _positive(self, "lora_r", "lora_alpha", "learning_rate", "epochs", "max_steps", "batch_tokens",
                  "grad_accum", "eval_steps", "save_steps", "save_limit", "early_stopping", "logging_steps")
        _fraction(self, "lora_dropout", "warmup_ratio")
        _check(bool(self.target_modules), "target_modules", "at least one module name")


@dataclass
class GenerateConfig:
    run: str = opt("", "Run folder (base + adapter) or export folder (GGUF).", positional=True)
    prompt: str | None = opt(None, "Free-text request.")
    title: str | None = opt(None, "Title of the piece to write.")
    group: str | None = opt(None, "Series or theme of the piece.")
    n: int = opt(1, "Number of samples.")
    temperature: float = opt(0.8, "Sampling temperature (0 = greedy).")
    top_p: float = opt(0.95, "Nucleus sampling threshold.")
    top_k: int = opt(50, "Sample among the k most likely tokens (0 = all).")
    repetition_penalty: float = opt(1.1, "Penalty on tokens already generated (1 = none).")
    max_new_tokens: int = opt(400, "Most tokens to generate per sample.")
    seed: int = opt(1234, "Sampling seed.")
    backend: str = opt("auto", "Inference engine (auto: llama.cpp for export folders, PyTorch for run folders).", choices=["auto", "torch", "llama.cpp"])
    compare: bool = opt(False, "Also write with the base model, same prompt and seed, side by side.")
    json: str | None = opt(None, "Write the samples to this JSON file.")

    def __post_init__(self) -> None:
        _check(bool(self.run), "run", "a run or export folder")
        _positive(self, "n", "max_new_tokens", "top_p", "repetition_penalty")
        _check(self.temperature >= 0, "temperature", f"zero or more (got {self.temperature})")
        _check(self.top_k >= 0, "top_k", f"zero or more (got {self.top_k})")


@dataclass
class EvaluateConfig:
    run: str = opt("", "Run folder written by `pastiche train`.", positional=True)
    out: str | None = opt(None, "Report folder (default: RUN/eval).")
    samples_per_prompt: int = opt(1, "Samples per test prompt, for base and tuned alike.")
    max_samples_per_prompt: int = opt(8, "While the tuned or base samples hold fewer than --min-words words, sample the test prompts again for them, up to this many times each.")
    min_words: int = opt(2500, "Words of samples (and of test text) needed for a reliable Cosine Delta.")
    mfw: int = opt(150, "Most frequent words used by Cosine Delta.")
    drop_pronouns: bool = opt(False, "Leave pronouns out of the MFW list.")
    bootstrap: int = opt(500, "Bootstrap resamples for the Delta intervals.")
    temperature: float = opt(0.8, "Sampling temperature for the evaluation samples.")
    top_p: float = opt(0.95, "Nucleus sampling threshold for the evaluation samples.")
    repetition_penalty: float = opt(1.1, "Repetition penalty for the evaluation samples.")
    max_new_tokens: int = opt(400, "Most tokens per evaluation sample.")
    seed: int = opt(1234, "Seed for sampling and bootstrap.")
    backend: str = opt("auto", "Sampling engine (auto: llama.cpp when RUN/export exists, else PyTorch).", choices=["auto", "torch", "llama.cpp"])

    def __post_init__(self) -> None:
        _check(bool(self.run), "run", "a run folder")
        _positive(self, "samples_per_prompt", "max_samples_per_prompt", "min_words", "mfw", "bootstrap", "max_new_tokens")
        _check(self.max_samples_per_prompt >= self.samples_per_prompt, "max_samples_per_prompt",
               f"a number no smaller than --samples-per-prompt ({self.samples_per_prompt})")


@dataclass
class ExportConfig:
    run: str = opt("", "Run folder written by `pastiche train`.", positional=True)
    out: str | None = opt(None, "Export folder (default: RUN/export).")
    force: bool = opt(False, "Replace an existing export folder.")
    dtype: str = opt("f16", "Tensor type of merged.gguf (and base.gguf when one is written).", choices=["f16", "q8_0", "f32"])
    verify: bool = opt(True, "Check the GGUF files against the PyTorch model with real llama.cpp.")
    verify_tokens: int = opt(1024, "Held-out tokens (the run's eval and test records) compared position by position.")
    base: str | None = opt(None, "Base GGUF or folder to export against (default: the run's base.json); must be the one the run was trained on.")
    ollama_name: str | None = opt(None, "Name for `ollama create` (default: the run's name).")
    num_ctx: int = opt(2048, "Context length written to the Modelfiles.")

    def __post_init__(self) -> None:
        _check(bool(self.run), "run", "a run folder")
        _positive(self, "num_ctx", "verify_tokens")


@dataclass
class ServeConfig:
    model: str = opt("", "Run folder or export folder to serve.", positional=True)
    host: str = opt("127.0.0.1", "Address to bind (other than loopback needs --api-key or --insecure).")
    port: int = opt(8000, "Port (0 picks a free one).")
    api_key: str | None = opt(None, "Bearer token required on every API route.")
    insecure: bool = opt(False, "Allow binding a non-loopback address without an API key.")
    concurrency: int = opt(1, "Generations run at once; more requests wait in a queue.")
    max_tokens_limit: int = opt(2048, "Largest max_tokens a request may ask for.")
    backend: str = opt("auto", "Inference engine.", choices=["auto", "torch", "llama.cpp"])

    def __post_init__(self) -> None:
        _check(bool(self.model), "model", "a run or export folder")
        _check(0 <= self.port < 65536, "port", f"a port number 0-65535 (got {self.port})")
        _positive(self, "concurrency", "max_tokens_limit")


@dataclass
class RunConfig:
    source: str | None = opt(None, "Author corpus (default: the bundled Infinite Cities).", positional=True)
    config: str | None = opt(None, "YAML file whose prepare/train/evaluate/export sections set any stage option.")
    workdir: str = opt("pastiche-runs", "Folder for the prepared data, runs and exports.")
    resume: bool = opt(False, "Continue the newest run from its last finished stage.")
    max_steps: int | None = opt(None, "Cap training steps (smoke runs).")


STAGES: dict[str, type] = {
    "prepare": PrepareConfig, "train": TrainConfig, "generate": GenerateConfig,
    "evaluate": EvaluateConfig, "export": ExportConfig, "serve": ServeConfig, "run": RunConfig,
}


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, is_list) of a field annotation such as ``int | None`` or ``list[str]``."""
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation  # noqa: S307
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _base_type(args[0])
    if origin is list:
        return args[0], True
    return hint, False


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per dataclass field; unset flags stay absent (SUPPRESS)."""
    for f in dataclasses.fields(cls):
        kind, is_list = _base_type(f.type)
        kwargs: dict[str, Any] = {"help": f.metadata["help"], "default": argparse.SUPPRESS}
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?", type=kind, **kwargs)
            continue
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if is_list:
                kwargs["nargs"] = "+"
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            shown = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kwargs["help"] += f" (default: {shown})"
        parser.add_argument(flag_name(f.name), dest=f.name, **kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: {path} is not a file.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config: {path} is not valid YAML ({exc.__class__.__name__}).") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of stage names to options.")
    return data


def build(cls: type, *layers: dict[str, Any]) -> Any:
    """Merge option layers (later wins) over the dataclass defaults; unknown keys are refused."""
    known = {f.name for f in dataclasses.fields(cls)}
    merged: dict[str, Any] = {}
    for layer in layers:
        unknown = sorted(set(layer) - known)
        if unknown:
            raise ConfigError(f"unknown option {unknown[0]!r} for {cls.__name__}; known: {', '.join(sorted(known))}.")
        merged.update({k: v for k, v in layer.items()})
    return cls(**merged)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_yaml(data: dict[str, Any], path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
