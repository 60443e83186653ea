"""`pastiche serve`: a web page plus OpenAI- and Ollama-compatible HTTP APIs over a run or export.

Generations run in worker threads, at most ``--concurrency`` at once; later requests wait in
a first-come queue. A client that disconnects sets its generation's cancel event, so the
worker stops after the current token and its slot goes to the next request.

Examples:
  pastiche serve runs/book-01/export
  pastiche serve runs/book-01 --host 0.0.0.0 --api-key "$KEY" --concurrency 2
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from pastiche import __version__, paths
from pastiche.config import ServeConfig
from pastiche.errors import PasticheError

log = logging.getLogger("pastiche.serve")
PAGE = Path(__file__).parent / "web" / "index.html"
MAX_BODY_BYTES = 1 << 20  # a request is a prompt and a few numbers; 1 MiB is generous
GREEDY_BELOW = 1e-2  # a smaller temperature would overflow the logits; treat it as greedy


class ApiError(Exception):
    """An error the client caused, sent as a JSON body in the API's own error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class Engine:
    """The served models, the queue in front of them, and request -> SamplingParams rules."""

    def __init__(self, served: dict[str, Any], folder: str | Path, concurrency: int, max_tokens_limit: int):
        self.served, self.folder, self.max_tokens_limit = served, Path(folder), max_tokens_limit
        self.slots = asyncio.Semaphore(concurrency)
        self.started = time.time()
        self.series = training_series(self.folder)

    def resolve(self, name: str) -> tuple[str, Any]:
        """The generator behind a model name; Ollama clients may add the ':latest' tag."""
        key = name.removesuffix(":latest")
        if key not in self.served:
            raise ApiError(404, f"model {name!r} not found; this server has {', '.join(self.served)}.",
                           "model", "model_not_found")
        return key, self.served[key]

    def params(self, *, max_tokens: int | None, temperature: float | None, top_p: float | None,
               top_k: int | None = None, repetition_penalty: float | None = None,
               seed: int | None, stop: list[str]):
        """SamplingParams: request values over generate's defaults; no seed means a fresh one."""
        from pastiche.generate import SamplingParams

        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be at most {self.max_tokens_limit} (this server's "
                                "--max-tokens-limit).", "max_tokens", "max_tokens_too_large")
        given = {"temperature": temperature, "top_p": top_p, "top_k": top_k,
                 "repetition_penalty": repetition_penalty, "max_new_tokens": max_tokens}
        params = SamplingParams(**{k: v for k, v in given.items() if v is not None},
                                seed=None if seed is None else seed % 2**31, stop=stop,
                                cancel=threading.Event())
        params.max_new_tokens = min(params.max_new_tokens, self.max_tokens_limit)
        if params.temperature < GREEDY_BELOW:
            params.temperature = 0.0
        return params

    def check_prompt(self, generator, messages: list[dict] | None, prompt: str | None, param: str) -> int:
        """Prompt tokens; a 400 naming the context length when the prompt leaves no room to answer."""
        from pastiche import chat

        text = prompt if messages is None else chat.prompt_text(generator.tokenizer, messages)
        count = generator.count_tokens(text)
        if count == 0:
            raise ApiError(400, f"{param}: is empty; give the model some text to continue.", param)
        if count >= generator.context_length:
            raise ApiError(400, f"the prompt is {count} tokens; this model's context holds "
                                f"{generator.context_length} tokens, prompt and answer together.",
                           param, "context_length_exceeded")
        return count

    async def stream(self, generator, messages: list[dict] | None, params, prompt: str | None, live: bool = True):
        """Chunks from a worker thread (one merged chunk unless ``live``); leaving early
        (disconnect, error) cancels the generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        await self.slots.acquire()
        worker = threading.Thread(target=self._work, daemon=True,
                                  args=(loop, queue, generator, messages, params, prompt, live))
        try:
            worker.start()
            while (item := await queue.get()) is not None:
                if isinstance(item, PasticheError):  # bad input the checks above did not foresee
                    raise ApiError(400, str(item))
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            params.cancel.set()
            if worker.ident is None:
                self.slots.release()  # the thread never started, so it cannot release

    def _work(self, loop, queue: asyncio.Queue, generator, messages, params, prompt, live: bool) -> None:
        def send(item) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop closed at shutdown
                loop.call_soon_threadsafe(queue.put_nowait, item)

        try:
            chunks = generator.stream(messages, params, prompt=prompt)
            if live:
                for chunk in chunks:
                    send(chunk)
            else:
                parts = list(chunks)
                send(dataclasses.replace(parts[-1], text="".join(c.text for c in parts)))
        except BaseException as exc:  # noqa: BLE001 - handed to the request, which logs it
            send(exc)
        finally:
            send(None)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.slots.release)


def training_series(folder: Path) -> list[str]:
    """The series (groups) of the pieces the run learned from, for the page's suggestions."""
    import yaml

    try:
        if (folder / paths.EXPORT_JSON).is_file():
            folder = Path(json.loads((folder / paths.EXPORT_JSON).read_text(encoding="utf-8"))["run"])
        data = Path(yaml.safe_load((folder / paths.CONFIG_YAML).read_text(encoding="utf-8"))["data"])
        pieces = json.loads((data / paths.PREPARE_JSON).read_text(encoding="utf-8"))["pieces"]
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return []  # best effort: the page works without suggestions
    return sorted({p["group"] for p in pieces.values() if p.get("group")})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(cfg: ServeConfig) -> None:
    if not is_loopback(cfg.host) and not cfg.api_key and not cfg.insecure:
        raise PasticheError(f"--host {cfg.host} is reachable from other machines: pass --api-key KEY "
                            "(clients send it as a bearer token) or --insecure to serve without one.")


def load_served(folder: str | Path, backend: str) -> dict[str, Any]:
    """{run name: tuned generator, 'run name-base': the base without the adapter, when it loads}."""
    from pastiche.generate import load_generator

    tuned = load_generator(folder, backend=backend)
    served = {tuned.name: tuned}
    try:
        served[f"{tuned.name}-base"] = tuned.variant(use_adapter=False)
    except (PasticheError, NotImplementedError) as exc:
        log.warning("serving without the base model: %s", exc)
    return served


def create_app(generator_or_folder, cfg: ServeConfig, base=None):
    """The FastAPI app; pass a loaded Generator (and optionally its base) or a run/export folder."""
    from fastapi import FastAPI

    from pastiche import serve_ollama, serve_routes

    if isinstance(generator_or_folder, (str, Path)):
        served = load_served(generator_or_folder, cfg.backend)
    else:
        served = {generator_or_folder.name: generator_or_folder}
        if base is not None:
            served[f"{generator_or_folder.name}-base"] = base
    app = FastAPI(title="pastiche", version=__version__, docs_url=None, redoc_url=None,
                  description="OpenAI- and Ollama-compatible API over a model fine-tuned by pastiche.")
    app.state.engine = Engine(served, cfg.model, cfg.concurrency, cfg.max_tokens_limit)
    app.include_router(serve_routes.router)
    app.include_router(serve_ollama.router)
    serve_routes.document_model_names(app, list(served))
    serve_routes.install_error_handlers(app)
    app.add_middleware(serve_routes.Guard, api_key=cfg.api_key, max_body=MAX_BODY_BYTES)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; binding here (not in uvicorn) tells us the port that 0 picked."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        raise PasticheError(f"--host/--port: cannot listen on {host}:{port} ({exc.strerror or exc}).") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _uvicorn_server(app, log_level: str):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=2,
                            access_log=log_level == "info")
    return uvicorn.Server(config)


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` from a background thread for the duration of the block; yields its URL."""
    sock = bind(host, port)
    server = _uvicorn_server(app, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        if not server.started:
            raise RuntimeError("the server did not start within 30 s")
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def serve(cfg: ServeConfig) -> None:
    """Load the model(s) and serve until interrupted."""
    check_exposure(cfg)
    sock = bind(cfg.host, cfg.port)
    app = create_app(cfg.model, cfg)
    names = ", ".join(app.state.engine.served)
    print(f"pastiche serve: {names} on {url_of(sock)}  (page: /, OpenAI: /v1, Ollama: /api)", flush=True)
    _uvicorn_server(app, "info").run(sockets=[sock])


def main(cfg: ServeConfig) -> int:
    serve(cfg)
    return 0
