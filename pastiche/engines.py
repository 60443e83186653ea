"""The two backends of the sampling interface: PyTorch + PEFT, and llama.cpp (llama-cpp-python)."""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

from pastiche import chat, models
from pastiche.errors import PasticheError
from pastiche.sampling import Completion, Generator, SamplingParams, Tracker, _seed_for

LLAMA_CPP_CONTEXT = 4096  # enough for any record prepare writes, small enough for a 7B KV cache
BATCH_SIZE = 16  # rows decoded together by TorchGenerator.generate_batch
# Tuned and base variants share one model and toggle its adapter per step, so every forward
# pass on a model holds that model's lock: concurrent requests never see the other's state.
_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class TorchGenerator(Generator):
    """transformers (+ PEFT adapter); batches of rows decoded together with left padding."""

    def __init__(self, model, tokenizer, name: str, use_adapter: bool):
        import torch

        self.model, self.tokenizer, self.name, self.use_adapter = model, tokenizer, name, use_adapter
        chat.ensure_template(tokenizer)
        self.context_length = getattr(model.config, "max_position_embeddings", None) or 2048
        self.device = next(model.parameters()).device
        self._torch = torch
        self._step_lock = _MODEL_LOCKS.setdefault(model, threading.Lock())
        # transformers 5 renamed past_key_values to cache; older releases lack logits_to_keep.
        forward = getattr(model, "get_base_model", lambda: model)().forward
        params = inspect.signature(forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keep_kwarg = "logits_to_keep" if "logits_to_keep" in params else None

    @classmethod
    def load(cls, base: models.BaseModel, adapter: Path | None, tokenizer_dir: Path | None, name: str) -> TorchGenerator:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = models.load_model(base, dtype="bfloat16" if device == "cuda" else "float32", device=device)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        model.eval()
        tokenizer = load_hf_tokenizer(tokenizer_dir) if tokenizer_dir else models.load_tokenizer(base)
        return cls(model, tokenizer, name, adapter is not None)

    def variant(self, use_adapter: bool) -> TorchGenerator:
        if use_adapter and not hasattr(self.model, "disable_adapter"):
            raise PasticheError(f"{self.name} was loaded without an adapter.")
        name = self.name.removesuffix(" (base)") + ("" if use_adapter else " (base)")
        return TorchGenerator(self.model, self.tokenizer, name, use_adapter)

    def generate_batch(self, list_of_messages: list[list[dict]], params: SamplingParams,
                       batch_size: int = BATCH_SIZE) -> list[Completion]:
        """Rows sorted by prompt length and decoded ``batch_size`` at a time; item i uses seed + i."""
        trackers = [self._tracker(self._prompt_ids(m, None), params) for m in list_of_messages]
        seeds = [_seed_for(params.seed, i) for i in range(len(trackers))]
        order = sorted(range(len(trackers)), key=lambda i: len(trackers[i].prompt_ids))
        seconds = [0.0] * len(trackers)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            began = time.perf_counter()
            for _ in self._decode([trackers[i] for i in rows], params, [seeds[i] for i in rows]):
                pass
            for i in rows:
                trackers[i].finish("stop")
                seconds[i] = time.perf_counter() - began
        return [t.completion(s) for t, s in zip(trackers, seconds)]

    def completion_nll(self, pairs: list[tuple[list[int], list[int]]], batch_size: int = 4) -> list[tuple[float, int]]:
        """(summed negative log-likelihood, token count) of each completion given its prompt.

        Pairs are batched in length order (little padding) and answered in the given order."""
        torch = self._torch
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        results: list = [None] * len(pairs)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = [pairs[i] for i in rows]
            width = max(len(p) + len(c) for p, c in batch)
            ids = torch.tensor([p + c + [0] * (width - len(p) - len(c)) for p, c in batch], device=self.device)
            mask = torch.tensor([[1] * (len(p) + len(c)) + [0] * (width - len(p) - len(c)) for p, c in batch],
                                device=self.device)
            with torch.inference_mode(), self._adapter_state():
                logits = self.model(input_ids=ids, attention_mask=mask).logits
            for row, (p, c) in enumerate(batch):
                scores = logits[row, len(p) - 1:len(p) + len(c) - 1].float().log_softmax(-1)
                target = torch.tensor(c, device=self.device)[:, None]
                results[rows[row]] = (-float(scores.gather(1, target).sum()), len(c))
        return results

    @contextlib.contextmanager
    def _adapter_state(self):
        with self._step_lock:
            if hasattr(self.model, "disable_adapter") and not self.use_adapter:
                with self.model.disable_adapter():
                    yield
            else:
                yield

    def _forward(self, ids, mask, positions, cache):
        torch = self._torch
        kwargs = {self._cache_kwarg: cache, "use_cache": True}
        if self._keep_kwarg:
            kwargs[self._keep_kwarg] = 1  # only the last position's logits are needed
        with torch.inference_mode(), self._adapter_state():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits[:, -1, :].float()

    def _decode(self, trackers: list[Tracker], params: SamplingParams, seeds: list[int | None]) -> Iterator[None]:
        torch = self._torch
        from transformers import DynamicCache

        width = max(len(t.prompt_ids) for t in trackers)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(t.prompt_ids)) + t.prompt_ids for t in trackers], device=self.device)
        mask = torch.tensor([[0] * (width - len(t.prompt_ids)) + [1] * len(t.prompt_ids) for t in trackers], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        rngs = [torch.Generator(device=self.device).manual_seed(_seed_for(s, 0)) for s in seeds]
        seen = _seen_tokens(torch, trackers, self.model_vocab(), self.device)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache)
        active = list(range(len(trackers)))
        while active:
            tokens = _pick(torch, logits, params, seen, [rngs[r] for r in active])
            keep = [j for j, r in enumerate(active) if not trackers[r].push(int(tokens[j]))]
            yield
            if params.cancelled or not keep:
                return
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                tokens, mask, positions, seen = tokens[index], mask[index], positions[index], seen[index]
                active = [active[j] for j in keep]
            seen.scatter_(1, tokens[:, None], True)
            seen[:, list(trackers[0].stop_ids)] = False
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            positions = positions[:, -1:] + 1
            logits = self._forward(tokens[:, None], mask, positions, cache)

    def model_vocab(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]


def _seen_tokens(torch, trackers: list[Tracker], vocab: int, device):
    """(rows, vocab) bools: tokens in each prompt; the end-of-turn ids are never penalized,
    else every chat prompt (which contains them) would make stopping less likely."""
    seen = torch.zeros(len(trackers), vocab, dtype=torch.bool, device=device)
    for row, tracker in enumerate(trackers):
        seen[row, tracker.prompt_ids] = True
    seen[:, list(trackers[0].stop_ids)] = False
    return seen


def _pick(torch, logits, params: SamplingParams, seen, rngs):
    """Next token per row: repetition penalty, then greedy or temperature/top-k/top-p sampling."""
    if params.repetition_penalty != 1.0:
        penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if params.temperature == 0:
        return logits.argmax(-1)
    # Sampling among the top-k candidates only (sorted) is much cheaper than over the vocabulary.
    values, candidates = torch.topk(logits / params.temperature, params.top_k or logits.shape[-1], dim=-1)
    if params.top_p < 1.0:
        probs = values.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest set reaching top_p
        values = values.masked_fill(drop, float("-inf"))
    probs = values.softmax(-1)
    picked = torch.cat([torch.multinomial(probs[j], 1, generator=g) for j, g in enumerate(rngs)])
    return candidates.gather(1, picked[:, None])[:, 0]


class LlamaCppGenerator(Generator):
    """llama.cpp through llama-cpp-python: a GGUF model, optionally with a GGUF LoRA adapter."""

    def __init__(self, model_path: Path, lora_path: Path | None, tokenizer, name: str, base_path: Path | None = None):
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise PasticheError("--backend llama.cpp needs llama-cpp-python: pip install llama-cpp-python") from exc
        self.model_path, self.lora_path, self.base_path = model_path, lora_path, base_path or model_path
        self.tokenizer, self.name = tokenizer, name
        chat.ensure_template(tokenizer)
        self.llm = Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None,
                         n_ctx=min(LLAMA_CPP_CONTEXT, trained_context(model_path)), n_threads=os.cpu_count(),
                         n_batch=512, verbose=False)
        # Close while the interpreter is intact: llama_cpp's own __del__ fails at shutdown.
        weakref.finalize(self, self.llm.close)
        self.context_length = self.llm.n_ctx()
        self._lock = threading.Lock()  # one llama.cpp context serves one generation at a time

    def variant(self, use_adapter: bool) -> LlamaCppGenerator:
        if use_adapter == (self.model_path != self.base_path or self.lora_path is not None):
            return self
        if use_adapter:
            raise PasticheError(f"{self.name} was loaded without an adapter.")
        return LlamaCppGenerator(self.base_path, None, self.tokenizer, self.name + " (base)")

    def _decode(self, trackers: list[Tracker], params: SamplingParams, seeds: list[int | None]) -> Iterator[None]:
        (tracker,), (seed,) = trackers, seeds
        with self._lock:
            self.llm.set_seed(_seed_for(seed, 0))
            # min_p and typical_p off, so the sampler matches the PyTorch backend's.
            tokens = self.llm.generate(tracker.prompt_ids, top_k=params.top_k, top_p=params.top_p, min_p=0.0,
                                       typical_p=1.0, temp=params.temperature,
                                       repeat_penalty=params.repetition_penalty, reset=True)
            for token in tokens:
                done = tracker.push(int(token))
                yield
                if done or params.cancelled:
                    return



def load_hf_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def trained_context(gguf_path: Path) -> int:
    """The context length a GGUF was trained with (its ``ARCH.context_length`` key)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    arch = reader.fields["general.architecture"]
    arch_name = bytes(arch.parts[arch.data[0]]).decode()
    field = reader.fields.get(f"{arch_name}.context_length")
    return int(field.parts[field.data[0]][0]) if field else LLAMA_CPP_CONTEXT
