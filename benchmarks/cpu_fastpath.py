"""The CPU fast path against plain PEFT + eager attention, in one process, on the same batches.

    python benchmarks/cpu_fastpath.py [--fables 48] [--batches 6] [--repeats 4] [--lora benchmark|defaults]

Both models are the embedded base with the same LoRA; "plain" is what `pastiche train` built
before `pastiche/fastpath.py` (PEFT's dropout and input cast, Llama's RMSNorm, eager
attention), "fast path" is what it builds now on a CPU, with the compiled kernels of
pastiche/kernels.py, and "no kernels" is the fast path with those turned off (its PyTorch
versions; "plain" runs without them too). Each repeat times one pass of each side over the same
micro-batches (forward, backward, AdamW step under bf16 autocast, or fp32 where the CPU has no
bf16), alternating, so slow spells of the machine hit all sides alike. It prints the median
useful tokens/s of each, `ratio fast path vs plain: X` and `ratio kernels vs no kernels: Y`.
glibc's keep-freed-memory setting is process-wide, so all sides have it here: the ratios are
the model pieces' alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from train_throughput import prepare_fables, records

LORA = {"benchmark": {"lora_r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "defaults": {}}


def build(cfg, fast: bool):
    import torch

    from pastiche import models
    from pastiche.train import build_model

    model = build_model(cfg, models.resolve_base("embedded"), "cpu", cfg.precision, fast_path=fast)
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def one_pass(model, optimizer, batches, bf16: bool, compiled: bool) -> float:
    import contextlib

    import torch

    from pastiche import kernels
    from pastiche.loop import completion_loss, fusable_head

    head = fusable_head(model)
    started = time.perf_counter()
    with contextlib.nullcontext() if compiled else kernels.turned_off():
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, targets = completion_loss(model, batch, head)
            (loss / targets).backward()
            optimizer.step()
            optimizer.zero_grad()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared/corpora/aesop_jones"))
    parser.add_argument("--fables", type=int, default=48)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--lora", choices=sorted(LORA), default="benchmark",
                        help="benchmark: r=4 on q/v as train_throughput.py; defaults: pastiche's own LoRA defaults")
    args = parser.parse_args()

    import shutil
    import tempfile

    from pastiche import chat, models
    from pastiche.batching import Collator, encode, token_budget_batches
    from pastiche.config import TrainConfig
    from pastiche.train import cpu_has_bf16

    bf16 = cpu_has_bf16()
    work = Path(tempfile.mkdtemp(prefix="pastiche-fastpath-"))
    try:
        prepared = prepare_fables(Path(args.corpus), args.fables, work)
        cfg = TrainConfig(data=str(prepared), precision="bf16" if bf16 else "fp32", **LORA[args.lora])
        tokenizer = models.load_tokenizer(models.resolve_base("embedded"))
        chat.ensure_template(tokenizer)
        examples = [encode(tokenizer, r) for r in records(prepared)]
        collate = Collator(tokenizer.pad_token_id)
        groups = token_budget_batches([len(e) for e in examples], cfg.batch_tokens, cfg.seed)[:args.batches]
        batches = [collate([examples[i] for i in group]) for group in groups]
        tokens = sum(int(b["useful_tokens"]) for b in batches)
        fast = build(cfg, fast=True)
        sides = {"plain": (*build(cfg, fast=False), False), "fast path": (*fast, True), "no kernels": (*fast, False)}
        for side in sides.values():
            one_pass(*side[:2], batches, bf16, side[2])  # warm-up: first-touch allocations, oneDNN kernel choice
        seconds = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, side in sides.items():
                seconds[name].append(one_pass(*side[:2], batches, bf16, side[2]))
        rates = {name: tokens / statistics.median(s) for name, s in seconds.items()}
        for name, rate in rates.items():
            print(f"{name:>10}: {rate:7.1f} useful tokens/s (median of {args.repeats} passes over {tokens} tokens)")
        print(f"ratio fast path vs plain: {rates['fast path'] / rates['plain']:.2f}")
        print(f"ratio kernels vs no kernels: {rates['fast path'] / rates['no kernels']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
