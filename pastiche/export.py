"""`pastiche export RUN`: PEFT copy, adapter.gguf, merged.gguf (+ base.gguf for HF bases), Modelfiles.

Every GGUF is checked with real llama.cpp against the PyTorch model on held-out text before the
folder appears (see ``pastiche.gguf_verify``); a file that does not behave like the trained model
fails the export and is named. ``Modelfile`` uses the merged GGUF, which every Ollama version
accepts; ``Modelfile.adapter`` keeps the base + ADAPTER route for Ollama versions that allow it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from pastiche import chat, gguf_export, gguf_verify, modelfile, models, paths
from pastiche.config import ExportConfig, to_dict
from pastiche.errors import PasticheError


def check_run(run: Path) -> None:
    if not run.is_dir():
        raise PasticheError(f"RUN: {run} is not a folder; expected a run folder written by `pastiche train`.")
    for name in (paths.BASE_JSON, paths.ADAPTER_DIR, paths.TOKENIZER_DIR):
        if not (run / name).exists():
            raise PasticheError(f"RUN: {run} has no {name}; expected a run folder written by `pastiche train`.")


def run_base(run: Path, given: str | None) -> models.BaseModel:
    """The base the adapter was trained on; refuses a different file (by sha256) or a changed one."""
    recorded = models.BaseModel.from_json(json.loads((run / paths.BASE_JSON).read_text()))
    if given is None:
        base = recorded if recorded.kind == "hf" or Path(recorded.path).is_file() else models.resolve_base(recorded.spec)
        if base.kind == "gguf" and models.sha256_file(base.path) != recorded.sha256:
            raise PasticheError(f"{run / paths.BASE_JSON}: the base GGUF {base.path} is not the file this run was "
                                f"trained on (sha256 differs); pass --base with the original file.")
        return base
    base = models.resolve_base(given)
    same = (base.sha256 == recorded.sha256) if recorded.kind == "gguf" else (
        base.kind == "hf" and _hf_config(base.path) == _hf_config(recorded.path))
    if not same:
        raise PasticheError(f"--base: {base.path} is not the base this run was trained on "
                            f"({recorded.name}, {recorded.kind}{', sha256 ' + recorded.sha256[:12] if recorded.sha256 else ''}); "
                            "an adapter only fits the base it was trained on.")
    return base


def _hf_config(path: str) -> dict | None:
    config = Path(path) / "config.json"
    return json.loads(config.read_text()) if config.is_file() else None


def _data_folder(run: Path) -> Path | None:
    import yaml

    config_file = run / paths.CONFIG_YAML
    data = (yaml.safe_load(config_file.read_text()) or {}).get("data") if config_file.is_file() else None
    return Path(data) if data and Path(data).is_dir() else None


def _records(data: Path | None, *splits: str) -> list[dict]:
    records = []
    for split in splits:
        file = data / paths.SPLIT_FILES[split] if data else None
        if file and file.is_file():
            records += [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return records


def held_out(run: Path, tokenizer, budget: int) -> tuple[list[list[int]], list[int]]:
    """Token ids of eval/test records (prompt + completion + end of turn) up to ``budget`` tokens, and a prompt."""
    records = _records(_data_folder(run), "eval", "test")
    if not records:
        raise PasticheError(f"{run / paths.CONFIG_YAML}: no eval or test records found in the run's data folder to "
                            "verify against; restore the prepared data or pass --no-verify.")
    texts, prompt = [], None
    for record in records:
        prompt_ids, completion_ids = chat.encode_record(tokenizer, record["prompt"], record["completion"], record.get("system"))
        prompt = prompt or prompt_ids
        ids = (prompt_ids + completion_ids)[: min(512, budget)]
        if len(ids) > 1:
            texts.append(ids)
            budget -= len(ids)
        if budget < 2:
            break
    return texts, prompt


def training_system_prompt(run: Path) -> str | None:
    return next((r["system"] for r in _records(_data_folder(run), "train") if r.get("system")), None)


def say(message: str) -> None:
    """One line of progress: export spends minutes in llama.cpp and PyTorch on a CPU."""
    print(f"pastiche export: {message}", flush=True)


def verify(files: dict[str, Path], base_gguf: Path, base_quantized: bool, merged_quantized: bool, refs: dict) -> dict:
    """Measure base alone (the quantization noise floor), base + adapter and the merge; raise on a mismatch."""
    say(f"verifying with llama.cpp: {base_gguf.name} alone (its quantization noise floor)")
    base = gguf_verify.measure(base_gguf, refs["base"])
    results = {"base": gguf_verify.judge(base, base_quantized, None) if "base" in files else
               {**base, "rule": "not checked (not written here): the noise floor the adapter is judged against",
                "passed": None}}
    say(f"verifying with llama.cpp: {base_gguf.name} + {files['adapter'].name}, then {files['merged'].name}")
    results["adapter"] = gguf_verify.judge(gguf_verify.measure(base_gguf, refs["tuned"], files["adapter"]),
                                           base_quantized, base["kl"])
    results["merged"] = gguf_verify.judge(gguf_verify.measure(files["merged"], refs["tuned"]), merged_quantized,
                                          base["kl"] if merged_quantized else None)
    checked = ["adapter", "merged"] + (["base"] if "base" in files else [])  # a base we did not write is only the floor
    for key, path in (("base", base_gguf), ("adapter", files["adapter"]), ("merged", files["merged"])):
        results[key]["file"] = path.name if path.parent == files["adapter"].parent else str(path)
    for key in checked:
        if not results[key]["passed"]:
            raise PasticheError(gguf_verify.failure_message(files[key].name, results[key]))
    return {"passed": True, "checked": checked, **results}


def _write_models(cfg: ExportConfig, run: Path, base: models.BaseModel, lora, out: Path, tokenizer,
                  held_out_ids: tuple | None) -> dict:
    """Everything that needs the PyTorch model: base.gguf, references, merged/ and merged.gguf."""
    import peft
    import torch

    model = models.load_model(base)
    files = {"adapter": out / paths.ADAPTER_GGUF, "merged": out / paths.MERGED_GGUF}
    if base.kind == "hf":
        files["base"] = out / paths.BASE_GGUF
        gguf_export.write_base_gguf(model, tokenizer, run / paths.TOKENIZER_DIR, files["base"], cfg.dtype)
    base_gguf = files.get("base") or Path(base.path)
    info = gguf_export.read_gguf(base_gguf)
    say(f"writing {paths.ADAPTER_GGUF} against {base_gguf.name}")
    adapter = gguf_export.write_adapter_gguf(lora, info, files["adapter"])
    tuned = peft.PeftModel.from_pretrained(model, str(run / paths.ADAPTER_DIR))
    refs = {}
    if held_out_ids:
        say("PyTorch reference distributions on held-out text, base and tuned")
        texts, prompt = held_out_ids
        with tuned.disable_adapter():
            refs["base"] = gguf_verify.torch_reference(tuned, texts, prompt)
        refs["tuned"] = gguf_verify.torch_reference(tuned, texts, prompt)
    say(f"merging the adapter; writing {paths.MERGED_GGUF} ({cfg.dtype}) and {paths.MERGED_DIR}/")
    merged = tuned.merge_and_unload()
    gguf_export.write_merged_gguf(merged, info, files["merged"], cfg.dtype, tokenizer.chat_template)
    merged.to(torch.float32 if cfg.dtype == "f32" else torch.float16).save_pretrained(out / paths.MERGED_DIR)
    tokenizer.save_pretrained(out / paths.MERGED_DIR)
    checks = verify(files, base_gguf, info.quantized, cfg.dtype == "q8_0", refs) if refs else {"passed": None, "skipped": "--no-verify"}
    return {"files": files, "base_gguf": base_gguf, "adapter": adapter, "verify": checks}


def export(cfg: ExportConfig) -> Path:
    """Write the export folder and return it; raises PasticheError on bad input or a failed check."""
    from transformers import AutoTokenizer

    run = Path(cfg.run)
    check_run(run)
    out = Path(cfg.out) if cfg.out else run / paths.EXPORT_DIR
    paths.refuse_existing(out, cfg.force)
    lora = gguf_export.load_lora(run / paths.ADAPTER_DIR)
    base = run_base(run, cfg.base)
    gguf_export.check_base_architecture(base)
    tokenizer = AutoTokenizer.from_pretrained(str(run / paths.TOKENIZER_DIR))
    chat.ensure_template(tokenizer)
    template = modelfile.go_template(modelfile.template_parts(tokenizer))  # refuse before the slow work
    ids = held_out(run, tokenizer, cfg.verify_tokens) if cfg.verify else None
    base_gguf = Path(base.path).resolve() if base.kind == "gguf" else out.resolve() / paths.BASE_GGUF
    with paths.atomic_dir(out, cfg.force) as tmp:
        shutil.copytree(run / paths.ADAPTER_DIR, tmp / paths.ADAPTER_DIR)
        written = _write_models(cfg, run, base, lora, tmp, tokenizer, ids)
        modelfile.write_modelfiles(tmp, out.resolve(), template, chat.stop_strings(tokenizer), base_gguf,
                                   cfg.num_ctx, training_system_prompt(run), str(run.resolve()))
        (tmp / paths.VERIFY_JSON).write_text(json.dumps(written["verify"], indent=2))
        record = {"run": str(run.resolve()), "base": base.to_json(), "base_gguf": str(base_gguf),
                  "adapter": written["adapter"], "config": to_dict(cfg), "versions": _versions(),
                  "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}}
        (tmp / paths.EXPORT_JSON).write_text(json.dumps(record, indent=2))
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("pastiche", "torch", "transformers", "peft", "gguf", "llama_cpp_python"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def ollama_name(cfg: ExportConfig) -> str:
    name = cfg.ollama_name or Path(cfg.run).resolve().name
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "pastiche"


def create_in_ollama(out: Path, name: str) -> dict:
    """Run `ollama create` when ollama is installed; report, never fail the export, if it refuses."""
    command = ["ollama", "create", name, "-f", paths.MODELFILE]
    print(f"To use it in Ollama:  cd {out} && {' '.join(command)}")
    if shutil.which("ollama") is None:
        return {"command": command, "ran": False}
    try:
        done = subprocess.run(command, check=False, cwd=out, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"ollama create did not finish ({exc}); the export in {out} is complete, run the command yourself.")
        return {"command": command, "ran": True, "returncode": None, "error": str(exc)}
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
    if done.returncode == 0:
        print(f"ollama create {name}: done; try `ollama run {name}`.")
    else:
        print(f"ollama create {name} refused the Modelfile (exit {done.returncode}): {tail[0]}. "
              f"The export in {out} is complete; Modelfile.adapter is the alternative for older Ollama versions.")
    return {"command": command, "ran": True, "returncode": done.returncode, "output": tail[0]}


def main(cfg: ExportConfig) -> int:
    out = export(cfg)
    checks = json.loads((out / paths.VERIFY_JSON).read_text())
    for key in checks.get("checked", []):
        c = checks[key]
        print(f"verified {key}: KL {c['kl']:.2e}/token, top-1 {c['top1']:.3f}, NLL {c['nll_gguf']:.4f} "
              f"(PyTorch {c['nll_torch']:.4f}), greedy {gguf_verify.greedy_summary(c)}")
    record = json.loads((out / paths.EXPORT_JSON).read_text())
    record["ollama"] = create_in_ollama(out, ollama_name(cfg))
    (out / paths.EXPORT_JSON).write_text(json.dumps(record, indent=2))
    print(f"exported to {out}")
    return 0
