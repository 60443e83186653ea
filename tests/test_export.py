"""`pastiche export`: the files, the Modelfiles (rendered and compared with the chat template),
verification with real llama.cpp, and each refusal's message and exit code."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from pastiche import models, paths
from pastiche.cli import main

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYSTEM_PROMPT = "You write in the voice of the archive."
EXPORT_FILES = {"adapter.gguf", "merged.gguf", "base.gguf", "adapter", "merged", "Modelfile", "Modelfile.adapter",
                "verify.json", "export.json"}


def write_data(folder: Path, system: str | None = None, seed: int = 0) -> Path:
    """A prepared-data folder in the contract format (only the jsonl splits export reads)."""
    rng = random.Random(seed)
    words = ["lantern", "harbour", "salt", "bell", "ledger", "rope", "tide", "brass", "window", "bridge"]
    folder.mkdir(parents=True)
    for split, count in (("train", 3), ("eval", 2), ("test", 2)):
        lines = []
        for i in range(count):
            text = " ".join(rng.choice(words) for _ in range(40)).capitalize() + "."
            lines.append(json.dumps({"id": f"p{i:04d}-c0", "piece": f"p{i:04d}", "title": None, "group": None,
                                     "split": split, "task": "title", "system": system,
                                     "prompt": f"Write the piece titled 'City{i}'.", "completion": text}))
        (folder / paths.SPLIT_FILES[split]).write_text("\n".join(lines) + "\n")
    return folder


def make_run(folder: Path, base_spec: str, data: Path, seed: int = 0, b_std: float = 1.0, **lora) -> Path:
    """A run folder in the contract format: a PEFT adapter with random nonzero lora_B, as train leaves it."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model

    base = models.resolve_base(base_spec)
    model = models.load_model(base)
    options = {"r": 4, "lora_alpha": 8, "target_modules": LINEAR, **lora}
    torch.manual_seed(seed)  # lora_A is initialised from the global RNG: same adapter whatever ran before
    tuned = get_peft_model(model, LoraConfig(**options))
    generator = torch.Generator().manual_seed(seed)
    for name, param in tuned.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * b_std
    folder.mkdir(parents=True)
    tuned.save_pretrained(folder / paths.ADAPTER_DIR)
    models.load_tokenizer(base).save_pretrained(folder / paths.TOKENIZER_DIR)
    (folder / paths.BASE_JSON).write_text(json.dumps(base.to_json()))
    (folder / paths.CONFIG_YAML).write_text(yaml.safe_dump({"data": str(data.resolve()), "base": base_spec}))
    return folder


# ---------------------------------------------------------------- a tiny renderer for Ollama's Go templates


def _parse(tokens: list[str], pos: int, stops: tuple[str, ...]) -> tuple[list, int]:
    """Nodes until one of ``stops``; supports text, .Field, if/else if/else, range, eq .Field "x"."""
    nodes = []
    while pos < len(tokens):
        token = tokens[pos]
        if not token.startswith("{{"):
            nodes.append(("text", token))
            pos += 1
            continue
        action = token[2:-2].strip()
        if action in stops or action.startswith("else"):
            return nodes, pos
        if action.startswith(("if ", "range ")):
            kind, cond = action.split(" ", 1)
            branches, pos = [], pos + 1
            while True:
                body, pos = _parse(tokens, pos, ("end",))
                branches.append((cond, body))
                closing = tokens[pos][2:-2].strip()
                pos += 1
                if closing == "end":
                    break
                cond = closing[len("else if "):] if closing.startswith("else if ") else "true"
            nodes.append((kind, branches))
        else:
            nodes.append(("value", action))
            pos += 1
    return nodes, pos


def _value(expr: str, dot: dict):
    if expr == "true":
        return True
    if expr.startswith("eq "):
        field, literal = re.fullmatch(r'eq (\.\w+) "([^"]*)"', expr).groups()
        return _value(field, dot) == literal
    return dot.get(expr.lstrip("."), "")


def _render(nodes: list, dot: dict) -> str:
    out = []
    for kind, item in nodes:
        if kind == "text":
            out.append(item)
        elif kind == "value":
            out.append(str(_value(item, dot)))
        elif kind == "if":
            out.append(next((_render(body, dot) for cond, body in item if _value(cond, dot)), ""))
        else:  # range over the only list the templates use
            (field, body), = item
            out.extend(_render(body, element) for element in _value(field, dot))
    return "".join(out)


def render_go_template(template: str, system: str, messages: list[dict]) -> str:
    tokens = [t for t in re.split(r"(\{\{.*?\}\})", template, flags=re.DOTALL) if t]
    nodes, _ = _parse(tokens, 0, ())
    go_messages = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    return _render(nodes, {"System": system, "Messages": go_messages})


def modelfile_fields(text: str) -> dict[str, list[str]]:
    """Instruction -> values; a triple-quoted value may span lines."""
    fields: dict[str, list[str]] = {}
    pattern = re.compile(r'(\w+) ("""(.*?)"""|[^\n]*)\n', flags=re.DOTALL)
    pos = 0
    while pos < len(text):
        if text.startswith("#", pos):
            pos = text.index("\n", pos) + 1
            continue
        match = pattern.match(text, pos)
        value = match.group(3) if match.group(3) is not None else match.group(2)
        fields.setdefault(match.group(1), []).append(value)
        pos = match.end()
    return fields


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tiny_base) -> Path:
    root = tmp_path_factory.mktemp("export")
    run = make_run(root / "cities-01", str(tiny_base), write_data(root / "data", system=SYSTEM_PROMPT))
    assert main(["export", str(run), "--verify-tokens", "300"]) == 0
    return run / paths.EXPORT_DIR


def test_export_writes_every_file_and_verifies_them(tiny_export):
    assert {p.name for p in tiny_export.iterdir()} == EXPORT_FILES
    checks = json.loads((tiny_export / paths.VERIFY_JSON).read_text())
    assert checks["checked"] == ["adapter", "merged", "base"]
    for key in ("base", "adapter", "merged"):
        assert checks[key]["passed"] and checks[key]["greedy_match"], key
        assert checks[key]["kl"] < 1e-5 and checks[key]["top1"] > 0.95, (key, checks[key]["kl"])  # near ties in a random model
        assert abs(checks[key]["nll_gguf"] - checks[key]["nll_torch"]) < 1e-3
        assert checks[key]["positions"] > 200
    record = json.loads((tiny_export / paths.EXPORT_JSON).read_text())
    assert record["base_gguf"] == str((tiny_export / paths.BASE_GGUF).resolve())
    assert record["adapter"] == {"tensors": 28, "alpha": 8.0, "rank": 4}
    assert record["ollama"]["command"] == ["ollama", "create", "cities-01", "-f", "Modelfile"]
    assert set(record["files"]) == {n for n in EXPORT_FILES if "." in n or n.startswith("Modelfile")} - {"export.json"}


def test_merged_folder_is_the_adapted_model(tiny_export):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tiny_export.parent
    base = models.BaseModel.from_json(json.loads((run / paths.BASE_JSON).read_text()))
    tuned = PeftModel.from_pretrained(models.load_model(base), str(run / paths.ADAPTER_DIR)).eval()
    merged = AutoModelForCausalLM.from_pretrained(tiny_export / paths.MERGED_DIR, torch_dtype=torch.float32).eval()
    ids = torch.tensor([[1, 9690, 198, 28120, 905, 2, 198]])
    with torch.no_grad():
        adapted, from_folder = tuned(ids).logits, merged(ids).logits
        with tuned.disable_adapter():
            plain = tuned(ids).logits
    # merged/ is stored in fp16: it must sit far closer to the adapted model than the adapter's own effect.
    assert (adapted - from_folder).abs().max() < 0.05 * (adapted - plain).abs().max()
    assert (tiny_export / paths.MERGED_DIR / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", [paths.MODELFILE, paths.MODELFILE_ADAPTER])
def test_modelfile_template_matches_chat_template(tiny_export, smol_tokenizer, name):
    fields = modelfile_fields((tiny_export / name).read_text())
    for key in ("FROM", "ADAPTER"):
        for value in fields.get(key, []):
            assert value.startswith(("./", "../")) and (tiny_export / value).resolve().is_file(), value
    assert fields["FROM"] == (["./merged.gguf"] if name == paths.MODELFILE else ["./base.gguf"])
    assert fields.get("ADAPTER") == (None if name == paths.MODELFILE else ["./adapter.gguf"])
    assert fields["SYSTEM"] == [SYSTEM_PROMPT]
    assert fields["PARAMETER"][0] == 'stop "<|im_end|>"'  # SmolLM2-Instruct's EOS is its end of turn
    assert "num_ctx 2048" in fields["PARAMETER"] and "temperature 0.8" in fields["PARAMETER"]
    (template,) = fields["TEMPLATE"]
    conversation = [{"role": "user", "content": "Write about the harbour."},
                    {"role": "assistant", "content": "Salt on the bell."},
                    {"role": "user", "content": "Again, at night."}]
    for system in (SYSTEM_PROMPT, ""):
        messages = ([{"role": "system", "content": system}] if system else []) + conversation
        expected = smol_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_go_template(template, system, messages) == expected


def test_modelfile_adapter_points_at_the_embedded_gguf(tmp_path):
    from pastiche.modelfile import relative_from

    gguf = Path(models.resolve_base("embedded").path)
    rel = relative_from(gguf, tmp_path / "export")
    assert rel.startswith("../") and (tmp_path / "export" / rel).resolve() == gguf.resolve()


def _refusal(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # drop what building the run printed
    assert main(argv) == 2
    return capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("refusal-data") / "data")


@pytest.mark.parametrize("lora, message", [
    ({"use_dora": True}, "DoRA adapters (use_dora) cannot be written as a llama.cpp LoRA GGUF; retrain without DoRA."),
    ({"modules_to_save": ["lm_head"]}, ("modules_to_save (lm_head) trains full copies of layers, which a LoRA GGUF "
                                        "cannot carry; retrain without modules_to_save.")),
    ({"bias": "lora_only"}, "trained biases (bias='lora_only') cannot be carried by a LoRA GGUF; retrain with bias='none'."),
])
def test_refuses_what_the_adapter_format_cannot_carry(tmp_path, capsys, tiny_base, tiny_data, lora, message):
    run = make_run(tmp_path / "run", str(tiny_base), tiny_data, **lora)
    config = run / paths.ADAPTER_DIR / "adapter_config.json"
    assert _refusal(capsys, ["export", str(run)]) == f"pastiche export: error: {config}: {message}"
    assert not (run / paths.EXPORT_DIR).exists()


def test_refuses_embedding_adapters(tmp_path, capsys, tiny_base, tiny_data):
    run = make_run(tmp_path / "run", str(tiny_base), tiny_data, target_modules=["embed_tokens", "q_proj"])
    weights = run / paths.ADAPTER_DIR / "adapter_model.safetensors"
    assert _refusal(capsys, ["export", str(run)]) == (
        f"pastiche export: error: {weights}: embedding adapters (model.embed_tokens) "
        "cannot be carried by a LoRA GGUF; retrain without embed_tokens in target_modules.")
    assert not (run / paths.EXPORT_DIR).exists()


def test_refuses_unsupported_architecture(tmp_path, capsys, smol_tokenizer, tiny_data):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(smol_tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    run = make_run(tmp_path / "run", str(folder), tiny_data, target_modules=["c_attn"])
    assert _refusal(capsys, ["export", str(run)]) == (
        "pastiche export: error: base architecture 'gpt2' is not supported for export; "
        "supported: llama, mistral, smollm, qwen2.")


def test_refuses_another_base(tmp_path, capsys, tiny_base, tiny_data):
    run = make_run(tmp_path / "run", str(tiny_base), tiny_data)
    embedded = models.resolve_base("embedded")
    assert _refusal(capsys, ["export", str(run), "--base", "embedded"]) == (
        f"pastiche export: error: --base: {embedded.path} is not the base this run was trained on "
        f"({tiny_base.name}, hf); an adapter only fits the base it was trained on.")


def test_refuses_a_run_that_is_not_one(tmp_path, capsys):
    assert _refusal(capsys, ["export", str(tmp_path)]) == (
        f"pastiche export: error: RUN: {tmp_path} has no base.json; expected a run folder written by `pastiche train`.")


@pytest.mark.slow
def test_trained_adapter_on_the_embedded_base(tmp_path, capsys, prepared, tiny_export):
    """A few real training steps on SmolLM2; the adapter applied by llama.cpp to the Q4 GGUF passes."""
    runs = tmp_path / "runs"
    assert main(["train", str(prepared), "--base", "embedded", "--runs-dir", str(runs), "--max-steps", "2",
                 "--eval-steps", "2", "--save-steps", "2", "--batch-tokens", "1024", "--learning-rate", "2e-3"]) == 0
    run, out = runs / f"{prepared.name}-01", tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--verify-tokens", "256"]) == 0
    assert {p.name for p in out.iterdir()} == EXPORT_FILES - {"base.gguf"}
    checks = json.loads((out / paths.VERIFY_JSON).read_text())
    assert checks["checked"] == ["adapter", "merged"] and checks["adapter"]["passed"] and checks["merged"]["passed"]
    assert checks["adapter"]["rule"].startswith("quantized weights") and checks["merged"]["rule"].startswith("float")
    assert checks["base"]["passed"] is None and 0 < checks["base"]["kl"] < 0.05  # Q4_1 noise of the base alone: the floor the adapter is judged against
    embedded = models.resolve_base("embedded")
    assert json.loads((out / paths.EXPORT_JSON).read_text())["base_gguf"] == str(Path(embedded.path).resolve())
    (source,) = modelfile_fields((out / paths.MODELFILE_ADAPTER).read_text())["FROM"]
    assert (out / source).resolve() == Path(embedded.path).resolve()
    other = tiny_export / paths.BASE_GGUF
    assert _refusal(capsys, ["export", str(run), "--out", str(tmp_path / "other"), "--base", str(other)]) == (
        f"pastiche export: error: --base: {other.resolve()} is not the base this run was trained on "
        f"(SmolLM2-135M-Instruct, gguf, sha256 {embedded.sha256[:12]}); an adapter only fits the base it was trained on.")


def test_plain_template_for_bases_without_one(smol_tokenizer):
    """A base without a chat template gets chat.PLAIN_TEMPLATE; its TEMPLATE must render it exactly too."""
    import copy

    from pastiche import chat
    from pastiche.modelfile import go_template, template_parts

    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = chat.PLAIN_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More."}]
    template = go_template(template_parts(tokenizer))
    assert "{{ else }}" not in template  # no default system text
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_go_template(template, "Be brief.", messages) == expected


def test_refuses_a_chat_template_ollama_cannot_express(smol_tokenizer):
    import copy

    from pastiche.errors import PasticheError
    from pastiche.modelfile import template_parts

    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(PasticheError) as error:
        template_parts(tokenizer)
    assert str(error.value) == ("the run's chat template (tokenizer/) cannot be expressed as an Ollama TEMPLATE "
                                "(its turns are not a fixed prefix and suffix around each message's content).")
