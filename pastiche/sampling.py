"""The sampling interface every backend implements: parameters, chunks, and the stop logic.

Both backends format requests with ``pastiche.chat``, decode with the run's tokenizer and
share :class:`Tracker`, so a prompt and a seed mean the same thing in each.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pastiche import chat
from pastiche.config import GenerateConfig
from pastiche.errors import PasticheError

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerateConfig)}


@dataclass
class SamplingParams:
    """How to sample (defaults: GenerateConfig's). temperature 0 is greedy; seed None is random.

    Setting ``cancel`` (e.g. when an HTTP client disconnects) ends the generation after the
    current token with finish_reason "stop".
    """

    temperature: float = _DEFAULTS["temperature"]
    top_p: float = _DEFAULTS["top_p"]
    top_k: int = _DEFAULTS["top_k"]
    repetition_penalty: float = _DEFAULTS["repetition_penalty"]
    max_new_tokens: int = _DEFAULTS["max_new_tokens"]
    seed: int | None = _DEFAULTS["seed"]
    stop: list[str] = field(default_factory=list)
    cancel: threading.Event | None = None

    @classmethod
    def from_config(cls, cfg) -> SamplingParams:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(cfg).items() if k in names})

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


@dataclass
class Chunk:
    text: str
    finish_reason: str | None  # set on the last chunk only: "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float = 0.0


class Tracker:
    """Token ids -> text for one sample: ends at an end-of-turn id, a stop string or max tokens,
    and holds back text that may be the start of a stop string or of a multi-byte character."""

    def __init__(self, decode: Callable, stop_ids: set[int], stops: list[str], max_new_tokens: int,
                 prompt_ids: list[int]):
        self.decode, self.stop_ids, self.stops, self.max_new = decode, stop_ids, stops, max_new_tokens
        self.prompt_ids, self.prompt_tokens, self.ids, self.count = prompt_ids, len(prompt_ids), [], 0
        self.text, self.emitted, self.finish_reason = "", 0, None

    def push(self, token: int) -> bool:
        """Add one generated token; True when this sample is finished."""
        self.count += 1
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return True
        self.ids.append(token)
        self.text = self.decode(self.ids)
        for stop in self.stops:
            if (at := self.text.find(stop)) >= 0:
                self.text, self.finish_reason = self.text[:at], "stop"
        if self.finish_reason is None and self.count >= self.max_new:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def finish(self, reason: str) -> None:
        self.finish_reason = self.finish_reason or reason

    def take(self) -> str:
        """Text that is safe to show and was not shown yet."""
        end = len(self.text) if self.finish_reason else self._safe_end()
        new, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return new

    def _safe_end(self) -> int:
        text = self.text.rstrip("\ufffd")
        held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return len(text) - held

    def chunk(self, text: str) -> Chunk:
        return Chunk(text, self.finish_reason, self.prompt_tokens, self.count)

    def completion(self, seconds: float) -> Completion:
        return Completion(self.text, self.finish_reason or "stop", self.prompt_tokens, self.count, seconds)


class Generator:
    """A model that writes: ``stream`` one request, ``generate_batch`` many (item i uses seed + i)."""

    name: str
    context_length: int
    tokenizer: object

    def stream(self, messages: list[dict] | None, params: SamplingParams, prompt: str | None = None) -> Iterator[Chunk]:
        """Chunks of the answer to ``messages`` (chat-formatted), or the raw continuation of ``prompt``."""
        tracker = self._tracker(self._prompt_ids(messages, prompt), params)
        for _ in self._decode([tracker], params, [params.seed]):
            if tracker.finish_reason:
                break
            if text := tracker.take():
                yield tracker.chunk(text)
        tracker.finish("stop")  # only when cancelled before the end
        yield tracker.chunk(tracker.take())

    def complete(self, messages: list[dict] | None, params: SamplingParams, prompt: str | None = None) -> Completion:
        start = time.perf_counter()
        tracker = self._tracker(self._prompt_ids(messages, prompt), params)
        for _ in self._decode([tracker], params, [params.seed]):
            pass
        tracker.finish("stop")
        return tracker.completion(time.perf_counter() - start)

    def generate_batch(self, list_of_messages: list[list[dict]], params: SamplingParams) -> list[Completion]:
        return [self.complete(m, dataclasses.replace(params, seed=_seed_for(params.seed, i)))
                for i, m in enumerate(list_of_messages)]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def variant(self, use_adapter: bool) -> Generator:
        """The same model with the adapter on or off (shares weights where the backend allows)."""
        raise NotImplementedError

    def _decode(self, trackers: list[Tracker], params: SamplingParams, seeds: list[int | None]) -> Iterator[None]:
        """Generate for every tracker's prompt, pushing tokens; yields after each step."""
        raise NotImplementedError

    def _prompt_ids(self, messages: list[dict] | None, prompt: str | None) -> list[int]:
        if messages is None and prompt is None:
            raise PasticheError("a generation request needs messages or a prompt.")
        text = prompt if messages is None else chat.prompt_text(self.tokenizer, messages)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _tracker(self, prompt_ids: list[int], params: SamplingParams) -> Tracker:
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise PasticheError(f"the prompt is {len(prompt_ids)} tokens; {self.name} holds {self.context_length}.")
        stop_ids = set(chat.stop_token_ids(self.tokenizer))
        stops = [s for s in [*chat.stop_strings(self.tokenizer), *params.stop] if s]
        return Tracker(self._decode_text, stop_ids, stops, min(params.max_new_tokens, room), prompt_ids)

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _seed_for(seed: int | None, index: int) -> int:
    return random.randrange(2**31) if seed is None else seed + index
