"""The Trainer subclass and callbacks behind `pastiche train`.

Why the ``transformers`` Trainer and not a hand-written loop: it already does gradient
accumulation, schedules, checkpoint rotation, exact resume (optimizer, scheduler, RNG and
data position) and, through ``accelerate``, DDP / FSDP / DeepSpeed, so ``accelerate launch -m
pastiche train ...`` needs no code of ours. What we change is small and lives here:

* ``compute_loss`` asks the model for logits only where a completion token is predicted
  (``logits_to_keep`` as a boolean mask). With SmolLM2's 49,152-word vocabulary the output
  projection is a large share of the work, and the original recipe spent it on prompt and
  padding positions whose loss is thrown away.
* the data loaders use our length-grouped, token-budget batches (``pastiche.batching``).
* ``evaluate`` computes the token-weighted eval loss and perplexity exactly.
* callbacks: one progress bar, metrics.jsonl + train.log, and the best adapter by eval loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from pastiche import fastpath
from pastiche.batching import IGNORE, BudgetBatchSampler
from pastiche.errors import PasticheError


class TrainingDiverged(PasticheError):
    """The loss became NaN or infinite; the last good checkpoint stays on disk."""

    exit_code = 1


def completion_loss(model, batch: dict, head: tuple | None = None) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over completion tokens, their count), logits computed only there.

    With ``head`` ((model owning it, its frozen output layer), see ``fusable_head``) the model returns hidden states instead of
    logits and ``HeadCrossEntropy`` applies the head in chunks, so the [targets x vocabulary]
    logits never exist all at once.
    """
    labels = batch["labels"]
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE  # position i predicts token i + 1
    targets = labels[:, 1:][predicts[:, :-1]]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "useful_tokens")}
    if head is not None:
        with output_layer_removed(*head):
            hidden = model(**inputs, logits_to_keep=predicts, use_cache=False).logits
        if hidden.dim() == 2:
            return HeadCrossEntropy.apply(hidden, head[1].weight, targets), targets.numel()
    logits = model(**inputs, logits_to_keep=predicts, use_cache=False).logits
    if logits.dim() == 3:  # a model whose forward ignores a boolean logits_to_keep
        logits = logits[predicts]
    return F.cross_entropy(logits.float(), targets, reduction="sum"), targets.numel()


def fusable_head(model) -> tuple | None:
    """(transformers model, its output layer) if that layer is a plain frozen Linear, else None."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad:
        return inner, head
    return None


@contextlib.contextmanager
def output_layer_removed(inner, head):
    """Let the model return its final hidden states; autograd keeps the graph after we restore."""
    inner.set_output_embeddings(torch.nn.Identity())
    try:
        yield
    finally:
        inner.set_output_embeddings(head)


class HeadCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk.

    The gradient for ``hidden`` is computed in the forward pass, chunk by chunk, so peak memory
    holds one chunk of logits rather than all of them (0.8 GB of fp32 logits for 4096 targets
    over SmolLM2's 49,152 words, and again as much for their gradient)
    and nothing is recomputed. The frozen ``weight`` gets no gradient.
    """

    CHUNK = 256  # rows of logits at a time: 48 MB of fp32 for a 49,152-word vocabulary

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        device = hidden.device.type
        # The Trainer's autocast wraps only the model's forward, so it is off here: compute in the
        # precision the frozen head is stored in (bf16 when training in bf16), not in fp32.
        low = (torch.bfloat16, torch.float16)
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else \
            weight.dtype if weight.dtype in low else hidden.dtype
        w = weight.to(dtype)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], HeadCrossEntropy.CHUNK):
            h, t = hidden[start:start + HeadCrossEntropy.CHUNK].to(dtype), targets[start:start + HeadCrossEntropy.CHUNK]
            logits = h @ w.t()
            lib = fastpath.native(logits)
            if lib is not None:  # one pass turns the logits into their gradient, softmax - one_hot
                t = t.to(torch.int64).contiguous()
                total += lib.pst_cross_entropy_grad(logits.data_ptr(), t.data_ptr(), len(t), logits.shape[1],
                                                    fastpath.is_bf16(logits))
                if want_grad:
                    grad[start:start + len(t)] = (logits @ w).to(hidden.dtype)
                continue
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            total -= log_probs.gather(1, t[:, None]).sum()
            if want_grad:  # d loss / d logits = softmax - one_hot
                probs = log_probs.exp_()
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad[start:start + len(t)] = (probs.to(dtype) @ w).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None


class CompletionTrainer(Trainer):
    """Trainer with completion-only logits, token-budget batches and an exact eval loss."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the accumulated target count

    def __init__(self, *args, batch_tokens: int, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_tokens, self.batch_seed = batch_tokens, seed
        self.model_accepts_loss_kwargs = True  # so the Trainer counts targets across accumulation
        self.useful_tokens = 0  # non-padding input tokens seen in this process
        # Sharded (FSDP / DeepSpeed ZeRO-3) weights exist only inside the model's forward.
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        self.head = None if sharded else fusable_head(self.model)

    def _loader(self, dataset, shuffle: bool):
        from torch.utils.data import DataLoader

        sampler = BudgetBatchSampler([len(e) for e in dataset], self.batch_tokens, self.batch_seed, shuffle)
        return self.accelerator.prepare(DataLoader(dataset, batch_sampler=sampler, collate_fn=self.data_collator))

    def get_train_dataloader(self):
        return self._loader(self.train_dataset, shuffle=True)

    def get_eval_dataloader(self, eval_dataset=None):
        return self._loader(eval_dataset if eval_dataset is not None else self.eval_dataset, shuffle=False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss_sum, targets = completion_loss(model, inputs, self.head)
        self.useful_tokens += int(inputs["useful_tokens"])
        loss = loss_sum / (num_items_in_batch if num_items_in_batch is not None else max(targets, 1))
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        if not torch.isfinite(loss):
            raise TrainingDiverged(self._diverged_message(loss.item()))
        return (loss, None) if return_outputs else loss

    def _diverged_message(self, value: float) -> str:
        from pastiche.train import last_good_checkpoint

        checkpoint = last_good_checkpoint(Path(self.args.output_dir))
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint had been saved yet"
        return (f"the training loss became {value} at step {self.state.global_step + 1}; {kept} "
                "(lower --learning-rate, then --resume the run or start a new one).")

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        model = self.model_wrapped
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        with torch.no_grad():
            for batch in self.get_eval_dataloader(eval_dataset):
                loss_sum, targets = completion_loss(model, self._prepare_inputs(batch), self.head)
                totals += torch.tensor([loss_sum.item(), targets], dtype=torch.float64, device=totals.device)
        totals = self.accelerator.reduce(totals, "sum")
        loss = float(totals[0] / totals[1].clamp(min=1))
        metrics = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_perplexity": math.exp(min(loss, 50.0))}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class RunLog(TrainerCallback):
    """Every logged dict goes to metrics.jsonl (one JSON object a line) and train.log."""

    def __init__(self, metrics_path: Path, log):
        self.metrics_path, self.log = metrics_path, log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        with self.metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


class BestAdapter(TrainerCallback):
    """Keep the adapter with the lowest eval loss in RUN/adapter, replaced atomically."""

    def __init__(self, adapter_dir: Path):
        self.adapter_dir = adapter_dir

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        # state.best_metric still holds the previous best here (the Trainer updates it afterwards).
        if loss is None or (state.best_metric is not None and loss >= state.best_metric):
            return
        if state.is_world_process_zero:
            save_adapter(model, self.adapter_dir)


class NoFinalCheckpoint(TrainerCallback):
    """The Trainer checkpoints after the last step; a finished run deletes its checkpoints, so skip it."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and state.global_step % max(args.save_steps, 1) != 0:
            control.should_save = False
        return control


def save_adapter(model, adapter_dir: Path) -> None:
    tmp = adapter_dir.with_name(f".{adapter_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "README.md").unlink(missing_ok=True)  # PEFT's empty model card; the run folder describes itself
    shutil.rmtree(adapter_dir, ignore_errors=True)
    tmp.rename(adapter_dir)


class ProgressBar(TrainerCallback):
    """One tqdm bar: step, train loss, eval loss, useful tokens/s and (tqdm's) ETA."""

    def __init__(self, trainer: CompletionTrainer):
        self.trainer, self.bar, self.postfix = trainer, None, {}

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True)
            self.started, self.tokens_at_start = time.perf_counter(), self.trainer.useful_tokens

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.postfix["tok/s"] = f"{(self.trainer.useful_tokens - self.tokens_at_start) / elapsed:.0f}"
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, short in (("loss", "loss"), ("eval_loss", "eval")):
            if logs and key in logs:
                self.postfix[short] = f"{logs[key]:.3f}"

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def versions() -> dict:
    import peft
    import torch
    import transformers

    from pastiche import __version__

    return {"pastiche": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def plot_losses(metrics: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
