"""Turn a path on disk into a ready model: config, weights, tokenizer, chat template.

Two layouts are understood: a GGUF file (everything in one file), and a Hugging Face folder
(`config.json`, safetensors weights, `tokenizer.json`). A folder holding GGUF files is read
through the file named by the caller.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ladle.engine.kernels import native
from ladle.engine.layers.embedding import LMHead
from ladle.engine.layers.linear import Linear
from ladle.engine.loading.config import ModelConfig
from ladle.engine.loading.gguf import read_gguf
from ladle.engine.loading.tokenizer import Tokenizer
from ladle.engine.loading.weights import gguf_module_name, gguf_weights, safetensors_weights
from ladle.engine.models import ARCHITECTURES
from ladle.engine.models.base import CausalLM, CheckpointModule, Weight
from ladle.engine.quant.imatrix import read_imatrix
from ladle.engine.quant.isq import IsqSpec, LayerIsq, parse_isq_type
from ladle.errors import ModelLoadError, UnsupportedArchitectureError


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    dtype: torch.dtype
    file_format: str  # "gguf" or "safetensors"
    isq: IsqSpec | None = None  # how the linear layers were quantized on load


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    chat_template: str | None = None,
    tokenizer_path: str | Path | None = None,
    isq: str | None = None,
    imatrix: str | Path | None = None,
) -> LoadedModel:
    """Load a GGUF file or a Hugging Face safetensors folder.

    `isq` quantizes the linear layers as they load (an ISQ type name, `quant/isq.py`),
    weighted by the importance matrix file `imatrix` if given.
    """
    path = Path(path).expanduser()
    if imatrix is not None and isq is None:
        raise ModelLoadError(imatrix, "an importance matrix needs an ISQ type to weight")
    request = (parse_isq_type(isq), imatrix) if isq is not None else None
    if path.is_file():
        loaded = _load_gguf(path, dtype, request)
    elif path.is_dir():
        loaded = _load_folder(path, dtype, request)
    else:
        raise ModelLoadError(path, "no such file or directory")
    if tokenizer_path is not None:
        loaded.tokenizer = Tokenizer.from_folder(Path(tokenizer_path))
    if chat_template is not None:
        loaded.tokenizer.chat_templates["default"] = _read_template(chat_template)
    release_free_memory()
    return loaded


def _trimming(
    weights: Iterable[tuple[str, Weight]], release: Callable[[], None] | None
) -> Iterable[tuple[str, Weight]]:
    """The weights, handing freed temporaries (and the source's pages read so far, through
    `release`) back to the OS every few tensors, so that loading peaks near the model's own
    size rather than the sum of its temporaries and its file."""
    for i, item in enumerate(weights, 1):
        yield item
        if i % _TRIM_EVERY == 0:
            release_free_memory()
            if release is not None:
                release()


_TRIM_EVERY = 8


def release_free_memory() -> None:
    """Hand the heap that loading freed back to the OS.

    Decoding and repacking the weights frees many large temporaries that glibc keeps for
    reuse; on SmolLM2 that was 140 MB of resident memory no tensor used (RSS 540 -> 400 MB).
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _build(config: ModelConfig, path: Path) -> CausalLM:
    cls = ARCHITECTURES.get(config.architecture)
    if cls is None:
        raise UnsupportedArchitectureError(
            path,
            f"architecture {config.architecture!r} is not supported "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})",
        )
    _check_claimed_size(config, path)
    return cls(config)


# 2-bit quantizations hold about 3.5 weights a byte; the rest is room for tied and
# computed tensors, so only a config that claims far more than its file holds is refused
_MAX_WEIGHTS_PER_BYTE = 16


def _check_claimed_size(config: ModelConfig, path: Path) -> None:
    """Refuse a config that describes far more weights than its file holds, before the model
    is allocated: a header can claim any size, and the model's tensors follow the config."""
    files = [path] if path.is_file() else list(path.glob("*.safetensors"))
    stored = sum(f.stat().st_size for f in files)
    attention = (config.num_attention_heads + config.num_key_value_heads) * config.head_dim
    per_layer = (
        2 * config.hidden_size * attention + 3 * config.hidden_size * config.intermediate_size
    )
    claimed = config.vocab_size * config.hidden_size + config.num_hidden_layers * per_layer
    if claimed > _MAX_WEIGHTS_PER_BYTE * max(stored, 1):
        raise ModelLoadError(
            path, f"its config describes {claimed:,} weights, more than its {stored:,} bytes hold"
        )


def load_checkpoint(
    model: CheckpointModule,
    weights: Iterable[tuple[str, Weight]],
    dtype: torch.dtype,
    path: Path,
    isq: IsqSpec | None = None,
    release: Callable[[], None] | None = None,
) -> None:
    """Load (quantizing linear layers to `isq`), naming the file in errors about a tensor.

    `release` drops the pages of a mapped source that have been read (`GGUFFile`).
    """
    assign_isq(model, isq)
    try:
        model.load_weights(_trimming(weights, release), dtype)
    except ModelLoadError as e:
        if e.path.startswith(str(path)):
            raise
        raise type(e)(path, f"{e.path}: {e.reason}") from e
    if native.load():  # already loaded by layers that packed weights for the kernels
        model.use_native_kernels()


IsqRequest = tuple[str, str | Path | None] | None  # (ISQ type, importance matrix file)


def isq_spec(request: IsqRequest, architecture: str) -> IsqSpec | None:
    """The spec for a model of `architecture`, its importance matrix read and named by module."""
    if request is None:
        return None
    isq_type, imatrix_path = request
    if imatrix_path is None:
        return IsqSpec(isq_type)
    found = read_imatrix(imatrix_path)
    vectors = found.vectors
    if found.gguf_names:
        modules = ((gguf_module_name(n, architecture), v) for n, v in vectors.items())
        vectors = {m: v for m, v in modules if m is not None}
        if not vectors:
            raise ModelLoadError(imatrix_path, f"no tensor name matches a {architecture} layer")
    return IsqSpec(isq_type, vectors)


def quantizable_linears(model: CheckpointModule) -> dict[str, Linear]:
    """The linear layers ISQ applies to, by module name: all but the output head."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, Linear) and not isinstance(module, LMHead)
    }


def layer_specs(model: CheckpointModule, spec: IsqSpec) -> dict[str, LayerIsq]:
    """Each quantizable layer's spec, its importance vector found under its own name or those
    of the checkpoint modules fused into it."""
    fused_parts: dict[str, list[str]] = {}
    for part, (fused, _) in model.packed_modules_mapping.items():
        fused_parts.setdefault(fused, []).append(part)
    specs = {}
    for name in quantizable_linears(model):
        prefix, _, leaf = name.rpartition(".")
        parts = [f"{prefix}.{p}" if prefix else p for p in fused_parts.get(leaf, [])]
        specs[name] = spec.for_layer([name, *parts])
    return specs


def assign_isq(model: CheckpointModule, spec: IsqSpec | None) -> None:
    """Give every quantizable linear layer its ISQ spec (None: load as stored)."""
    specs = layer_specs(model, spec) if spec is not None else {}
    for name, module in quantizable_linears(model).items():
        module.isq = specs.get(name)


def reload_model(loaded: LoadedModel, isq: IsqSpec) -> CausalLM:
    """A second copy of `loaded`'s model, read again from its source file, quantized to `isq`."""
    model = _build(loaded.config, loaded.path)
    release = None
    if loaded.file_format == "gguf":
        gguf = read_gguf(loaded.path)
        weights: Iterable[tuple[str, Weight]] = gguf_weights(gguf, loaded.config)
        release = gguf.release_pages
    else:
        weights = safetensors_weights(loaded.path)
    load_checkpoint(model, weights, loaded.dtype, loaded.path, isq, release)
    return model.eval()


def _load_gguf(path: Path, dtype: torch.dtype, request: IsqRequest = None) -> LoadedModel:
    gguf = read_gguf(path)
    config = ModelConfig.from_gguf(gguf)
    model = _build(config, path)
    isq = isq_spec(request, config.architecture)
    load_checkpoint(model, gguf_weights(gguf, config), dtype, path, isq, gguf.release_pages)
    tokenizer = Tokenizer.from_gguf(gguf.metadata, path)
    return LoadedModel(model.eval(), tokenizer, config, path, dtype, "gguf", isq)


def _load_folder(path: Path, dtype: torch.dtype, request: IsqRequest = None) -> LoadedModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], dtype, request)
        raise ModelLoadError(path, "no config.json (and not exactly one .gguf file) in folder")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(config_file, f"invalid JSON ({e})") from e
    config = ModelConfig.from_hf(raw, config_file)
    model = _build(config, path)
    isq = isq_spec(request, config.architecture)
    load_checkpoint(model, safetensors_weights(path), dtype, path, isq)
    tokenizer = Tokenizer.from_folder(path)
    return LoadedModel(model.eval(), tokenizer, config, path, dtype, "safetensors", isq)


def _read_template(template: str) -> str:
    """A chat template given inline, as a `.jinja` file, or as a tokenizer_config-style JSON."""
    candidate = Path(template)
    if len(template) < 4096 and candidate.is_file():
        text = candidate.read_text()
        if candidate.suffix == ".json":
            return str(json.loads(text)["chat_template"])
        return text
    return template
