"""`pastiche train` end to end on a 2-layer random Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pastiche import paths
from pastiche.batching import IGNORE, BudgetBatchSampler, Collator, encode, pack
from pastiche.cli import main
from pastiche.train import cpu_has_bf16

RUN_FILES = {"config.yaml", "base.json", "adapter", "tokenizer", "metrics.jsonl", "loss.png", "train.log", "state.json"}
TOY = [("Write about the lantern.", "The lantern hums over the harbour."),
       ("Write about the bell.", "A brass bell rings at the tide."),
       ("Write about the rope.", "Salt rope on the bridge."),
       ("Write about the clock.", "The clock keeps the canal awake.")]


def write_prepared(folder: Path, pairs: list[tuple[str, str]], eval_pairs: list[tuple[str, str]] | None = None) -> Path:
    """A folder in `pastiche prepare`'s format (only what train reads) from (prompt, completion) pairs."""
    folder.mkdir(parents=True)
    for split, chosen in (("train", pairs), ("eval", eval_pairs if eval_pairs is not None else pairs), ("test", [])):
        with (folder / paths.SPLIT_FILES[split]).open("w") as fh:
            for i, (prompt, completion) in enumerate(chosen):
                fh.write(json.dumps({"id": f"p{i:04d}-c0", "piece": f"p{i:04d}", "title": None, "group": None,
                                     "split": split, "task": "title", "system": None,
                                     "prompt": prompt, "completion": completion}) + "\n")
    (folder / paths.PREPARE_JSON).write_text(json.dumps({"config": {}, "counts": {"train": len(pairs)}}))
    return folder


@pytest.fixture(scope="module")
def sharp_base(tmp_path_factory, smol_tokenizer) -> Path:
    """Like conftest's tiny_base, with two changes that make learning visible in a few steps:
    larger initial weights (with std 0.02 tied embeddings a hidden-64 model cannot put much
    probability on any token), and no pad_token_id in the config: Llama zeroes the padding row
    of its tied embedding, and SmolLM2's pad is <|im_end|>, whose logit would then be stuck at 0."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.3,
                         bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id,
                         pad_token_id=None)
    folder = tmp_path_factory.mktemp("sharp-base")
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("data") / "toy", TOY)


def train_args(data: Path, base: Path, runs: Path, *extra: str) -> list[str]:
    return ["train", str(data), "--base", str(base), "--runs-dir", str(runs), "--precision", "fp32", *extra]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / paths.METRICS_JSONL).read_text().splitlines()]


# ---- labels and batches ---------------------------------------------------------------------

def test_labels_mask_the_prompt_and_learn_the_end_of_turn(smol_tokenizer):
    from pastiche.chat import encode_record

    record = {"prompt": "Write about the bell.", "completion": "A brass bell rings.", "system": None}
    prompt_ids, completion_ids = encode_record(smol_tokenizer, record["prompt"], record["completion"])
    example = encode(smol_tokenizer, record)
    assert example.input_ids == prompt_ids + completion_ids
    assert example.labels == [IGNORE] * len(prompt_ids) + completion_ids
    im_end = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert smol_tokenizer.pad_token_id == smol_tokenizer.eos_token_id == im_end
    assert example.labels[-1] == im_end

    # pad == eos: the collator masks padding by position, so the learned <|im_end|> survives.
    short = encode(smol_tokenizer, {"prompt": "Hi.", "completion": "Yes."})
    batch = Collator(smol_tokenizer.pad_token_id)([example, short])
    row = batch["labels"][1].tolist()
    assert row[len(short) - 1] == im_end
    assert row[len(short):] == [IGNORE] * (len(example) - len(short))
    assert batch["input_ids"][1, len(short):].eq(im_end).all()
    assert batch["attention_mask"].sum(1).tolist() == [len(example), len(short)]


def test_token_budget_batches_cover_every_record_once_and_shuffle_per_epoch():
    lengths = [5, 40, 12, 33, 7, 90, 18, 18, 61, 3]
    sampler = BudgetBatchSampler(lengths, batch_tokens=64, seed=1)
    first = list(sampler)
    assert sorted(i for batch in first for i in batch) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 64 or len(b) == 1 for b in first)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(map(sorted, first)) == sorted(map(sorted, second)) and first != second
    sampler.set_epoch(0)
    assert list(sampler) == first


@pytest.mark.parametrize("attention", ["sdpa", "eager", "pastiche"])  # pastiche's is what CPU training uses
def test_packed_records_do_not_attend_to_each_other(smol_tokenizer, tiny_base, attention):
    import torch
    from transformers import AutoModelForCausalLM

    from pastiche import fastpath

    fastpath.register_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation=attention).eval()
    examples = [encode(smol_tokenizer, {"prompt": p, "completion": c}) for p, c in TOY[:3]]
    rows = pack(examples, row_tokens=sum(map(len, examples)))
    assert len(rows) == 1
    batch = Collator(smol_tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        # use_cache=False as in training: with a cache transformers ignores the packing in position_ids.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for e in sorted(examples, key=len, reverse=True):  # pack() places the longest first
            alone = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + len(e)], alone, atol=1e-4, rtol=1e-4)
            start += len(e)


def test_chunked_head_loss_equals_full_logits_cross_entropy(smol_tokenizer, tiny_base):
    """Logits only at completion positions, applied in chunks: same loss and LoRA gradients."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pastiche.loop import HeadCrossEntropy, completion_loss, fusable_head

    torch.manual_seed(0)  # LoRA init uses the global RNG: same weights whatever ran before
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                           LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False, lora_dropout=0.0))
    batch = Collator(smol_tokenizer.pad_token_id)([encode(smol_tokenizer, {"prompt": p, "completion": c * 3})
                                                   for p, c in TOY])
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F_cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    expected.backward()
    reference = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    HeadCrossEntropy.CHUNK, chunk = 7, HeadCrossEntropy.CHUNK  # several chunks, one of them ragged
    try:
        loss, targets = completion_loss(model, batch, fusable_head(model))
    finally:
        HeadCrossEntropy.CHUNK = chunk
    assert targets == int((labels[:, 1:] != IGNORE).sum())
    loss.backward()
    assert abs(loss.item() - expected.item()) < 1e-3 * expected.item()
    for ref, p in zip(reference, (p for p in model.parameters() if p.requires_grad)):
        assert torch_allclose(ref, p.grad)


def test_attention_implementations_give_the_same_loss_and_gradients_on_padded_batches(smol_tokenizer, tiny_base):
    """CPU training uses pastiche's grouped attention: same completion loss and LoRA gradients as
    SDPA and eager with right padding."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pastiche import fastpath
    from pastiche.loop import completion_loss

    fastpath.register_attention()
    batch = Collator(smol_tokenizer.pad_token_id)([encode(smol_tokenizer, {"prompt": p, "completion": c * (i + 1)})
                                                   for i, (p, c) in enumerate(TOY)])
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # rows really are padded
    losses, grads = {}, {}
    for attention in ("sdpa", "eager", "pastiche"):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation=attention),
                               LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "k_proj", "v_proj"],
                                          init_lora_weights=False, lora_dropout=0.0))
        loss = completion_loss(model, batch)[0]
        loss.backward()
        losses[attention] = loss.item()
        grads[attention] = [p.grad for p in model.parameters() if p.requires_grad]
    for attention in ("eager", "pastiche"):
        assert abs(losses["sdpa"] - losses[attention]) < 1e-4 * losses["sdpa"]
        assert all(torch_allclose(a, b) for a, b in zip(grads["sdpa"], grads[attention]))


def F_cross_entropy(logits, targets):
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")


def torch_allclose(a, b) -> bool:
    import torch

    # Summation order differs between the chunked and the full head: near-zero entries carry noise
    # relative to the gradient's scale, not to themselves.
    return torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(a.abs().max()))


# ---- whole runs ------------------------------------------------------------------------------

def test_run_folder_has_exactly_the_contract_files(tiny_run):
    from peft import PeftModel

    from pastiche import models

    # evaluate and export add eval/ and export/ to the same (session-shared) run folder later.
    assert {p.name for p in tiny_run.iterdir()} - {paths.EVAL_DIR, paths.EXPORT_DIR} == RUN_FILES
    assert {p.name for p in (tiny_run / paths.ADAPTER_DIR).iterdir()} == {"adapter_config.json",
                                                                           "adapter_model.safetensors"}
    state = json.loads((tiny_run / paths.STATE_JSON).read_text())
    assert state["status"] == "done" and state["global_step"] == 6 and state["best_step"] in (3, 6)
    assert state["device"] == "cpu" and state["precision"] == ("bf16" if cpu_has_bf16() else "fp32")
    assert [m["step"] for m in metrics(tiny_run) if "eval_loss" in m] == [3, 6]
    from pastiche import kernels

    used = "in use" if kernels.library() is not None else "not in use"
    assert f"compiled CPU kernels: {used}" in (tiny_run / "train.log").read_text()
    import yaml

    saved = yaml.safe_load((tiny_run / paths.CONFIG_YAML).read_text())
    assert Path(saved["data"]).is_absolute() and saved["max_steps"] == 6 and saved["learning_rate"] == 1e-3
    base = models.BaseModel.from_json(json.loads((tiny_run / paths.BASE_JSON).read_text()))
    model = PeftModel.from_pretrained(models.load_model(base), tiny_run / paths.ADAPTER_DIR)
    assert model.peft_config["default"].r == 16


def test_runs_are_numbered_and_loss_falls_on_a_memorisable_set(tmp_path, toy_data, sharp_base):
    runs = tmp_path / "runs"
    args = train_args(toy_data, sharp_base, runs, "--max-steps", "30", "--eval-steps", "10", "--save-steps", "100",
                      "--learning-rate", "1e-2", "--lora-dropout", "0", "--lr-scheduler", "constant",
                      "--logging-steps", "1")
    assert main(args) == 0
    first = metrics(runs / "toy-01")
    assert first[0]["loss"] > 10.0  # ln(49152) = 10.8: the random model knows nothing
    evals = [m["eval_loss"] for m in first if "eval_loss" in m]
    assert len(evals) == 3 and evals[-1] < 3.0 and evals == sorted(evals, reverse=True)
    assert main(args + ["--max-steps", "1"]) == 0
    assert sorted(p.name for p in runs.iterdir()) == ["toy-01", "toy-02"]


def test_packed_training_runs_and_learns(tmp_path, sharp_base, smol_tokenizer):
    pairs = TOY + [("Write the long one.", " ".join(c for _, c in TOY * 3))]  # sets the row length
    data = write_prepared(tmp_path / "packed", pairs)
    examples = [encode(smol_tokenizer, {"prompt": p, "completion": c}) for p, c in pairs]
    assert len(pack(examples, max(map(len, examples)))) < len(pairs)  # some rows hold two records
    runs = tmp_path / "runs"
    assert main(train_args(data, sharp_base, runs, "--packing", "--max-steps", "8", "--eval-steps", "8",
                           "--learning-rate", "1e-2", "--logging-steps", "1")) == 0
    rows = metrics(runs / "packed-01")
    state = json.loads((runs / "packed-01" / paths.STATE_JSON).read_text())
    assert state["useful_tokens"] == 8 * sum(map(len, examples))  # every row fits one batch: a step each
    assert next(r["eval_loss"] for r in rows if "eval_loss" in r) < rows[0]["loss"] - 2


def test_trained_model_emits_end_of_turn_and_stops(tmp_path, sharp_base):
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from pastiche import chat, models

    answer = "Salt rope on the bridge."
    data = write_prepared(tmp_path / "stop", [(f"Write piece number {i}.", answer) for i in range(6)])
    assert main(train_args(data, sharp_base, tmp_path / "runs", "--max-steps", "30", "--eval-steps", "30",
                           "--learning-rate", "1e-2", "--lr-scheduler", "constant")) == 0
    run = tmp_path / "runs" / "stop-01"
    base = models.BaseModel.from_json(json.loads((run / paths.BASE_JSON).read_text()))
    model = PeftModel.from_pretrained(models.load_model(base), run / paths.ADAPTER_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(run / paths.TOKENIZER_DIR)
    prompt = chat.prompt_text(tokenizer, chat.messages_for("Write piece number 99."))
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=40, do_sample=False,
                             eos_token_id=chat.stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") and len(new) < 40
    assert tokenizer.decode(new, skip_special_tokens=True) == answer


def test_kill_9_then_resume_gives_the_uninterrupted_adapter(tmp_path, tiny_base):
    from safetensors.torch import load_file

    data = write_prepared(tmp_path / "resume", TOY * 3, TOY)
    common = ["--max-steps", "12", "--save-steps", "4", "--eval-steps", "4", "--batch-tokens", "64",
              "--learning-rate", "1e-3", "--seed", "7"]
    assert main(train_args(data, tiny_base, tmp_path / "straight", *common)) == 0

    runs = tmp_path / "killed"
    command = [sys.executable, "-m", "pastiche", *train_args(data, tiny_base, runs, *common)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    checkpoint = runs / "resume-01" / paths.CHECKPOINTS_DIR / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 300
    while not checkpoint.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((runs / "resume-01" / paths.STATE_JSON).read_text())
    assert state["status"] == "running", "the run finished before it could be killed"

    assert main(train_args(data, tiny_base, runs, "--resume", str(runs / "resume-01"))) == 0
    straight = load_file(tmp_path / "straight" / "resume-01" / paths.ADAPTER_DIR / "adapter_model.safetensors")
    resumed = load_file(runs / "resume-01" / paths.ADAPTER_DIR / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert straight[name].equal(resumed[name]), name
    assert metrics(runs / "resume-01")[-1]["step"] == 12
    assert not (runs / "resume-01" / paths.CHECKPOINTS_DIR).exists()


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path, toy_data, tiny_base, capsys):
    runs = tmp_path / "runs"
    code = main(train_args(toy_data, tiny_base, runs, "--max-steps", "10", "--save-steps", "1",
                           "--eval-steps", "100", "--learning-rate", "1e30"))
    assert code == 1
    err = capsys.readouterr().err
    run = runs / "toy-01"
    kept = sorted(p.name for p in (run / paths.CHECKPOINTS_DIR).iterdir())
    assert kept  # checkpoints up to the last finite step stay
    assert (f"pastiche train: error: the training loss became nan at step {int(kept[-1].split('-')[1]) + 1}; "
            f"the last good checkpoint is {run / paths.CHECKPOINTS_DIR / kept[-1]} "
            "(lower --learning-rate, then --resume the run or start a new one).") in err
    assert json.loads((run / paths.STATE_JSON).read_text())["status"] == "failed"


# ---- bad input: one sentence, exit 2, nothing written ------------------------------------------

def gguf_with_architecture(path: Path, arch: str) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("case", ["no-folder", "no-prepare-json", "unknown-base", "bert-gguf", "qlora-on-cpu",
                                  "fp16-on-cpu", "resume-nothing"])
def test_bad_input_is_one_sentence_and_exit_2(case, tmp_path, toy_data, tiny_base, capsys):
    import torch

    if case == "qlora-on-cpu" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    runs = tmp_path / "runs"
    data, base, extra = toy_data, str(tiny_base), []
    if case == "no-folder":
        data = tmp_path / "missing"
        expected = f"DATA: {data} is not a folder; expected the output of `pastiche prepare`."
    elif case == "no-prepare-json":
        data = tmp_path / "half"
        data.mkdir()
        (data / "train.jsonl").write_text("{}\n")
        expected = f"DATA: {data} has no prepare.json; expected the output of `pastiche prepare`."
    elif case == "unknown-base":
        base = "no-such-model"
        expected = "--base: 'no-such-model' is not 'embedded', a .gguf file, ollama:NAME, a model folder or a hub id."
    elif case == "bert-gguf":
        base = str(gguf_with_architecture(tmp_path / "enc.gguf", "bert"))
        expected = f"--base: {tmp_path / 'enc.gguf'} is a 'bert' GGUF, which transformers cannot load for training;"
    elif case == "qlora-on-cpu":
        extra = ["--qlora"]
        expected = "--qlora needs a CUDA GPU (bitsandbytes 4-bit); drop --qlora to train LoRA on this machine."
    elif case == "fp16-on-cpu":
        extra = ["--device", "cpu", "--precision", "fp16"]
        expected = "--precision fp16 needs --device cuda (got cpu); use bf16 or fp32."
    else:
        extra = ["--resume", str(tmp_path)]
        expected = f"--resume: {tmp_path} is not a run folder (no config.yaml)."
    args = ["train", str(data), "--base", base, "--runs-dir", str(runs), *extra]
    assert main(args) == 2
    assert capsys.readouterr().err.startswith(f"pastiche train: error: {expected}")
    assert not runs.exists()


@pytest.mark.slow
def test_a_few_steps_on_the_real_default_base(tmp_path, toy_data):
    runs = tmp_path / "runs"
    assert main(["train", str(toy_data), "--base", "embedded", "--runs-dir", str(runs), "--max-steps", "3",
                 "--eval-steps", "3", "--batch-tokens", "256", "--lora-r", "4", "--target-modules", "q_proj",
                 "v_proj"]) == 0
    run = runs / "toy-01"
    assert {p.name for p in run.iterdir()} == RUN_FILES
    state = json.loads((run / paths.STATE_JSON).read_text())
    assert state["global_step"] == 3 and 0 < state["best_eval_loss"] < 10
