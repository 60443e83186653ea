"""`pastiche serve` over a real tiny run: real uvicorn on 127.0.0.1, real openai/ollama clients."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from pastiche.config import ServeConfig
from pastiche.serve import create_app, load_served, running

LIMIT = 64  # --max-tokens-limit of the test servers


@pytest.fixture(scope="module")
def served(tiny_run):
    """The run's tuned generator and its base, loaded once for every server in this module."""
    return load_served(tiny_run, "auto")


def app_for(served, run, **options):
    """An app over the loaded generators; options are ServeConfig fields."""
    tuned, base = served.values()
    return create_app(tuned, ServeConfig(model=str(run), **{"max_tokens_limit": LIMIT, **options}), base=base)


def start(served, run, **options):
    """A server on a free port for the block."""
    return running(app_for(served, run, **options))


@pytest.fixture(scope="module")
def url(served, tiny_run):
    with start(served, tiny_run, concurrency=2) as address:
        yield address


@pytest.fixture(scope="module")
def names(served):
    return list(served)


def test_openai_models_and_chat(url, names, served):
    import openai

    from pastiche import chat

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == names == [names[0], f"{names[0]}-base"]
    messages = [{"role": "user", "content": "Write about the harbour."}]
    first = client.chat.completions.create(model=names[0], messages=messages, max_tokens=12, seed=7, temperature=0.9)
    again = client.chat.completions.create(model=names[0], messages=messages, max_tokens=12, seed=7, temperature=0.9)
    tuned = served[names[0]]
    expected_prompt = tuned.count_tokens(chat.prompt_text(tuned.tokenizer, messages))
    assert first.usage.prompt_tokens == expected_prompt
    assert first.usage.total_tokens == expected_prompt + first.usage.completion_tokens
    assert first.choices[0].finish_reason in ("stop", "length")
    assert (first.choices[0].finish_reason == "length") == (first.usage.completion_tokens == 12)
    assert first.choices[0].message.content == again.choices[0].message.content  # same seed, same text
    assert first.model == names[0]


def test_openai_stream_matches_non_stream(url, names):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    request = {"model": names[1], "messages": [{"role": "user", "content": "A bridge."}], "max_tokens": 10, "seed": 3}
    whole = client.chat.completions.create(**request)
    events = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == whole.choices[0].message.content
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == whole.choices[0].finish_reason
    assert events[-1].usage.completion_tokens == whole.usage.completion_tokens
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**request, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_openai_completions_and_stop(url, names):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    greedy = {"model": names[0], "prompt": "The lantern", "max_tokens": 16, "temperature": 0}
    full = client.completions.create(**greedy)
    text = full.choices[0].text
    assert full.usage.completion_tokens == 16 and full.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**greedy, stream=True))
    assert streamed == text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = client.completions.create(**greedy, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_ollama_client(url, names):
    import ollama

    client = ollama.Client(host=url)
    assert client.list().models[0].model == f"{names[0]}:latest"
    assert {m.model for m in client.list().models} == {f"{n}:latest" for n in names}
    assert client.show(names[0]).modelinfo["pastiche.context_length"] == 1024
    reply = client.chat(model=f"{names[0]}:latest", messages=[{"role": "user", "content": "hello"}],
                        options={"num_predict": 6, "seed": 1, "temperature": 0})
    assert reply.done and reply.message.role == "assistant" and reply.prompt_eval_count > 0
    assert reply.eval_count == 6 and reply.done_reason == "length"
    parts = list(client.generate(model=names[0], prompt="hello", stream=True, options={"num_predict": 6, "temperature": 0}))
    assert parts[-1].done and parts[-1].eval_count == 6 and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == client.generate(model=names[0], prompt="hello",
                                                                 options={"num_predict": 6, "temperature": 0}).response
    chat_stream = list(client.chat(model=names[1], messages=[{"role": "user", "content": "hi"}], stream=True,
                                   options={"num_predict": 4}))
    assert chat_stream[-1].done and chat_stream[-1].eval_count == 4
    assert httpx.get(f"{url}/api/version").json()["version"]


def test_eight_concurrent_requests_complete(url, names):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    results: dict[int, object] = {}

    def ask(i: int) -> None:
        results[i] = client.chat.completions.create(model=names[i % 2], messages=[{"role": "user", "content": f"piece {i}"}],
                                                    max_tokens=8, seed=i)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(results) == list(range(8))
    assert all(r.usage.completion_tokens in range(1, 9) for r in results.values())


def _seconds(call) -> float:
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


def test_disconnect_frees_the_slot(served, tiny_run, names):
    """With one slot, a dropped stream (or an abandoned plain request) must not make the next request wait."""
    request = {"model": names[0], "messages": [{"role": "user", "content": "go"}], "temperature": 1.0}
    with start(served, tiny_run, concurrency=1) as address:
        endpoint = f"{address}/v1/chat/completions"
        whole = httpx.post(endpoint, json={**request, "max_tokens": LIMIT, "seed": 11}, timeout=120)
        full = _seconds(lambda: httpx.post(endpoint, json={**request, "max_tokens": LIMIT, "seed": 11}, timeout=120))
        assert whole.json()["usage"]["completion_tokens"] == LIMIT  # the dropped stream would run this long
        with httpx.stream("POST", endpoint, json={**request, "max_tokens": LIMIT, "seed": 11, "stream": True},
                          timeout=120) as response:
            events = (line for line in response.iter_lines() if line)
            next(events), next(events)  # the role chunk and the first text, then hang up
        after_stream = _seconds(lambda: httpx.post(endpoint, json={**request, "max_tokens": 1}, timeout=120))
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up waiting
            httpx.post(endpoint, json={**request, "max_tokens": LIMIT, "seed": 11}, timeout=httpx.Timeout(120, read=full / 10))
        after_wait = _seconds(lambda: httpx.post(endpoint, json={**request, "max_tokens": 1}, timeout=120))
    assert after_stream < full / 2, f"next request took {after_stream:.2f} s; a whole answer takes {full:.2f} s"
    assert after_wait < full / 2, f"next request took {after_wait:.2f} s; a whole answer takes {full:.2f} s"


def test_api_key(served, tiny_run, names):
    import ollama
    import openai

    with start(served, tiny_run, api_key="sesame") as address:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{address}/v1", api_key="wrong", max_retries=0).models.list()
        missing = httpx.get(f"{address}/v1/models")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{address}/api/tags").json() == {"error": "missing or wrong API key; send it as "
                                                                    "'Authorization: Bearer KEY'."}
        assert httpx.post(f"{address}/pastiche/messages", json={"title": "x"}).status_code == 401
        assert [m.id for m in openai.OpenAI(base_url=f"{address}/v1", api_key="sesame").models.list()] == names
        assert ollama.Client(host=address, headers={"Authorization": "Bearer sesame"}).list().models
        assert httpx.get(f"{address}/").status_code == 200  # the page itself asks for the key


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/chat/completions", b"{not json", 400, "the request body is not valid JSON."),
    ("/v1/chat/completions", b"[1, 2]", 400, "the request body must be a JSON object."),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404,
     "model 'nope' not found; this server has {names}."),
    ("/v1/chat/completions", {"model": "{tuned}", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5},
     400, "max_tokens: Input should be greater than or equal to 1."),
    ("/v1/completions", {"model": "{tuned}", "prompt": "x", "max_tokens": LIMIT + 1}, 400,
     f"max_tokens must be at most {LIMIT} (this server's --max-tokens-limit)."),
    ("/v1/completions", {"model": "{tuned}", "prompt": "x" * (1 << 20)}, 413, "the request body is larger than 1048576 bytes."),
    ("/v1/nowhere", {}, 404, "Not Found"),
])
def test_bad_requests_get_openai_errors(url, names, path, body, status, message):
    content = body if isinstance(body, bytes) else json.dumps(body).replace("{tuned}", names[0]).encode()
    response = httpx.post(url + path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] == message.format(names=", ".join(names))
    assert set(error) == {"message", "type", "param", "code"}


def test_chunked_body_over_the_cap_gets_413(url, names):
    def pieces():  # no content-length up front: the cap must hold while the body streams in
        yield json.dumps({"model": names[0], "prompt": ""}).encode()[:-2]
        for _ in range(1100):
            yield b"x" * 1000
        yield b'"}'

    response = httpx.post(f"{url}/v1/completions", content=pieces(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["message"] == "the request body is larger than 1048576 bytes."


def test_overlong_prompt_names_the_limit(url, names, served):
    prompt = "harbour " * 1100
    tokens = served[names[0]].count_tokens(prompt)
    response = httpx.post(f"{url}/v1/completions", json={"model": names[0], "prompt": prompt})
    assert response.status_code == 400 and tokens > 1024
    assert response.json()["error"] == {
        "message": f"the prompt is {tokens} tokens; this model's context holds 1024 tokens, prompt and answer together.",
        "type": "invalid_request_error", "param": "prompt", "code": "context_length_exceeded"}


def test_bad_ollama_requests_get_ollama_errors(url, names):
    unknown = httpx.post(f"{url}/api/chat", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert unknown.status_code == 404 and unknown.json() == {"error": f"model 'nope' not found; this server has {', '.join(names)}."}
    negative = httpx.post(f"{url}/api/generate", json={"model": names[0], "prompt": "x", "options": {"num_predict": -3}})
    assert negative.status_code == 400 and negative.json()["error"].startswith("options.num_predict:")
    # Ollama reads bodies as JSON whatever their content type (curl -d sends a form type).
    loaded = httpx.post(f"{url}/api/generate", content=json.dumps({"model": names[0]}),
                        headers={"content-type": "application/x-www-form-urlencoded"})
    assert loaded.status_code == 200 and loaded.json()["done_reason"] == "load"


def test_a_crash_reaches_the_client_as_a_bare_500(served, tiny_run):
    app = app_for(served, tiny_run)

    @app.get("/v1/broken")
    async def broken():
        raise RuntimeError("secret detail from /etc/passwd")

    with running(app) as address:
        response = httpx.get(f"{address}/v1/broken")
    assert response.status_code == 500
    assert response.json() == {"error": {"message": "internal server error.", "type": "server_error",
                                         "param": None, "code": None}}


def test_exposed_host_needs_a_key(tiny_run, capsys):
    from pastiche.cli import main

    assert main(["serve", str(tiny_run), "--host", "0.0.0.0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "pastiche serve: error: --host 0.0.0.0 is reachable from other machines: pass --api-key KEY "
        "(clients send it as a bearer token) or --insecure to serve without one.")


def test_schemathesis_finds_no_server_error(served, tiny_run, tmp_path):
    """Fuzz every documented operation from /openapi.json; any 5xx fails. Bounded in examples and time."""
    with start(served, tiny_run, max_tokens_limit=4) as address:  # short answers keep the fuzzing quick
        command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{address}/openapi.json",
                   "--checks", "not_a_server_error", "--max-examples", "5", "--max-time", "60", "--seed", "1",
                   "--no-shrink", "--workers", "1", "--phases", "coverage,fuzzing", "--request-timeout", "60",
                   "--generation-database", "none", "--report", "junit", "--report-dir", str(tmp_path)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Operations:       12 selected / 12 total" in result.stdout
    assert "ST101" not in result.stdout and " passed" in result.stdout
