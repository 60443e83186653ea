"""Ollama's routes for `pastiche serve`: /api/version, tags, ps, show, chat, generate.

Enough of Ollama's API that the official ollama client and Open WebUI work unchanged:
NDJSON streaming by default, the timing statistics on the last message, ':latest' tags.
"""

from __future__ import annotations

import hashlib
import time
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from pastiche import api
from pastiche.serve import ApiError
from pastiche.serve_routes import chat_messages, collect, engine, guarded, ndjson, prepare

router = APIRouter()


@router.get("/api/version", summary="Ollama: server version.")
async def ollama_version() -> dict:
    return {"version": api.OLLAMA_VERSION}


def _ollama_details(generator) -> dict:
    fmt = "gguf" if type(generator).__name__.startswith("LlamaCpp") else "safetensors"
    return {"parent_model": "", "format": fmt, "family": "pastiche", "families": ["pastiche"],
            "parameter_size": "", "quantization_level": ""}


@router.get("/api/tags", summary="Ollama: the served models.")
async def ollama_tags(request: Request) -> dict:
    eng = engine(request)
    modified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(eng.started))
    return {"models": [api.ollama_model_entry(f"{name}:latest", _ollama_details(gen), 0,
                                              hashlib.sha256(name.encode()).hexdigest(), modified)
                       for name, gen in eng.served.items()]}


@router.get("/api/ps", summary="Ollama: the loaded models (all of them, always).")
async def ollama_ps(request: Request) -> dict:
    tags = await ollama_tags(request)
    for entry, gen in zip(tags["models"], engine(request).served.values()):
        entry.update(expires_at="2999-01-01T00:00:00Z", size_vram=0, context_length=gen.context_length)
    return tags


@router.post("/api/show", summary="Ollama: details of one model.")
async def ollama_show(body: api.OllamaShowRequest, request: Request) -> dict:
    if not (body.model or body.name):
        raise ApiError(400, "model is required.", "model")
    name, generator = engine(request).resolve(body.model or body.name)
    return {"modelfile": f"# {name}, served by pastiche\n", "parameters": "", "template": "{{ .Prompt }}",
            "details": _ollama_details(generator), "capabilities": ["completion"],
            "model_info": {"general.architecture": "pastiche", "pastiche.context_length": generator.context_length},
            "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(engine(request).started))}


def _ollama_sampling(options: api.OllamaOptions | None, limit: int) -> dict:
    o = options or api.OllamaOptions()
    max_tokens = limit if o.num_predict is not None and o.num_predict <= 0 else o.num_predict
    return {"max_tokens": max_tokens, "temperature": o.temperature, "top_p": o.top_p, "top_k": o.top_k,
            "repetition_penalty": o.repeat_penalty, "seed": o.seed, "stop": api.stop_list(o.stop)}


def _loaded(name: str, field: dict) -> dict:
    """Ollama's answer to a request with nothing to generate: the model is (already) loaded."""
    return {"model": name, "created_at": api.now_iso(), **field, "done": True, "done_reason": "load"}


@router.post("/api/chat", summary="Ollama: chat, streamed (NDJSON, the default) or not.")
async def ollama_chat(body: api.OllamaChatRequest, request: Request):
    if not body.messages:
        name, _ = engine(request).resolve(body.model)
        return _loaded(name, {"message": {"role": "assistant", "content": ""}})
    sampling = _ollama_sampling(body.options, engine(request).max_tokens_limit)
    name, chunks = prepare(request, body.model, chat_messages(body.messages), None, "messages", body.stream,
                           **sampling)
    return await _ollama_answer(request, chunks, name, body.stream,
                                lambda text: {"message": {"role": "assistant", "content": text}})


@router.post("/api/generate", summary="Ollama: completion of a prompt, streamed (NDJSON, the default) or not.")
async def ollama_generate(body: api.OllamaGenerateRequest, request: Request):
    if not body.prompt:
        name, _ = engine(request).resolve(body.model)
        return _loaded(name, {"response": ""})
    sampling = _ollama_sampling(body.options, engine(request).max_tokens_limit)
    messages = None if body.raw else [*([{"role": "system", "content": body.system}] if body.system else []),
                                      {"role": "user", "content": body.prompt}]
    name, chunks = prepare(request, body.model, messages, body.prompt if body.raw else None, "prompt",
                           body.stream, **sampling)
    return await _ollama_answer(request, chunks, name, body.stream, lambda text: {"response": text})


async def _ollama_answer(request: Request, chunks, name: str, stream: bool, field):
    started = time.perf_counter()
    if stream:
        failure = ndjson({"error": "internal server error."})
        return StreamingResponse(guarded(_ollama_events(chunks, name, field, started), failure),
                                 media_type="application/x-ndjson")
    result = await collect(request, chunks)
    if result is None:
        return Response(status_code=499)
    text, last = result
    return {**api.ollama_final(name, last.finish_reason, last.prompt_tokens, last.completion_tokens, started, None),
            **field(text)}


async def _ollama_events(chunks, name: str, field, started: float) -> AsyncIterator[str]:
    first = None
    async for chunk in chunks:
        last = chunk
        if chunk.text:
            first = first or time.perf_counter()
            yield ndjson({"model": name, "created_at": api.now_iso(), **field(chunk.text), "done": False})
    final = api.ollama_final(name, last.finish_reason, last.prompt_tokens, last.completion_tokens, started, first)
    yield ndjson({**final, **field("")})
