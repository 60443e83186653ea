"""The routes of `pastiche serve`: the page and its helpers, OpenAI's /v1, auth, error bodies.

Ollama's /api routes live in serve_ollama.py. Errors on /api/ use Ollama's shape
({"error": "..."}), everything else OpenAI's ({"error": {"message", "type", "param", "code"}}).
No exception text ever reaches a client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from pastiche import api
from pastiche.errors import PasticheError
from pastiche.serve import PAGE, ApiError, Engine

log = logging.getLogger("pastiche.serve")
router = APIRouter()
PROTECTED = ("/v1/", "/api/", "/pastiche/")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error"}


def engine(request: Request) -> Engine:
    return request.app.state.engine


# --- errors and guards --------------------------------------------------------------------

def error_response(path: str, status: int, message: str, param: str | None = None, code: str | None = None):
    if path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    return JSONResponse(api.openai_error(message, ERROR_TYPES.get(status, "invalid_request_error"), param, code),
                        status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON.", None
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(where) or None
    if param is None:
        return "the request body must be a JSON object.", None
    return f"{param}: {first.get('msg', 'invalid value')}.", param


def install_error_handlers(app) -> None:
    async def on_api_error(request: Request, exc: ApiError):
        return error_response(request.url.path, exc.status, exc.message, exc.param, exc.code)

    async def on_invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(request.url.path, 400, message, param)

    async def on_http(request: Request, exc: HTTPException):
        return error_response(request.url.path, exc.status_code, str(exc.detail))

    async def on_crash(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(request.url.path, 500, "internal server error.")

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_crash)


def document_model_names(app, names: list[str]) -> None:
    """List the served model names in /openapi.json, so readers (and fuzzers) see what is valid."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = plain()
            for component in schema.get("components", {}).get("schemas", {}).values():
                model = component.get("properties", {}).get("model", {})
                for option in [model, *model.get("anyOf", [])]:
                    if option.get("type") == "string":
                        option["enum"] = names + [f"{n}:latest" for n in names]
            for operation in schema["paths"].get("/v1/models/{model}", {}).values():
                operation["parameters"][0]["schema"]["enum"] = names
        return app.openapi_schema

    app.openapi = openapi


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes.")


class Guard:
    """ASGI middleware: bearer-token check on API routes and a cap on request body size."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], dict(scope["headers"])
        if self.api_key and path.startswith(PROTECTED) and not self._authorized(headers):
            response = error_response(path, 401, "missing or wrong API key; send it as 'Authorization: Bearer KEY'.",
                                      code="invalid_api_key")
            return await response(scope, receive, send)
        if int(headers.get(b"content-length", b"0") or 0) > self.max_body:
            return await error_response(path, 413, BodyTooLarge(self.max_body).message)(scope, receive, send)
        if scope["method"] == "POST" and b"json" not in headers.get(b"content-type", b""):
            # Ollama reads every body as JSON whatever its type (curl -d sends a form type), so do we.
            scope = {**scope, "headers": [*((k, v) for k, v in scope["headers"] if k != b"content-type"),
                                          (b"content-type", b"application/json")]}
        body = await self._read_body(receive)
        if body is None:
            return await error_response(path, 413, BodyTooLarge(self.max_body).message)(scope, receive, send)
        replayed = False

        async def replay():  # the body once, then the real channel (which reports disconnects)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or None once it outgrows the cap (a chunked body has no length up front)."""
        parts, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client left; the app will see the disconnect
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                return None
        return b"".join(parts)

    def _authorized(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


# --- shared plumbing ----------------------------------------------------------------------

def chat_messages(messages: list[api.Message]) -> list[dict]:
    """Plain {role, content} dicts; roles a chat template may not know become ones it does."""
    roles = {"developer": "system", "tool": "user"}
    return [{"role": roles.get(m.role, m.role), "content": m.text()} for m in messages]


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(request: Request, chunks: AsyncIterator) -> tuple[str, Any] | None:
    """Whole answer for a non-streaming request; None (generation cancelled) if the client left."""
    async def gather():
        parts, last = [], None
        async for chunk in chunks:
            parts.append(chunk.text)
            last = chunk
        return "".join(parts), last

    answer, watcher = asyncio.ensure_future(gather()), asyncio.ensure_future(_until_disconnected(request))
    await asyncio.wait({answer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if not answer.done():
        answer.cancel()
        return None
    return answer.result()


async def guarded(events: AsyncIterator[str], error_event: str) -> AsyncIterator[str]:
    """A stream whose server-side failure ends it with one error event instead of a broken connection."""
    try:
        async for event in events:
            yield event
    except Exception:  # noqa: BLE001 - the status line is already sent; report in-band
        log.exception("generation failed mid-stream")
        yield error_event


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def ndjson(body: dict) -> str:
    return json.dumps(body, ensure_ascii=False) + "\n"


def prepare(request: Request, model: str, messages, prompt, param: str, live: bool, **sampling):
    """Resolve the model, bound the request and start its generation (queued until a slot frees).

    ``live`` streams chunk by chunk; otherwise the worker hands over the whole answer at once,
    which spares a thread hand-off (and a GIL switch) per token."""
    from jinja2 import TemplateError

    eng = engine(request)
    name, generator = eng.resolve(model)
    params = eng.params(**sampling)
    try:
        eng.check_prompt(generator, messages, prompt, param)
    except TemplateError as exc:  # e.g. a template that insists on alternating user/assistant turns
        raise ApiError(400, f"{param}: cannot be formatted with this model's chat template ({exc}).", param) from exc
    return name, eng.stream(generator, messages, params, prompt, live)


# --- the page and pastiche's own helpers ----------------------------------------------------

@router.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


class PieceRequest(BaseModel):
    title: str | None = Field(None, max_length=500)
    group: str | None = Field(None, max_length=500)
    prompt: str | None = Field(None, max_length=20_000)


@router.get("/pastiche/info", summary="What the page needs: model names, series, defaults.")
async def info(request: Request) -> dict:
    from pastiche.generate import SamplingParams

    eng, defaults = engine(request), SamplingParams()
    names = list(eng.served)
    return {"tuned": names[0], "base": names[1] if len(names) > 1 else None, "series": eng.series,
            "temperature": defaults.temperature, "max_tokens": min(defaults.max_new_tokens, eng.max_tokens_limit),
            "max_tokens_limit": eng.max_tokens_limit}


@router.post("/pastiche/messages", summary="Chat messages for a new piece, phrased like the training prompts.")
async def piece_messages(body: PieceRequest, request: Request) -> dict:
    from pastiche.generate import request_messages

    try:
        return {"messages": request_messages(engine(request).folder, body.title, body.group, body.prompt)}
    except PasticheError as exc:
        raise ApiError(400, "give a prompt, or a title and/or a series, to say what to write.") from exc


# --- OpenAI -------------------------------------------------------------------------------

@router.get("/v1/models", summary="OpenAI: the served models.")
async def openai_models(request: Request) -> dict:
    created = int(engine(request).started)
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "pastiche"}
                                       for name in engine(request).served]}


@router.get("/v1/models/{model}", summary="OpenAI: one served model.")
async def openai_model(model: str, request: Request) -> dict:
    name, _ = engine(request).resolve(model)
    return {"id": name, "object": "model", "created": int(engine(request).started), "owned_by": "pastiche"}


def _openai_sampling(body: api.OpenAISampling, max_tokens: int | None) -> dict:
    return {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "seed": body.seed, "stop": api.stop_list(body.stop)}


@router.post("/v1/chat/completions", summary="OpenAI: chat completion, streamed (SSE) or not.")
async def chat_completions(body: api.ChatCompletionRequest, request: Request):
    messages = chat_messages(body.messages)
    name, chunks = prepare(request, body.model, messages, None, "messages", body.stream,
                           **_openai_sampling(body, body.max_completion_tokens or body.max_tokens))
    return await _openai_response(request, body, chunks, api.completion_id("chatcmpl"), name, _chat_events,
                                  lambda cid, text, last: api.chat_completion(
                                      cid, name, text, last.finish_reason, last.prompt_tokens, last.completion_tokens))


async def _openai_response(request: Request, body, chunks, cid: str, name: str, events, whole):
    """An SSE stream of ``events`` when the body asks for one, else ``whole(cid, text, last chunk)``."""
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse_response(events(chunks, cid, name, usage))
    result = await collect(request, chunks)
    if result is None:
        return Response(status_code=499)
    text, last = result
    return whole(cid, text, last)


async def _chat_events(chunks, cid: str, name: str, include_usage: bool) -> AsyncIterator[str]:
    yield sse(api.chat_chunk(cid, name, {"role": "assistant", "content": ""}, None))
    async for chunk in chunks:
        last = chunk
        if chunk.text:
            yield sse(api.chat_chunk(cid, name, {"content": chunk.text}, None))
    yield sse(api.chat_chunk(cid, name, {}, last.finish_reason))
    if include_usage:
        yield sse({**api.chat_chunk(cid, name, {}, None), "choices": [],
                   "usage": api.usage(last.prompt_tokens, last.completion_tokens)})
    yield "data: [DONE]\n\n"


@router.post("/v1/completions", summary="OpenAI: raw text completion, streamed (SSE) or not.")
async def completions(body: api.CompletionRequest, request: Request):
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    name, chunks = prepare(request, body.model, None, prompt, "prompt", body.stream,
                           **_openai_sampling(body, body.max_tokens))
    return await _openai_response(request, body, chunks, api.completion_id("cmpl"), name, _completion_events,
                                  lambda cid, text, last: api.text_completion(
                                      cid, name, text, last.finish_reason, (last.prompt_tokens, last.completion_tokens)))


async def _completion_events(chunks, cid: str, name: str, include_usage: bool) -> AsyncIterator[str]:
    async for chunk in chunks:
        last = chunk
        if chunk.text:
            yield sse(api.text_completion(cid, name, chunk.text, None, None))
    counts = (last.prompt_tokens, last.completion_tokens) if include_usage else None
    yield sse(api.text_completion(cid, name, "", last.finish_reason, counts))
    yield "data: [DONE]\n\n"


def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    failure = sse(api.openai_error("internal server error.", "server_error")) + "data: [DONE]\n\n"
    return StreamingResponse(guarded(events, failure), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

