"""GGUF writers for llama.cpp and Ollama: the LoRA adapter, the base (for HF bases) and the merge.

Why not llama.cpp's converter scripts: they live outside any package, and the usual failures
(an adapter with no effect, "incorrect shape", a rambling model) come from details we can
check here. Three of them matter:

* llama.cpp looks a LoRA pair up by the *base GGUF's* tensor name plus ``.lora_a``/``.lora_b``
  and wants lora_a as [r, in] and lora_b as [out, r] (numpy order), exactly PEFT's layout.
* Llama-family GGUFs store q/k rows reordered for llama.cpp's interleaved RoPE. A tensor that
  *outputs* q or k rows must get the same reordering: lora_b of q/k, never lora_a.
* llama.cpp scales every pair by ``alpha / r`` with one alpha per file, so per-module ranks,
  alphas or rsLoRA's ``alpha / sqrt(r)`` are folded into lora_b.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pastiche.errors import PasticheError

# HF model_type -> GGUF architecture; Mistral and SmolLM are Llama in GGUF.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "smollm": "llama", "qwen2": "qwen2"}
# Architectures whose GGUF conversion reorders q/k rows for llama.cpp's RoPE.
ROPE_PERMUTED = {"llama"}
# Pre-tokenizers tried, in order, when writing a BPE vocabulary for llama.cpp.
PRE_TOKENIZERS = ("smollm", "llama-bpe", "qwen2", "gpt-2", "default")
TOKENIZER_PROBE = ("Hello world!  It's 2024: café, naïve — 12345 apples;\n\n\tindented  "
                   "don't we'll <|im_start|>user\nOK?</s>")


def rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs, within each head."""
    head_dim = rows.shape[0] // n_head
    return rows.reshape(n_head, 2, head_dim // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


@dataclass
class GgufInfo:
    """What the writers need to know about a base GGUF."""

    path: Path
    arch: str
    n_head: int
    n_head_kv: int
    n_blocks: int
    shapes: dict[str, tuple[int, ...]]  # numpy order: (rows, cols) = (out, in)
    quantized: bool
    reader: object  # the gguf.GGUFReader, kept because parsing a vocabulary takes seconds


def read_gguf(path: str | Path) -> GgufInfo:
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    if arch not in set(ARCHITECTURES.values()):
        raise PasticheError(f"base GGUF {path}: architecture {arch!r} is not supported for export; "
                            f"supported: {', '.join(sorted(set(ARCHITECTURES.values())))}.")

    def value(key: str) -> int:
        return int(reader.fields[f"{arch}.{key}"].contents())

    float_types = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    return GgufInfo(
        path=Path(path), arch=arch, n_head=value("attention.head_count"),
        n_head_kv=value("attention.head_count_kv"), n_blocks=value("block_count"),
        shapes={t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors},
        quantized=any(t.tensor_type not in float_types for t in reader.tensors), reader=reader)


def _tensor_names(arch: str, n_blocks: int):
    import gguf

    arch_enum = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    return gguf.TensorNameMap(arch_enum, n_blocks)


def _rope_heads(info_arch: str, gguf_name: str, n_head: int, n_head_kv: int) -> int | None:
    """Heads to permute a q/k tensor's rows with, or None for any other tensor."""
    if info_arch not in ROPE_PERMUTED:
        return None
    if ".attn_q." in gguf_name:
        return n_head
    if ".attn_k." in gguf_name:
        return n_head_kv
    return None


# ---------------------------------------------------------------- the LoRA adapter


@dataclass
class Lora:
    """A PEFT LoRA adapter reduced to what llama.cpp carries: one alpha, (A, B) per module."""

    alpha: float
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]  # HF module name -> (A [r, in], B [out, r])


def _pattern_value(module: str, pattern: dict, default: float) -> float:
    """PEFT's alpha_pattern: a key (a regex) matches the module name or its dotted tail."""
    return next((value for key, value in pattern.items() if re.fullmatch(rf"(.*\.)?{key}", module)), default)


def check_adapter_config(adapter_dir: Path) -> dict:
    """The adapter's config, or a refusal naming what llama.cpp's LoRA format cannot carry."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise PasticheError(f"RUN: {path} is missing; expected a PEFT adapter saved by `pastiche train`.")
    config = json.loads(path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise PasticheError(f"{path}: a {config['peft_type']} adapter cannot be exported; only LoRA adapters can.")
    if config.get("use_dora"):
        raise PasticheError(f"{path}: DoRA adapters (use_dora) cannot be written as a llama.cpp LoRA GGUF; "
                            "retrain without DoRA.")
    if config.get("modules_to_save"):
        raise PasticheError(f"{path}: modules_to_save ({', '.join(config['modules_to_save'])}) trains full copies "
                            "of layers, which a LoRA GGUF cannot carry; retrain without modules_to_save.")
    if config.get("bias", "none") != "none":
        raise PasticheError(f"{path}: trained biases (bias={config['bias']!r}) cannot be carried by a LoRA GGUF; "
                            "retrain with bias='none'.")
    return config


def load_lora(adapter_dir: Path) -> Lora:
    """Read a PEFT adapter, refusing what llama.cpp cannot apply and folding scalings into B."""
    from safetensors.numpy import load_file

    config = check_adapter_config(adapter_dir)
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise PasticheError(f"RUN: {weights_file} is missing; expected the adapter's safetensors weights.")
    tensors = load_file(str(weights_file))
    embedding = sorted(k for k in tensors if "lora_embedding" in k or "embed_tokens" in k)
    if embedding:  # PEFT may also save the whole embedding matrix next to its LoRA
        module = embedding[0].removeprefix("base_model.model.").split(".lora_embedding")[0].split(".base_layer")[0]
        raise PasticheError(f"{weights_file}: embedding adapters ({module}) cannot be carried by a LoRA GGUF; "
                            "retrain without embed_tokens in target_modules.")
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not match:
            raise PasticheError(f"{weights_file}: tensor {key!r} is not a LoRA A/B matrix; a LoRA GGUF cannot carry it.")
        halves.setdefault(match.group(1), {})[match.group(2)] = value.astype(np.float32)
    alpha = float(config.get("lora_alpha", 8))
    pairs = {}
    for module, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise PasticheError(f"{weights_file}: {module} has lora_{''.join(ab)} but not its partner; the file is incomplete.")
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        module_alpha = _pattern_value(module, config.get("alpha_pattern") or {}, alpha)
        peft_scale = module_alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
        # llama.cpp applies alpha / r; fold any difference (rsLoRA, per-module alpha) into B.
        pairs[module] = (a, b * np.float32(peft_scale / (alpha / rank)))
    if not pairs:
        raise PasticheError(f"{weights_file}: the adapter holds no LoRA matrices.")
    return Lora(alpha, pairs)


def write_adapter_gguf(lora: Lora, base: GgufInfo, out: Path, permute: bool = True) -> dict:
    """adapter.gguf for ``base``; ``permute=False`` exists only to show what goes wrong without it."""
    import gguf

    names = _tensor_names(base.arch, base.n_blocks)
    writer = gguf.GGUFWriter(str(out), base.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.alpha)
    for module, (a, b) in lora.pairs.items():
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None or name not in base.shapes:
            hint = " (the base ties its output layer to the embeddings)" if module.endswith("lm_head") else ""
            raise PasticheError(f"the adapter targets {module}, which the base GGUF {base.path} has no tensor for{hint}; "
                                "it was trained for another base.")
        rows, cols = base.shapes[name]
        if a.shape[1] != cols or b.shape[0] != rows:
            raise PasticheError(f"the adapter's {module} is {b.shape[0]}x{a.shape[1]} but the base GGUF {base.path} has "
                                f"{name} {rows}x{cols}; the adapter was trained for another base.")
        heads = _rope_heads(base.arch, name, base.n_head, base.n_head_kv) if permute else None
        writer.add_tensor(name + ".lora_a", np.ascontiguousarray(a))
        writer.add_tensor(name + ".lora_b", np.ascontiguousarray(rope_permute(b, heads) if heads else b))
    _finish(writer)
    return {"tensors": 2 * len(lora.pairs), "alpha": lora.alpha, "rank": int(next(iter(lora.pairs.values()))[0].shape[0])}


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------- whole models (base.gguf, merged.gguf)

FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # gguf.LlamaFileType values


def _encode(data: np.ndarray, dtype: str):
    """(array, raw ggml type or None) for one tensor; vectors stay f32 as llama.cpp expects."""
    import gguf

    if data.ndim == 1 or dtype == "f32":
        return data.astype(np.float32), None
    if dtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def _add_model_tensors(writer, model, arch: str, dtype: str) -> set[str]:
    """Every weight of a transformers causal LM under its GGUF name, q/k rows permuted for Llama."""
    config = model.config
    names = _tensor_names(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    written = set()
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PasticheError(f"the model's tensor {hf_name} has no GGUF name for architecture {arch!r}.")
        data = tensor.detach().float().cpu().numpy()
        heads = _rope_heads(arch, name, config.num_attention_heads, config.num_key_value_heads)
        data, raw_type = _encode(rope_permute(data, heads) if heads else data, dtype)
        writer.add_tensor(name, data, raw_dtype=raw_type)
        written.add(name)
    return written


def write_merged_gguf(model, base: GgufInfo, out: Path, dtype: str, chat_template: str | None) -> None:
    """The merged model with the base GGUF's metadata (hparams, tokenizer) and the run's template."""
    import gguf

    reader, arch = base.reader, base.arch
    writer = gguf.GGUFWriter(str(out), arch)
    skip = {"general.architecture", "general.file_type", "general.quantization_version", "tokenizer.chat_template"}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    writer.add_file_type(FILE_TYPES[dtype])
    template = chat_template or (reader.fields["tokenizer.chat_template"].contents()
                                 if "tokenizer.chat_template" in reader.fields else None)
    if template:
        writer.add_chat_template(template)
    written = _add_model_tensors(writer, model, arch, dtype)
    for tensor in reader.tensors:  # e.g. rope_freqs.weight: not a model weight, copied as it is
        if tensor.name not in written:
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    _finish(writer)


def hf_architecture(config) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise PasticheError(f"base architecture {model_type!r} is not supported for export; "
                            f"supported: {', '.join(ARCHITECTURES)}.")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise PasticheError(f"base uses RoPE scaling {rope.get('rope_type')!r}, which base.gguf export does not write; "
                            "convert the base with llama.cpp and train on that GGUF.")
    return ARCHITECTURES[model_type]


def _first_key_architecture(path: str | Path) -> str | None:
    """general.architecture when it is the first key (as writers put it), without parsing the vocabulary."""
    import struct

    with open(path, "rb") as fh:
        magic, _version, _tensors, _kvs, key_len = struct.unpack("<4sIQQQ", fh.read(32))
        if magic != b"GGUF" or key_len > 256 or fh.read(key_len) != b"general.architecture":
            return None
        value_type, value_len = struct.unpack("<IQ", fh.read(12))
        return fh.read(value_len).decode("utf-8", "replace") if value_type == 8 and value_len < 256 else None


def check_base_architecture(base) -> None:
    """Refuse an unsupported base before any weights are loaded."""
    if base.kind == "gguf":
        arch = _first_key_architecture(base.path)
        if arch is None:
            read_gguf(base.path)  # the slow, complete parse names the architecture
        elif arch not in set(ARCHITECTURES.values()):
            raise PasticheError(f"base GGUF {base.path}: architecture {arch!r} is not supported for export; "
                                f"supported: {', '.join(sorted(set(ARCHITECTURES.values())))}.")
    else:
        from transformers import AutoConfig

        hf_architecture(AutoConfig.from_pretrained(base.path))


def _add_hparams(writer, config, arch: str, n_vocab: int) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(n_vocab)


def _bpe_vocab(tokenizer_dir: Path, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types (special added tokens are CONTROL, so they parse)."""
    import gguf

    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise PasticheError(f"{tokenizer_dir}: only byte-level BPE tokenizers can be written into base.gguf; "
                            "convert the base with llama.cpp's convert_hf_to_gguf.py and train on that GGUF.")
    by_id = {i: text for text, i in model["vocab"].items()}
    kinds = {}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    tokens, types = [], []
    for i in range(max(n_vocab, max(by_id) + 1)):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(int(kinds.get(i, gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)))
    return tokens, types


def _add_hf_metadata(writer, config, arch: str, tokenizer_dir: Path, chat_template: str | None, pre: str) -> None:
    import gguf

    tokens, types = _bpe_vocab(tokenizer_dir, config.vocab_size)
    writer.add_name(Path(getattr(config, "_name_or_path", "") or tokenizer_dir).name or "base")
    _add_hparams(writer, config, arch, len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens))
    special.chat_template = chat_template or special.chat_template
    special.add_to_gguf(writer, quiet=True)


def choose_pre_tokenizer(config, arch: str, tokenizer, tokenizer_dir: Path) -> str:
    """The llama.cpp pre-tokenizer whose splits reproduce the HF tokenizer on a probe text."""
    import gguf
    from llama_cpp import Llama

    expected = tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
    with tempfile.TemporaryDirectory() as tmp:
        for pre in PRE_TOKENIZERS:
            probe = Path(tmp) / f"{pre}.gguf"
            writer = gguf.GGUFWriter(str(probe), arch)
            _add_hf_metadata(writer, config, arch, tokenizer_dir, None, pre)
            _finish(writer)
            vocab = Llama(str(probe), vocab_only=True, verbose=False)
            if vocab.tokenize(TOKENIZER_PROBE.encode(), add_bos=False, special=True) == expected:
                return pre
    raise PasticheError(f"{tokenizer_dir}: no llama.cpp pre-tokenizer ({', '.join(PRE_TOKENIZERS)}) splits text the "
                        "way this tokenizer does; convert the base with llama.cpp and train on that GGUF.")


def write_base_gguf(model, tokenizer, tokenizer_dir: Path, out: Path, dtype: str) -> str:
    """base.gguf for an HF base (weights, hparams, tokenizer, chat template); returns the pre-tokenizer."""
    import gguf

    arch = hf_architecture(model.config)
    pre = choose_pre_tokenizer(model.config, arch, tokenizer, tokenizer_dir)
    writer = gguf.GGUFWriter(str(out), arch)
    _add_hf_metadata(writer, model.config, arch, tokenizer_dir, getattr(tokenizer, "chat_template", None), pre)
    writer.add_file_type(FILE_TYPES[dtype])
    _add_model_tensors(writer, model, arch, dtype)
    _finish(writer)
    return pre
