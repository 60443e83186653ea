"""Request bodies and response shapes of the two APIs `pastiche serve` speaks: OpenAI and Ollama.

Only the fields pastiche acts on are declared (with the bounds that become the OpenAPI
schema); anything else a client sends is accepted and ignored, as OpenAI and Ollama do.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

OLLAMA_VERSION = "0.6.0"  # what /api/version reports; Ollama clients gate features on it


class Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(Lenient):
    type: str = "text"
    text: str | None = None


class Message(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class StreamOptions(Lenient):
    include_usage: bool = False


class OpenAISampling(Lenient):
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (bounded by the server).")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")


class ChatCompletionRequest(OpenAISampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(OpenAISampling):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        description="Raw text the model continues (batches are not supported: a list holds one string).")


class OllamaOptions(Lenient):
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=100_000)
    repeat_penalty: float | None = Field(None, gt=0, le=10)
    num_predict: int | None = Field(None, ge=-2, description="-1 or -2: as many as the server allows.")
    seed: int | None = None
    stop: list[str] | None = None


class OllamaChatRequest(Lenient):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(default_factory=list)
    stream: bool = True
    options: OllamaOptions | None = None


class OllamaGenerateRequest(Lenient):
    model: str = Field(min_length=1)
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    options: OllamaOptions | None = None


class OllamaShowRequest(Lenient):
    model: str | None = Field(None, min_length=1)
    name: str | None = Field(None, min_length=1, description="Older clients send the model as 'name'.")


def stop_list(stop: str | list[str] | None) -> list[str]:
    """Stop strings as a list; empty ones are dropped because they would match everywhere."""
    items = [stop] if isinstance(stop, str) else (stop or [])
    return [s for s in items if s]


# --- OpenAI responses ---------------------------------------------------------------------

def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(cid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(cid: str, model: str, delta: dict, finish: str | None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def text_completion(cid: str, model: str, text: str, finish: str | None, counts: tuple[int, int] | None) -> dict:
    body = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if counts is not None:
        body["usage"] = usage(*counts)
    return body


def openai_error(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- Ollama responses ---------------------------------------------------------------------

def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ollama_final(model: str, finish: str, prompt_tokens: int, completion_tokens: int,
                 started: float, first_token: float | None) -> dict[str, Any]:
    """The statistics Ollama puts on its last (done) message; durations in nanoseconds."""
    end = time.perf_counter()
    first = first_token or end
    return {"model": model, "created_at": now_iso(), "done": True, "done_reason": finish,
            "total_duration": int((end - started) * 1e9), "load_duration": 0,
            "prompt_eval_count": prompt_tokens, "prompt_eval_duration": int((first - started) * 1e9),
            "eval_count": completion_tokens, "eval_duration": int((end - first) * 1e9)}


def ollama_model_entry(name: str, details: dict, size: int, digest: str, modified: str) -> dict:
    return {"name": name, "model": name, "modified_at": modified, "size": size, "digest": digest,
            "details": details}
