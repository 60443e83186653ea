"""Prove the GGUF files behave like the PyTorch model: every position's next-token distribution.

Mean NLL alone is too blunt (a q/k-unpermuted adapter moves it by ~0.02 nats on the Q4 base
while per-token KL triples), so each file is judged on mean KL(PyTorch || llama.cpp), top-1
agreement, the NLL difference and, for float weights, a 32-token greedy continuation. Two
engines that agree to rounding may still pick different tokens where PyTorch's best two are
nearly tied; from there the continuations part ways, so the greedy check accepts a first
difference at a near-tie (within ``TIE_NATS``) and judges the tokens before it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pastiche.errors import PasticheError

FLOAT_MAX_KL = 1e-4  # float weights: only rounding separates the engines
QUANT_KL_RATIO, QUANT_KL_SLACK = 1.5, 1e-3  # quantized: the adapter may not add much to the base's own noise
QUANT_MAX_NLL_DIFF = 0.02  # nats per token
GREEDY_TOKENS = 32
TIE_NATS = 0.05  # PyTorch's log-probabilities of the two engines' picks closer than this: a tie


@dataclass
class Reference:
    """The PyTorch side: log-probabilities at every position and a greedy continuation."""

    texts: list[list[int]]
    logprobs: list[np.ndarray]  # per text: [len - 1, vocab], log-softmax of positions 0 .. len-2
    prompt: list[int]
    greedy: list[int]
    greedy_logprobs: np.ndarray  # [GREEDY_TOKENS, vocab]: PyTorch's distribution at each greedy step


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def torch_reference(model, texts: list[list[int]], prompt: list[int]) -> Reference:
    import torch

    model.eval()
    logprobs = []
    with torch.no_grad():
        for ids in texts:
            logits = model(torch.tensor([ids])).logits[0, :-1].float().numpy()
            logprobs.append(_log_softmax(logits).astype(np.float32))
        tokens, steps = _torch_greedy(model, prompt)
    return Reference(texts, logprobs, list(prompt), tokens, steps)


def _torch_greedy(model, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    import inspect

    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers renamed past_key_values to cache; pass whichever this version's forward takes
    cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    tokens, steps, cache, step = [], [], None, torch.tensor([prompt])
    for _ in range(GREEDY_TOKENS):
        out = model(input_ids=step, use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        cache = out.past_key_values if getattr(out, "cache", None) is None else out.cache
        logits = out.logits[0, -1].float().numpy()
        steps.append(_log_softmax(logits).astype(np.float32))
        tokens.append(int(logits.argmax()))
        step = torch.tensor([[tokens[-1]]])
    return tokens, np.stack(steps)


def greedy_agreement(ref: Reference, tokens: list[int]) -> dict:
    """Do llama.cpp's greedy tokens match PyTorch's, up to a first difference at a near-tie?"""
    differ = next((i for i, (a, b) in enumerate(zip(ref.greedy, tokens)) if a != b), None)
    if differ is None:
        return {"greedy_match": True, "greedy_diverged_at": None}
    step = ref.greedy_logprobs[differ]
    gap = float(step[ref.greedy[differ]] - step[tokens[differ]]) if tokens[differ] < len(step) else float("inf")
    return {"greedy_match": gap <= TIE_NATS, "greedy_diverged_at": differ, "greedy_tie_nats": gap}


@contextlib.contextmanager
def _llama(model_path: Path, lora_path: Path | None, n_ctx: int):
    from llama_cpp import Llama

    try:
        llm = Llama(str(model_path), lora_path=str(lora_path) if lora_path else None, logits_all=True,
                    n_ctx=n_ctx, n_batch=n_ctx, n_threads=min(4, os.cpu_count() or 1), seed=0, verbose=False)
    except ValueError as exc:  # llama.cpp logs the reason to stderr and returns no model/adapter
        raise PasticheError(f"verification failed: llama.cpp could not load {(lora_path or model_path).name} "
                            f"({exc}); the file does not fit the base.") from exc
    try:
        yield llm
    finally:
        llm.close()


def _llama_greedy(llm, prompt: list[int]) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    tokens = []
    for _ in range(GREEDY_TOKENS):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    return tokens


def measure(model_path: Path, ref: Reference, lora_path: Path | None = None) -> dict:
    """KL, top-1 agreement and NLLs of a GGUF (plus adapter) against the PyTorch reference."""
    n_ctx = max(max(len(t) for t in ref.texts), len(ref.prompt) + GREEDY_TOKENS) + 8
    kls, agree, nll_torch, nll_gguf = [], [], [], []
    with _llama(model_path, lora_path, n_ctx) as llm:
        for ids, p_log in zip(ref.texts, ref.logprobs):
            llm.reset()
            llm.eval(ids)
            vocab = p_log.shape[-1]
            q_log = _log_softmax(np.asarray(llm.scores[: len(ids) - 1])[:, :vocab])
            kls.append((np.exp(p_log) * (p_log - q_log)).sum(-1))
            agree.append(p_log.argmax(-1) == q_log.argmax(-1))
            targets = np.asarray(ids[1:])
            nll_torch.append(-p_log[np.arange(len(targets)), targets])
            nll_gguf.append(-q_log[np.arange(len(targets)), targets])
        greedy = _llama_greedy(llm, ref.prompt)
    cat = np.concatenate
    return {"file": str(model_path) if lora_path is None else str(lora_path),
            "kl": float(cat(kls).mean()), "top1": float(cat(agree).mean()),
            "nll_torch": float(cat(nll_torch).mean()), "nll_gguf": float(cat(nll_gguf).mean()),
            "positions": int(sum(len(k) for k in kls)),
            **greedy_agreement(ref, greedy), "greedy_torch": ref.greedy, "greedy_gguf": greedy}


def judge(result: dict, quantized: bool, base_kl: float | None) -> dict:
    """Add the rule used and whether it passed; quantized files are judged against the base's own noise."""
    nll_diff = abs(result["nll_gguf"] - result["nll_torch"])
    if not quantized:
        limit = FLOAT_MAX_KL
        passed = result["kl"] <= limit and result["greedy_match"]
        rule = (f"float weights: KL <= {limit:g} and {GREEDY_TOKENS} greedy tokens identical up to any first "
                f"difference at a near-tie (PyTorch log-probabilities within {TIE_NATS:g} nats)")
    else:
        limit = QUANT_KL_RATIO * (base_kl or 0.0) + QUANT_KL_SLACK
        passed = result["kl"] <= limit and nll_diff <= QUANT_MAX_NLL_DIFF
        rule = (f"quantized weights: KL <= {QUANT_KL_RATIO:g} x base KL + {QUANT_KL_SLACK:g} (= {limit:.5f}) "
                f"and |NLL difference| <= {QUANT_MAX_NLL_DIFF:g}")
    return {**result, "nll_diff": nll_diff, "kl_limit": limit, "rule": rule, "passed": bool(passed)}


def failure_message(name: str, result: dict) -> str:
    return (f"verification failed for {name}: KL(PyTorch || llama.cpp) {result['kl']:.5f} per token "
            f"(limit {result['kl_limit']:.5f}), top-1 agreement {result['top1']:.3f}, NLL {result['nll_gguf']:.4f} vs "
            f"{result['nll_torch']:.4f}, greedy tokens {greedy_summary(result)}; "
            f"the file does not behave like the trained model.")


def greedy_summary(result: dict) -> str:
    at = result.get("greedy_diverged_at")
    if at is None:
        return "equal" if result["greedy_match"] else "differ"
    return (f"equal for {at} tokens, then differ where PyTorch's log-probabilities of the two picks are "
            f"{result['greedy_tie_nats']:.3f} nats apart")
