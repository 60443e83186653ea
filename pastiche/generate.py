"""`pastiche generate` and the one way to load a model for sampling: ``load_generator``.

A run folder samples with PyTorch + PEFT, an export folder with llama.cpp (base GGUF + GGUF
adapter, or the merged GGUF). evaluate and serve use this module's names only.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from pastiche import chat, models, paths
from pastiche.config import GenerateConfig
from pastiche.engines import LlamaCppGenerator, TorchGenerator, load_hf_tokenizer
from pastiche.errors import PasticheError
from pastiche.sampling import Chunk, Completion, Generator, SamplingParams

__all__ = [
    "Chunk",
    "Completion",
    "Generator",
    "LlamaCppGenerator",
    "SamplingParams",
    "TorchGenerator",
    "generate_pieces",
    "load_generator",
    "main",
    "request_messages",
]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PasticheError(f"{path} is not readable JSON ({exc.__class__.__name__}).") from exc


def _run_generator(run: Path, use_adapter: bool) -> TorchGenerator:
    base = models.BaseModel.from_json(_read_json(run / paths.BASE_JSON))
    adapter = run / paths.ADAPTER_DIR
    if use_adapter and not (adapter / "adapter_config.json").is_file():
        raise PasticheError(f"{run} has no {paths.ADAPTER_DIR}/adapter_config.json; "
                            "expected a run folder written by `pastiche train` that finished.")
    tokenizer_dir = run / paths.TOKENIZER_DIR
    return TorchGenerator.load(base, adapter if use_adapter else None,
                               tokenizer_dir if tokenizer_dir.is_dir() else None,
                               run.name if use_adapter else f"{base.name} (base)")


def _export_generator(export: Path, backend: str, use_adapter: bool) -> Generator:
    info = _read_json(export / paths.EXPORT_JSON)
    base = models.BaseModel.from_json(info["base"])
    run = Path(info.get("run") or export.parent)
    name = run.name if use_adapter else f"{base.name} (base)"
    if backend == "torch":
        adapter = export / paths.ADAPTER_DIR
        if use_adapter and not adapter.is_dir():
            raise PasticheError(f"{export} has no {paths.ADAPTER_DIR}/ folder for --backend torch.")
        return TorchGenerator.load(base, adapter if use_adapter else None, _tokenizer_dir(export, run), name)
    tokenizer_dir = _tokenizer_dir(export, run)
    tokenizer = load_hf_tokenizer(tokenizer_dir) if tokenizer_dir else models.load_tokenizer(base)
    base_gguf = Path(info["base_gguf"])
    if not use_adapter:
        return LlamaCppGenerator(base_gguf, None, tokenizer, name)
    # The adapter over the unchanged base keeps --compare fair (same base file for both sides).
    if (export / paths.ADAPTER_GGUF).is_file():
        return LlamaCppGenerator(base_gguf, export / paths.ADAPTER_GGUF, tokenizer, name)
    if (export / paths.MERGED_GGUF).is_file():
        return LlamaCppGenerator(export / paths.MERGED_GGUF, None, tokenizer, name, base_path=base_gguf)
    raise PasticheError(f"{export} has neither {paths.ADAPTER_GGUF} nor {paths.MERGED_GGUF}; run `pastiche export` again.")


def _tokenizer_dir(export: Path, run: Path) -> Path | None:
    for folder in (export / paths.MERGED_DIR, run / paths.TOKENIZER_DIR):
        if (folder / "tokenizer_config.json").is_file():
            return folder
    return None


def load_generator(folder: str | Path, backend: str = "auto", use_adapter: bool = True) -> Generator:
    """A run folder (PyTorch by default) or an export folder (llama.cpp by default) as a Generator."""
    folder = Path(folder)
    if (folder / paths.EXPORT_JSON).is_file():
        return _export_generator(folder, backend, use_adapter)
    if (folder / paths.BASE_JSON).is_file():
        if backend != "llama.cpp":
            return _run_generator(folder, use_adapter)
        if (folder / paths.EXPORT_DIR / paths.EXPORT_JSON).is_file():
            return _export_generator(folder / paths.EXPORT_DIR, backend, use_adapter)
        raise PasticheError(f"--backend llama.cpp: {folder} has no {paths.EXPORT_DIR}/ yet; "
                            f"run `pastiche export {folder}` first.")
    if not folder.exists():
        raise PasticheError(f"{folder} does not exist; expected a run folder or an export folder.")
    raise PasticheError(f"{folder} is neither a run folder (no {paths.BASE_JSON}) nor an export folder "
                        f"(no {paths.EXPORT_JSON}).")


def _training_records(folder: Path) -> list[dict]:
    """The train split the run learned from (best effort: empty when it cannot be found)."""
    import yaml

    if (folder / paths.EXPORT_JSON).is_file():
        folder = Path(_read_json(folder / paths.EXPORT_JSON).get("run") or folder.parent)
    try:
        data = Path(yaml.safe_load((folder / paths.CONFIG_YAML).read_text(encoding="utf-8"))["data"])
        lines = (data / paths.TRAIN_JSONL).read_text(encoding="utf-8").splitlines()
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return []
    return [json.loads(line) for line in lines if line.strip()]


def request_messages(folder: str | Path, title: str | None, group: str | None, prompt: str | None) -> list[dict]:
    """Chat messages for a new piece, phrased like the training prompts the run learned.

    A title request reuses a training title prompt with the new title (and group) put in its
    place, and the same system message, so the model sees the request shape it was tuned on.
    """
    records = _training_records(Path(folder))
    system = next((r.get("system") for r in records if r.get("system")), None)
    if prompt:
        return chat.messages_for(prompt, system)
    if not (title or group):
        raise PasticheError("give --prompt, or --title and/or --group, to say what to write.")
    for record in records:
        old_title, old_group, prompt_text = record.get("title"), record.get("group"), record["prompt"]
        first_part = record.get("task") == "title" and str(record.get("id", "")).endswith("c0-title")
        if not (first_part and title and old_title and old_title in prompt_text):
            continue
        if bool(group) == bool(old_group and old_group in prompt_text):
            text = prompt_text.replace(old_title, title)
            return chat.messages_for(text.replace(old_group, group) if group else text, record.get("system"))
    if title:
        text = f'Write the piece titled "{title}"' + (f', from the series "{group}".' if group else ".")
    else:
        text = f'Write a piece from the series "{group}".'
    return chat.messages_for(text, system)


def _side_by_side(left: tuple[str, str], right: tuple[str, str]) -> str:
    import shutil
    import textwrap

    width = max(30, (shutil.get_terminal_size((120, 24)).columns - 3) // 2)
    columns = []
    for heading, text in (left, right):
        lines = [heading, "-" * min(width, len(heading))]
        for paragraph in text.splitlines() or [""]:
            lines += textwrap.wrap(paragraph, width) or [""]
        columns.append(lines)
    rows = max(map(len, columns))
    return "\n".join(f"{a:<{width}} | {b}" for a, b in zip(*(c + [""] * (rows - len(c)) for c in columns)))


def generate_pieces(cfg: GenerateConfig) -> list[str]:
    """Write ``cfg.n`` samples (streamed to stdout; base next to tuned with --compare)."""
    tuned = load_generator(cfg.run, cfg.backend)
    base = tuned.variant(False) if cfg.compare else None
    messages = request_messages(cfg.run, cfg.title, cfg.group, cfg.prompt)
    params = SamplingParams.from_config(cfg)
    records, texts = [], []
    for i in range(cfg.n):
        sample_params = dataclasses.replace(params, seed=cfg.seed + i)
        print(f"\n=== sample {i + 1}/{cfg.n} (seed {sample_params.seed}, {tuned.name})", flush=True)
        if base is None:
            done = _stream_to(sys.stdout, tuned, messages, sample_params)
        else:
            done = tuned.complete(messages, sample_params)
            control = base.complete(messages, sample_params)
            print(_side_by_side((f"tuned: {tuned.name}", done.text), (f"base: {base.name}", control.text)))
            records.append({"model": "base", "seed": sample_params.seed, **dataclasses.asdict(control)})
        records.append({"model": "tuned", "seed": sample_params.seed, **dataclasses.asdict(done)})
        texts.append(done.text)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({"run": str(cfg.run), "messages": messages,
                                              "params": _params_json(params), "samples": records},
                                             indent=2, ensure_ascii=False), encoding="utf-8")
    return texts


def _stream_to(out, generator: Generator, messages: list[dict], params: SamplingParams) -> Completion:
    start, parts = time.perf_counter(), []
    for chunk in generator.stream(messages, params):
        out.write(chunk.text)
        out.flush()
        parts.append(chunk.text)
    seconds = time.perf_counter() - start
    out.write(f"\n[{chunk.completion_tokens} tokens, {chunk.completion_tokens / max(seconds, 1e-9):.1f} tokens/s, "
              f"finished by {'end of turn' if chunk.finish_reason == 'stop' else 'max tokens'}]\n")
    return Completion("".join(parts), chunk.finish_reason, chunk.prompt_tokens, chunk.completion_tokens, seconds)


def _params_json(params: SamplingParams) -> dict:
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name != "cancel"}


def main(cfg: GenerateConfig) -> int:
    generate_pieces(cfg)
    return 0
