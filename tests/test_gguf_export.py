"""The GGUF writers and their verification against real llama.cpp, on a tiny random Llama."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pastiche import gguf_export, gguf_verify, models
from pastiche.errors import PasticheError

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_rope_permute_interleaves_the_halves_of_each_head():
    rows = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert gguf_export.rope_permute(rows, n_head=2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def _peft(tiny_base, seed: int = 0, **lora):
    """The tiny Llama with a LoRA whose B is random and large, so a wrong export shows."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    tuned = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR, **lora))
    generator = torch.Generator().manual_seed(seed)
    for name, param in tuned.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator)
    return tuned.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_base, smol_tokenizer):
    """base.gguf + adapter.gguf + merged.gguf of the tiny model, and the PyTorch references."""
    import torch

    folder = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)  # LoRA init uses the global RNG: same adapter whatever ran before
    tuned = _peft(tiny_base)
    tuned.save_pretrained(folder / "adapter")
    base = models.load_model(models.resolve_base(str(tiny_base)))
    pre = gguf_export.write_base_gguf(base, smol_tokenizer, tiny_base, folder / "base.gguf", "f16")
    info = gguf_export.read_gguf(folder / "base.gguf")
    lora = gguf_export.load_lora(folder / "adapter")
    gguf_export.write_adapter_gguf(lora, info, folder / "adapter.gguf")
    gguf_export.write_adapter_gguf(lora, info, folder / "unpermuted.gguf", permute=False)
    text = smol_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Describe the harbour at dusk."},
         {"role": "assistant", "content": "The lanterns lean over salt water and the bell counts the tide."}],
        tokenize=False)
    texts = [smol_tokenizer.encode(text, add_special_tokens=False)]
    prompt = texts[0][:12]
    with tuned.disable_adapter():
        ref_base = gguf_verify.torch_reference(tuned, texts, prompt)
    ref_tuned = gguf_verify.torch_reference(tuned, texts, prompt)
    weights = {name: p.detach().clone() for name, p in tuned.named_parameters() if "lora_" in name}
    merged = tuned.merge_and_unload()
    gguf_export.write_merged_gguf(merged, info, folder / "merged.gguf", "f16", smol_tokenizer.chat_template)
    return {"folder": folder, "info": info, "pre": pre, "ref_base": ref_base, "ref_tuned": ref_tuned, "lora": weights}


def _fields(path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items()
            if key not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}, reader


def test_adapter_gguf_has_llama_cpp_names_shapes_and_permuted_q_k(tiny):
    fields, reader = _fields(tiny["folder"] / "adapter.gguf")
    assert (fields["general.type"], fields["general.architecture"], fields["adapter.type"]) == ("adapter", "llama", "lora")
    assert fields["adapter.lora.alpha"] == 8.0
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    expected = {f"blk.{i}.{kind}.weight.lora_{ab}" for i in range(2) for ab in "ab"
                for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == expected
    peft = {k.removeprefix("base_model.model.model."): v.numpy() for k, v in tiny["lora"].items()}
    a_q, b_q = peft["layers.1.self_attn.q_proj.lora_A.default.weight"], peft["layers.1.self_attn.q_proj.lora_B.default.weight"]
    assert tensors["blk.1.attn_q.weight.lora_a"].shape == (4, 64) and tensors["blk.1.attn_q.weight.lora_b"].shape == (64, 4)
    assert np.array_equal(tensors["blk.1.attn_q.weight.lora_a"], a_q)  # A is never permuted
    assert np.array_equal(tensors["blk.1.attn_q.weight.lora_b"], gguf_export.rope_permute(b_q, 4))
    assert not np.array_equal(tensors["blk.1.attn_q.weight.lora_b"], b_q)
    b_k = peft["layers.1.self_attn.k_proj.lora_B.default.weight"]
    assert tensors["blk.1.attn_k.weight.lora_b"].shape == (32, 4)  # 2 KV heads of 16
    assert np.array_equal(tensors["blk.1.attn_k.weight.lora_b"], gguf_export.rope_permute(b_k, 2))
    assert np.array_equal(tensors["blk.0.attn_v.weight.lora_b"], peft["layers.0.self_attn.v_proj.lora_B.default.weight"])


def test_base_gguf_carries_tokenizer_special_tokens_and_template(tiny, smol_tokenizer):
    fields, reader = _fields(tiny["folder"] / "base.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert tiny["pre"] == fields["tokenizer.ggml.pre"] == "smollm"
    assert (fields["tokenizer.ggml.model"], len(tokens.data)) == ("gpt2", 49152)
    assert [tokens.contents(i) for i in (0, 1, 2)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert types[:3] == [3, 3, 3] and types[1000] == 1  # special tokens are CONTROL, others NORMAL
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.chat_template"] == smol_tokenizer.chat_template
    assert (fields["general.file_type"], fields["llama.block_count"], fields["llama.attention.head_count_kv"]) == (1, 2, 2)
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses token_embd


def test_merged_gguf_keeps_the_base_metadata(tiny, smol_tokenizer):
    base, base_reader = _fields(tiny["folder"] / "base.gguf")
    merged, reader = _fields(tiny["folder"] / "merged.gguf")
    assert merged == base
    assert [t.name for t in reader.tensors] == [t.name for t in base_reader.tensors]
    assert len(reader.tensors) == 2 + 2 * 9  # token_embd, output_norm, 9 per block
    changed = {t.name for t, b in zip(reader.tensors, base_reader.tensors) if not np.array_equal(t.data, b.data)}
    assert changed == {f"blk.{i}.{kind}.weight" for i in range(2)
                       for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}


@pytest.mark.parametrize("name, ref", [("base", "ref_base"), ("adapter", "ref_tuned"), ("merged", "ref_tuned")])
def test_llama_cpp_matches_pytorch(tiny, name, ref):
    folder = tiny["folder"]
    model, lora = (folder / "base.gguf", folder / "adapter.gguf") if name == "adapter" else (folder / f"{name}.gguf", None)
    result = gguf_verify.judge(gguf_verify.measure(model, tiny[ref], lora), quantized=False, base_kl=None)
    assert result["passed"], result
    assert result["kl"] < 1e-5 and result["top1"] >= 0.98 and result["greedy_match"]
    assert abs(result["nll_gguf"] - result["nll_torch"]) < 1e-3


def test_an_unpermuted_adapter_is_caught(tiny):
    folder = tiny["folder"]
    good = gguf_verify.measure(folder / "base.gguf", tiny["ref_tuned"], folder / "adapter.gguf")
    wrong = gguf_verify.judge(gguf_verify.measure(folder / "base.gguf", tiny["ref_tuned"], folder / "unpermuted.gguf"),
                              quantized=False, base_kl=None)
    assert not wrong["passed"]
    assert wrong["kl"] > 1e-3 and wrong["kl"] > 1000 * good["kl"]
    assert gguf_verify.failure_message("adapter.gguf", wrong).startswith(
        f"verification failed for adapter.gguf: KL(PyTorch || llama.cpp) {wrong['kl']:.5f} per token (limit 0.00010)")


def test_greedy_check_accepts_a_first_difference_only_at_a_near_tie():
    """Measured on a `pastiche run`: merged.gguf with KL 1e-5 picked PyTorch's runner-up at a
    near-tie and the 32-token greedy check failed the whole export."""
    steps = np.log(np.full((4, 5), 0.01, dtype=np.float32))
    steps[:, 0], steps[:, 1] = np.log(0.5), np.log(0.48)  # token 0 leads token 1 by 0.041 nats
    steps[2, 2] = np.log(0.9)  # at step 2 token 2 leads clearly
    ref = gguf_verify.Reference(texts=[], logprobs=[], prompt=[], greedy=[0, 0, 2, 0], greedy_logprobs=steps)

    assert gguf_verify.greedy_agreement(ref, [0, 0, 2, 0]) == {"greedy_match": True, "greedy_diverged_at": None}
    tie = gguf_verify.greedy_agreement(ref, [0, 1, 4, 4])  # differs at step 1, a near-tie; what follows is free
    assert tie["greedy_match"] and tie["greedy_diverged_at"] == 1 and abs(tie["greedy_tie_nats"] - 0.0408) < 1e-3
    clear = gguf_verify.greedy_agreement(ref, [0, 0, 1, 0])  # differs at step 2, where 2 leads by 0.63 nats
    assert not clear["greedy_match"] and clear["greedy_diverged_at"] == 2
    assert gguf_verify.greedy_summary({**clear, "greedy_match": False}) == (
        "equal for 2 tokens, then differ where PyTorch's log-probabilities of the two picks are 0.629 nats apart")
    measured = {"kl": 1e-5, "top1": 0.999, "nll_torch": 3.4894, "nll_gguf": 3.4894}
    assert gguf_verify.judge({**measured, **tie}, quantized=False, base_kl=None)["passed"]
    assert not gguf_verify.judge({**measured, **clear}, quantized=False, base_kl=None)["passed"]


def test_quantized_rule_uses_the_base_noise_floor():
    measured = {"kl": 0.0058, "top1": 0.93, "nll_torch": 4.9376, "nll_gguf": 4.9343, "greedy_match": False}
    assert gguf_verify.judge(measured, quantized=True, base_kl=0.0047)["passed"]  # 0.0058 <= 1.5 * 0.0047 + 0.001
    assert not gguf_verify.judge({**measured, "kl": 0.0339}, quantized=True, base_kl=0.0047)["passed"]
    assert not gguf_verify.judge({**measured, "nll_gguf": 4.96}, quantized=True, base_kl=0.0047)["passed"]


def test_rslora_scaling_is_folded_into_lora_b(tmp_path, tiny_base):
    tuned = _peft(tiny_base, use_rslora=True)
    tuned.save_pretrained(tmp_path)
    lora = gguf_export.load_lora(tmp_path)
    b = tuned.base_model.model.model.layers[0].self_attn.v_proj.lora_B["default"].weight.detach().numpy()
    # PEFT scales by alpha / sqrt(r) = 4; llama.cpp by alpha / r = 2, so B carries the factor sqrt(r) = 2
    assert lora.alpha == 8.0
    assert np.allclose(lora.pairs["model.layers.0.self_attn.v_proj"][1], b * math.sqrt(4))


def test_an_adapter_for_another_base_is_refused(tiny):
    embedded = gguf_export.read_gguf(models.resolve_base("embedded").path)
    lora = gguf_export.load_lora(tiny["folder"] / "adapter")
    with pytest.raises(PasticheError) as error:
        gguf_export.write_adapter_gguf(lora, embedded, tiny["folder"] / "wrong.gguf")
    assert str(error.value) == (
        f"the adapter's model.layers.0.mlp.down_proj is 64x128 but the base GGUF {embedded.path} has "
        "blk.0.ffn_down.weight 576x1536; the adapter was trained for another base.")


def test_an_unsupported_gguf_architecture_is_refused(tmp_path):
    import gguf

    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    base = models.BaseModel("phi.gguf", "gguf", str(path), "0" * 64, "phi")
    message = f"base GGUF {path}: architecture 'phi3' is not supported for export; supported: llama, qwen2."
    for check in (lambda: gguf_export.read_gguf(path), lambda: gguf_export.check_base_architecture(base)):
        with pytest.raises(PasticheError) as error:
            check()
        assert str(error.value) == message



def test_export_verification_names_the_file_that_fails(tiny):
    from pastiche.export import verify

    folder = tiny["folder"]
    files = {"adapter": folder / "unpermuted.gguf", "merged": folder / "merged.gguf"}
    with pytest.raises(PasticheError) as error:
        verify(files, folder / "base.gguf", False, False, {"base": tiny["ref_base"], "tuned": tiny["ref_tuned"]})
    assert str(error.value).startswith("verification failed for unpermuted.gguf: KL(PyTorch || llama.cpp) ")
    assert str(error.value).endswith("; the file does not behave like the trained model.")
