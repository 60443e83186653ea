"""Serving overhead: tokens/s through `pastiche serve`'s API vs llama-cpp-python called directly.

    python benchmarks/serve_throughput.py [EXPORT_OR_RUN] [--tokens 128] [--repeats 7] [--clients 8]

Every side uses the same loaded llama.cpp model (GGUF, plus the GGUF adapter of an export) and
samples the same raw prompt with the same seed and sampling options: (a) llama-cpp-python's
``create_completion`` called directly; (b) pastiche's Generator in-process (the server's path
without HTTP); (c) POST /v1/completions to a real server on 127.0.0.1 (uvicorn, worker thread,
our stop logic, JSON over HTTP) through the openai client. (a) and (b) run on a fresh thread
each time, as the server's generations do. Sides alternate, `--repeats` times each; median
tokens/s are compared (target: (c) within 10% of (a)). Then `--clients` streaming requests
start at once and the p50/p95 time to first token is reported (they queue behind
`--concurrency` slots, so it grows with the queue).

Without a folder it serves the embedded base GGUF (SmolLM2-135M-Instruct Q4_1), no adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# llama.cpp here runs on OpenMP; each calling thread gets its own team, and idle teams that
# spin-wait steal the cores from the busy one on a small machine. Passive waiting keeps the
# sides independent of which thread ran last (set before llama.cpp or torch load libgomp).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PROMPT = "The harbour city kept its lanterns lit all night, and the travellers who came by sea"
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 50, "repeat_penalty": 1.1}


def load_served(folder: str | None):
    """A llama.cpp Generator: the export's (base GGUF + adapter, or merged), or the embedded base."""
    from pastiche import models
    from pastiche.engines import LlamaCppGenerator
    from pastiche.generate import load_generator

    if folder:
        return load_generator(folder, backend="llama.cpp")
    base = models.resolve_base("embedded")
    return LlamaCppGenerator(Path(base.path), None, models.load_tokenizer(base), "smollm2-135m")


def in_fresh_thread(function, *args):
    """Run on a new thread, as the server runs each generation: same scheduling for every side."""
    with ThreadPoolExecutor(1) as worker:
        return worker.submit(function, *args).result()


def direct_tokens_per_second(llm, tokens: int, seed: int) -> tuple[float, int]:
    began = time.perf_counter()
    out = llm.create_completion(PROMPT, max_tokens=tokens, seed=seed, min_p=0.0, typical_p=1.0,
                                temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"],
                                top_k=SAMPLING["top_k"], repeat_penalty=SAMPLING["repeat_penalty"])
    made = out["usage"]["completion_tokens"]
    return made / (time.perf_counter() - began), made


def generator_tokens_per_second(served, tokens: int, seed: int) -> tuple[float, int]:
    """pastiche's Generator called in-process: the server's path without HTTP."""
    from pastiche.generate import SamplingParams

    params = SamplingParams(temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"], top_k=SAMPLING["top_k"],
                            repetition_penalty=SAMPLING["repeat_penalty"], max_new_tokens=tokens, seed=seed)
    began = time.perf_counter()
    for chunk in served.stream(None, params, prompt=PROMPT):
        made = chunk.completion_tokens
    return made / (time.perf_counter() - began), made


def api_tokens_per_second(client, model: str, tokens: int, seed: int) -> tuple[float, int]:
    began = time.perf_counter()
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=tokens, seed=seed,
                                    temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"])
    made = out.usage.completion_tokens
    return made / (time.perf_counter() - began), made


def time_to_first_token(url: str, model: str, clients: int, tokens: int) -> tuple[list[float], list[int]]:
    """Seconds to the first text of each of ``clients`` streams started together, and tokens each made."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    waits: list[float] = []
    made: list[int] = []
    start = threading.Barrier(clients)

    def one(i: int) -> None:
        start.wait()
        began, first = time.perf_counter(), None
        stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=tokens, seed=i, stream=True,
                                           stream_options={"include_usage": True})
        for event in stream:
            if first is None and event.choices and event.choices[0].text:
                first = time.perf_counter() - began
            if event.usage:
                made.append(event.usage.completion_tokens)
        waits.append(first)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(waits), made


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", help="export (or run with export/) folder; default: embedded base GGUF")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per throughput request")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients for time to first token")
    parser.add_argument("--ttft-tokens", type=int, default=32, help="max_tokens of each concurrent request")
    parser.add_argument("--concurrency", type=int, default=1, help="the server's --concurrency")
    args = parser.parse_args()

    import openai

    from pastiche.config import ServeConfig
    from pastiche.serve import create_app, running

    served = load_served(args.folder)
    # The very llama.cpp context the server uses: a second copy's idle threads would skew the comparison.
    llm = served.llm
    cfg = ServeConfig(model=args.folder or "embedded", concurrency=args.concurrency)
    with running(create_app(served, cfg)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        api_tokens_per_second(client, served.name, 8, 0)  # warm both sides once (page in the weights)
        in_fresh_thread(direct_tokens_per_second, llm, 8, 0)
        direct, generator, api = [], [], []
        for seed in range(1, args.repeats + 1):
            direct.append(in_fresh_thread(direct_tokens_per_second, llm, args.tokens, seed))
            generator.append(in_fresh_thread(generator_tokens_per_second, served, args.tokens, seed))
            api.append(api_tokens_per_second(client, served.name, args.tokens, seed))
        waits, made = time_to_first_token(url, served.name, args.clients, args.ttft_tokens)

    direct_tps = statistics.median(t for t, _ in direct)
    api_tps = statistics.median(t for t, _ in api)
    overhead = 1 - api_tps / direct_tps
    best_overhead = 1 - max(t for t, _ in api) / max(t for t, _ in direct)  # less sensitive to a busy machine
    adapter = f" + {served.lora_path.name}" if served.lora_path else ""
    print(f"model: {served.model_path.name}{adapter}  ({args.tokens} tokens/request, median of {args.repeats}, "
          f"{os.cpu_count()} CPU threads)")
    print(f"  llama-cpp-python direct : {direct_tps:8.1f} tokens/s  (tokens made: {[n for _, n in direct]})")
    print(f"  pastiche Generator      : {statistics.median(t for t, _ in generator):8.1f} tokens/s  "
          f"(in-process, no HTTP; tokens made: {[n for _, n in generator]})")
    print(f"  pastiche serve API      : {api_tps:8.1f} tokens/s  (tokens made: {[n for _, n in api]})")
    print(f"  API overhead            : {overhead:8.1%}  (best run vs best run: {best_overhead:.1%}; "
          f"target <= 10%: {'met' if overhead <= 0.10 else 'NOT met'})")
    print(f"time to first token, {args.clients} concurrent streaming clients, --concurrency {args.concurrency}, "
          f"{args.ttft_tokens} tokens each: p50 {percentile(waits, 50):.2f} s, p95 {percentile(waits, 95):.2f} s "
          f"({len(waits)}/{args.clients} answered, tokens made: {sorted(made)})")
    print(json.dumps({"direct_tokens_per_s": round(direct_tps, 2), "api_tokens_per_s": round(api_tps, 2),
                      "overhead": round(overhead, 4), "best_overhead": round(best_overhead, 4), "ttft_p50_s": round(percentile(waits, 50), 3),
                      "ttft_p95_s": round(percentile(waits, 95), 3), "clients": args.clients,
                      "concurrency": args.concurrency}))


if __name__ == "__main__":
    main()
