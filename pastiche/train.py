"""`pastiche train DATA`: a LoRA adapter that writes like the author and learns to stop.

The run folder (runs/NAME-NN) describes itself: config.yaml, base.json, adapter/ (best by
eval loss), tokenizer/, metrics.jsonl, loss.png, train.log and state.json; checkpoints/ lives
only while the run is unfinished, so ``--resume`` can continue it after a crash or kill -9.
Every check of the user's input happens before the model is loaded. The loop itself is the
``transformers`` Trainer (see ``pastiche.loop`` for why and what we change).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

from pastiche import config as config_mod
from pastiche import models, paths
from pastiche.config import TrainConfig
from pastiche.errors import PasticheError


def check_data(data: Path) -> None:
    if not data.is_dir():
        raise PasticheError(f"DATA: {data} is not a folder; expected the output of `pastiche prepare`.")
    for name in (paths.PREPARE_JSON, paths.TRAIN_JSONL, paths.EVAL_JSONL):
        if not (data / name).is_file():
            raise PasticheError(f"DATA: {data} has no {name}; expected the output of `pastiche prepare`.")
    if (data / paths.TRAIN_JSONL).stat().st_size == 0:
        raise PasticheError(f"DATA: {data / paths.TRAIN_JSONL} is empty; there is nothing to train on.")


def cpu_has_bf16() -> bool:
    """True where the CPU does bf16 arithmetic natively (AVX512-BF16 or AMX), so autocast pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def choose_device(cfg: TrainConfig) -> tuple[str, str]:
    """(device, precision) from the flags and what this machine has."""
    import torch

    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if cfg.device == "cuda" and not cuda:
        raise PasticheError("--device cuda: PyTorch sees no CUDA GPU on this machine.")
    if cfg.device == "mps" and not mps:
        raise PasticheError("--device mps: PyTorch sees no Apple GPU (MPS) on this machine.")
    if cfg.qlora and not cuda:
        raise PasticheError("--qlora needs a CUDA GPU (bitsandbytes 4-bit); drop --qlora to train LoRA on this machine.")
    device = cfg.device if cfg.device != "auto" else "cuda" if cuda else "mps" if mps else "cpu"
    if cfg.qlora and device != "cuda":
        raise PasticheError(f"--qlora needs --device cuda (got --device {device}).")
    precision = cfg.precision
    if precision == "auto":
        precision = {"cuda": "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp16",
                     "mps": "fp32", "cpu": "bf16" if cpu_has_bf16() else "fp32"}[device]
    if precision == "fp16" and device != "cuda":
        raise PasticheError(f"--precision fp16 needs --device cuda (got {device}); use bf16 or fp32.")
    if precision == "bf16" and device == "mps":
        raise PasticheError("--precision bf16 is not supported on MPS; use fp32.")
    return device, precision


def resolve_run(cfg: TrainConfig) -> tuple[TrainConfig, Path, Path | None]:
    """(config, run folder, checkpoint to resume from); a resumed run keeps its saved config."""
    if not cfg.resume:
        name = cfg.name or Path(cfg.data).resolve().name
        return cfg, paths.next_run_dir(cfg.runs_dir, name), None
    run = Path(cfg.resume)
    if cfg.resume == "last":
        run = paths.last_run_dir(cfg.runs_dir, cfg.name or Path(cfg.data).resolve().name)
    if run is None or not (run / paths.CONFIG_YAML).is_file():
        raise PasticheError(f"--resume: {cfg.resume} is not a run folder (no {paths.CONFIG_YAML}).")
    state = read_state(run)
    if state.get("status") == "done":
        raise PasticheError(f"--resume: {run} already finished; start a new run instead.")
    checkpoint = last_good_checkpoint(run / paths.CHECKPOINTS_DIR)
    if checkpoint is None:
        raise PasticheError(f"--resume: {run} has no complete checkpoint to continue from.")
    saved = config_mod.load_yaml(run / paths.CONFIG_YAML)
    return config_mod.build(TrainConfig, saved, {"resume": str(run)}), run, checkpoint


def last_good_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose trainer state was written (a kill can interrupt a save)."""
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True)
    for checkpoint in found:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if (checkpoint / "optimizer.pt").is_file():
            return checkpoint
    return None


def read_state(run: Path) -> dict:
    try:
        return json.loads((run / paths.STATE_JSON).read_text())
    except (OSError, ValueError):
        return {}


def write_state(run: Path, **state) -> None:
    tmp = run / f".{paths.STATE_JSON}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(run / paths.STATE_JSON)


def keep_awake() -> subprocess.Popen | None:
    """Ask the OS not to sleep while this process lives; silently nothing where it cannot."""
    pid = str(os.getpid())
    if sys.platform == "darwin" and shutil.which("caffeinate"):
        command = ["caffeinate", "-i", "-w", pid]
    elif shutil.which("systemd-inhibit") and shutil.which("tail"):
        command = ["systemd-inhibit", "--what=sleep:idle", "--who=pastiche", "--why=training a model",
                   "tail", f"--pid={pid}", "-f", "/dev/null"]
    else:
        return None
    try:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None


def logger(run: Path):
    def log(message: str, echo: bool = False) -> None:
        with (run / paths.TRAIN_LOG).open("a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        if echo:
            print(f"pastiche train: {message}", file=sys.stderr)
    return log


def start_run(cfg: TrainConfig, run: Path, base: models.BaseModel) -> None:
    """Create the run folder with the files that describe it, before any heavy work."""
    run.mkdir(parents=True, exist_ok=True)
    local_base = Path(cfg.base).expanduser()
    resolved = dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()), resume=None,
                                   base=str(local_base.resolve()) if local_base.exists() else cfg.base)
    config_mod.save_yaml(config_mod.to_dict(resolved), run / paths.CONFIG_YAML)
    (run / paths.BASE_JSON).write_text(json.dumps(base.to_json(), indent=2))
    write_state(run, status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"))


def is_main_process() -> bool:
    """Under `accelerate launch` only the first process writes the run folder."""
    return int(os.environ.get("RANK", "0")) == 0


def agree_on_run(run: Path) -> Path:
    """Every process of a multi-GPU launch uses the run folder that the first one chose."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return run
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    PartialState()  # joins the process group that the Trainer then uses
    return Path(broadcast_object_list([str(run)])[0])


def train(cfg: TrainConfig) -> Path:
    """Train a LoRA adapter on prepared data; returns the finished run folder."""
    cfg, run, checkpoint = resolve_run(cfg)
    check_data(Path(cfg.data))
    base = models.resolve_base(cfg.base)
    models.check_loadable(base)
    device, precision = choose_device(cfg)
    run, main = agree_on_run(run), is_main_process()
    if main and checkpoint is None:
        start_run(cfg, run, base)
    elif main:
        write_state(run, **{**read_state(run), "status": "running"})
    log = logger(run) if main else (lambda message, echo=False: None)
    log(f"{'resuming from ' + str(checkpoint) if checkpoint else 'new run'} in {run}; "
        f"base {base.name}; device {device}, precision {precision}", echo=True)
    awake = keep_awake() if main else None
    started = time.perf_counter()
    try:
        summary = fit(cfg, base, run, device, precision, checkpoint, log)
    except BaseException as exc:
        if main:
            write_state(run, **{**read_state(run), "status": "failed", "error": str(exc) or type(exc).__name__})
        raise
    finally:
        if awake is not None:
            awake.terminate()
    if main:
        shutil.rmtree(run / paths.CHECKPOINTS_DIR, ignore_errors=True)
        write_state(run, status="done", runtime_s=round(time.perf_counter() - started, 2), **summary)
        log(f"done: {json.dumps(summary)}", echo=True)
    return run


def load_examples(cfg: TrainConfig, tokenizer) -> tuple[list, list]:
    """Tokenized train and eval records; train records packed into rows when --packing."""
    from pastiche.batching import encode, pack, read_records

    data = Path(cfg.data)
    train_set = [encode(tokenizer, r) for r in read_records(data / paths.TRAIN_JSONL)]
    eval_set = [encode(tokenizer, r) for r in read_records(data / paths.EVAL_JSONL)]
    if cfg.packing:
        # Rows as long as the longest record: attention inside a row costs its length squared.
        train_set = pack(train_set, max(len(e) for e in train_set))
    return train_set, eval_set


def build_model(cfg: TrainConfig, base: models.BaseModel, device: str, precision: str, fast_path: bool = True):
    """The base with LoRA adapters; the Trainer moves it to the device.

    On a CPU, ``fast_path`` swaps in pastiche/fastpath.py's pieces (``benchmarks/cpu_fastpath.py``
    builds the model without them to measure what they bring).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    from pastiche import fastpath

    set_seed(cfg.seed)  # LoRA's A matrices are drawn at random
    # The frozen base is stored in the training precision (fp16 only on CUDA, where a GradScaler
    # handles it): autocast then has no weights to cast each step and the base takes half the
    # memory. The LoRA weights stay fp32 (PEFT upcasts them).
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
    # On CPU, SDPA's kernels train slower than the plain (eager) attention for these short rows
    # (`benchmarks/train_throughput.py --sides pastiche`: 378-401 vs 440-495 useful tokens/s),
    # and our grouped attention (pastiche/fastpath.py) is faster than both.
    fast = fast_path and device == "cpu"
    attention = fastpath.register_attention() if fast else "eager" if device == "cpu" else None
    model = models.load_model(base, dtype=dtype, device="cpu", quantize_4bit=cfg.qlora, attention=attention)
    if cfg.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    targets = "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise PasticheError(f"--target-modules: {exc}") from exc
    model.config.use_cache = False
    if fast:
        fastpath.speed_up(model)  # dropout masks, LoRA forward, RMSNorm; see pastiche/fastpath.py
        fastpath.reuse_freed_memory()  # fewer page faults per step
    return model


def training_arguments(cfg: TrainConfig, run: Path, device: str, precision: str, has_eval: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(run / paths.CHECKPOINTS_DIR), num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=1, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, logging_steps=cfg.logging_steps,
        eval_strategy="steps" if has_eval else "no", eval_steps=cfg.eval_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_limit,
        metric_for_best_model="eval_loss" if has_eval else None, greater_is_better=False,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device == "cpu",
        gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
        seed=cfg.seed, data_seed=cfg.seed, report_to="none", disable_tqdm=True, remove_unused_columns=False,
        restore_callback_states_from_checkpoint=True, dataloader_num_workers=0,
    )


def fit(cfg: TrainConfig, base: models.BaseModel, run: Path, device: str, precision: str,
        checkpoint: Path | None, log) -> dict:
    """Tokenize, build the model, run the Trainer; returns the numbers state.json keeps."""
    import transformers
    from transformers import EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback

    from pastiche import chat, loop
    from pastiche.batching import Collator

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # renamed Trainer options, not ours to fix
    tokenizer = models.load_tokenizer(base)
    chat.ensure_template(tokenizer)
    if is_main_process():
        tokenizer.save_pretrained(run / paths.TOKENIZER_DIR)
    train_set, eval_set = load_examples(cfg, tokenizer)
    log(f"{len(train_set)} training rows ({sum(map(len, train_set))} tokens), {len(eval_set)} eval records")
    model = build_model(cfg, base, device, precision)
    if device == "cpu":
        from pastiche import kernels

        log("compiled CPU kernels: " + ("in use" if kernels.library() else
                                        "not in use (no working C compiler, or PASTICHE_KERNELS=0)"))
    callbacks = [loop.RunLog(run / paths.METRICS_JSONL, log), loop.BestAdapter(run / paths.ADAPTER_DIR),
                 loop.NoFinalCheckpoint()]
    if eval_set and cfg.early_stopping:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping))
    trainer = loop.CompletionTrainer(
        model=model, args=training_arguments(cfg, run, device, precision, bool(eval_set)),
        train_dataset=train_set, eval_dataset=eval_set or None, data_collator=Collator(tokenizer.pad_token_id),
        callbacks=callbacks, batch_tokens=cfg.batch_tokens, seed=cfg.seed)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(loop.ProgressBar(trainer))
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    elapsed = time.perf_counter() - started
    state = trainer.state
    if eval_set and not any(h.get("step") == state.global_step and "eval_loss" in h for h in state.log_history):
        trainer.evaluate()  # the last steps may not have reached an --eval-steps boundary
    if not eval_set and trainer.is_world_process_zero():
        loop.save_adapter(trainer.model, run / paths.ADAPTER_DIR)
    if trainer.is_world_process_zero():
        loop.plot_losses(run / paths.METRICS_JSONL, run / paths.LOSS_PNG)
    return {"global_step": state.global_step, "best_eval_loss": state.best_metric,
            "best_step": state.best_global_step, "useful_tokens": trainer.useful_tokens,
            "tokens_per_second": round(trainer.useful_tokens / max(elapsed, 1e-9), 1),
            "device": device, "precision": precision, "versions": loop.versions()}


def main(cfg: TrainConfig) -> int:
    run = train(cfg)
    print(run)
    return 0
