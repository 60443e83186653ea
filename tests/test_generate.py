"""generate.py: one sampling interface over PyTorch/PEFT and llama.cpp, and `pastiche generate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pastiche import chat, models, paths
from pastiche.cli import main
from pastiche.errors import PasticheError
from pastiche.generate import (
    LlamaCppGenerator,
    SamplingParams,
    TorchGenerator,
    load_generator,
    request_messages,
)

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, repetition_penalty=1.0)
REQUEST = chat.messages_for("Write the piece titled \"The Salt Ledger\".")


def make_run(folder: Path, base_dir: Path, data: Path | None = None) -> Path:
    """A run folder in train's format with a random (non-zero) LoRA adapter on ``base_dir``."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model

    base = models.resolve_base(str(base_dir))
    torch.manual_seed(1)
    model = get_peft_model(models.load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                init_lora_weights=False))
    model.save_pretrained(folder / paths.ADAPTER_DIR)
    models.load_tokenizer(base).save_pretrained(folder / paths.TOKENIZER_DIR)
    (folder / paths.BASE_JSON).write_text(json.dumps(base.to_json()))
    (folder / paths.CONFIG_YAML).write_text(yaml.safe_dump({"data": str(data) if data else ""}))
    return folder


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_base, prepared) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "cities-01", tiny_base, prepared)


@pytest.fixture(scope="module")
def tuned(lora_run) -> TorchGenerator:
    return load_generator(lora_run)


def test_greedy_is_deterministic_and_stream_matches_complete(tuned):
    first, second = tuned.complete(REQUEST, GREEDY), tuned.complete(REQUEST, GREEDY)
    chunks = list(tuned.stream(REQUEST, GREEDY))
    assert first.text == second.text == "".join(c.text for c in chunks)
    assert (first.finish_reason, first.completion_tokens) == ("length", 12)
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert chunks[-1].completion_tokens == 12
    assert chunks[-1].prompt_tokens == first.prompt_tokens == tuned.count_tokens(chat.prompt_text(tuned.tokenizer, REQUEST))


def test_same_seed_same_sample_other_seed_other_sample(tuned):
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=16, seed=7)
    again = tuned.complete(REQUEST, params)
    assert tuned.complete(REQUEST, params).text == again.text
    other = tuned.complete(REQUEST, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=16, seed=8))
    assert other.text != again.text


def test_batch_item_i_equals_single_with_seed_plus_i(tuned):
    requests = [REQUEST, chat.messages_for("Compose \"Bell\"."),
                chat.messages_for("Write a new piece for the series \"Cities and the Lantern\", a long one.")]
    params = SamplingParams(temperature=0.9, max_new_tokens=10, seed=3)
    batch = tuned.generate_batch(requests, params, batch_size=2)
    for i, request in enumerate(requests):
        single = tuned.complete(request, SamplingParams(temperature=0.9, max_new_tokens=10, seed=3 + i))
        assert (batch[i].text, batch[i].completion_tokens) == (single.text, single.completion_tokens)


def test_adapter_off_is_the_base_model(tuned, lora_run):
    base = load_generator(lora_run, use_adapter=False)
    assert tuned.variant(False).complete(REQUEST, GREEDY).text == base.complete(REQUEST, GREEDY).text
    assert tuned.complete(REQUEST, GREEDY).text != base.complete(REQUEST, GREEDY).text
    assert tuned.variant(False).name == "cities-01 (base)"


def test_tuned_and_base_streams_interleaved_on_one_model_keep_their_own_output(tuned):
    """Base and tuned share one model and toggle its adapter; threads must not mix them."""
    import threading

    base = tuned.variant(False)
    expected = {"tuned": tuned.complete(REQUEST, GREEDY).text, "base": base.complete(REQUEST, GREEDY).text}
    results: dict[str, list[str]] = {"tuned": [], "base": []}

    def work(name, generator):
        for _ in range(3):
            results[name].append("".join(c.text for c in generator.stream(REQUEST, GREEDY)))

    threads = [threading.Thread(target=work, args=item) for item in (("tuned", tuned), ("base", base))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {name: [text] * 3 for name, text in expected.items()}


def test_stops_on_end_of_turn_token(lora_run):
    import torch

    generator = load_generator(lora_run, use_adapter=False)
    end_of_turn = chat.stop_token_ids(generator.tokenizer)[0]
    bias = torch.zeros(generator.model_vocab())
    bias[end_of_turn] = 1000.0  # this model always ends its turn at once
    hook = generator.model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    try:
        done = generator.complete(REQUEST, SamplingParams(max_new_tokens=20, seed=1))
        batch = generator.generate_batch([REQUEST, REQUEST], SamplingParams(max_new_tokens=20, seed=1))
    finally:
        hook.remove()
    assert (done.text, done.finish_reason, done.completion_tokens) == ("", "stop", 1)
    assert [(c.finish_reason, c.completion_tokens) for c in batch] == [("stop", 1), ("stop", 1)]


def test_stop_string_ends_and_is_never_streamed(tuned):
    full = tuned.complete(REQUEST, dataclass_replace(GREEDY, max_new_tokens=20)).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    chunks = list(tuned.stream(REQUEST, dataclass_replace(GREEDY, max_new_tokens=20, stop=[stop])))
    text = "".join(c.text for c in chunks)
    assert text == full[:full.index(stop)]
    assert chunks[-1].finish_reason == "stop"


def test_cancel_ends_the_stream(tuned):
    import threading

    params = dataclass_replace(GREEDY, max_new_tokens=50, cancel=threading.Event())
    chunks = []
    for chunk in tuned.stream(REQUEST, params):
        chunks.append(chunk)
        params.cancel.set()
    assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens < 5


def dataclass_replace(params, **changes):
    import dataclasses

    return dataclasses.replace(params, **changes)


def test_bad_folders_get_one_sentence(tmp_path, lora_run):
    with pytest.raises(PasticheError, match=r"has no adapter/adapter_config.json; expected a run folder"):
        no_adapter = tmp_path / "r"
        no_adapter.mkdir()
        (no_adapter / paths.BASE_JSON).write_text((lora_run / paths.BASE_JSON).read_text())
        load_generator(no_adapter)
    with pytest.raises(PasticheError, match="is neither a run folder"):
        load_generator(tmp_path)
    with pytest.raises(PasticheError, match="run `pastiche export"):
        load_generator(lora_run, backend="llama.cpp")


def test_requests_are_phrased_like_the_training_prompts(lora_run):
    messages = request_messages(lora_run, "The Glass Harbour", "Cities and the Salt", None)
    assert messages[-1]["role"] == "user"
    text = messages[-1]["content"]
    assert '"The Glass Harbour"' in text and '"Cities and the Salt"' in text and "City" not in text
    assert request_messages(lora_run, None, None, "Say hi.")[-1]["content"] == "Say hi."
    with pytest.raises(PasticheError, match="give --prompt"):
        request_messages(lora_run, None, None, None)


def test_cli_streams_and_writes_json(lora_run, tmp_path, capsys):
    out = tmp_path / "samples.json"
    assert main(["generate", str(lora_run), "--title", "The Glass Harbour", "--n", "2", "--max-new-tokens", "6",
                 "--json", str(out), "--compare"]) == 0
    printed = capsys.readouterr().out
    assert "=== sample 1/2 (seed 1234" in printed and "=== sample 2/2 (seed 1235" in printed
    assert "tuned: cities-01" in printed and "base: cities-01 (base)" in printed
    saved = json.loads(out.read_text())
    assert [(s["model"], s["seed"], s["completion_tokens"]) for s in saved["samples"]] == [
        ("base", 1234, 6), ("tuned", 1234, 6), ("base", 1235, 6), ("tuned", 1235, 6)]
    assert saved["messages"][-1]["content"].count("The Glass Harbour") == 1


@pytest.mark.slow
def test_llama_cpp_backend_on_the_embedded_gguf(tmp_path, smol_tokenizer):
    base = models.resolve_base("embedded")
    export = tmp_path / "export"
    export.mkdir()
    (export / paths.EXPORT_JSON).write_text(json.dumps({"run": str(tmp_path / "run"), "base": base.to_json(),
                                                        "base_gguf": base.path, "files": {}}))
    generator = load_generator(export, use_adapter=False)
    assert isinstance(generator, LlamaCppGenerator) and generator.context_length == 4096
    first = generator.complete(REQUEST, GREEDY)
    assert generator.complete(REQUEST, GREEDY).text == first.text
    assert (first.finish_reason, first.completion_tokens) == ("length", 12)
    assert "".join(c.text for c in generator.stream(REQUEST, GREEDY)) == first.text
    sampled = SamplingParams(temperature=1.0, max_new_tokens=16, seed=5)
    assert generator.complete(REQUEST, sampled).text == generator.complete(REQUEST, sampled).text
    stopped = generator.complete(chat.messages_for("Say only: yes"), SamplingParams(temperature=0, max_new_tokens=50))
    assert stopped.finish_reason == "stop" and stopped.completion_tokens < 50
    with pytest.raises(PasticheError, match=f"has neither {paths.ADAPTER_GGUF} nor {paths.MERGED_GGUF}"):
        load_generator(export)


def test_export_folder_samples_with_llama_cpp_like_pytorch(lora_run, tuned, tmp_path):
    export = tmp_path / "export"
    assert main(["export", str(lora_run), "--out", str(export), "--no-verify"]) == 0
    llama = load_generator(export)
    assert isinstance(llama, LlamaCppGenerator) and llama.name == "cities-01"
    assert llama.context_length == 1024  # the tiny base's trained context, below the 4096 cap
    assert llama.complete(REQUEST, GREEDY).text == tuned.complete(REQUEST, GREEDY).text
    assert llama.variant(False).complete(REQUEST, GREEDY).text == tuned.variant(False).complete(REQUEST, GREEDY).text
