"""Hostile model files (issue 21): truncated, with wrong counts, offsets and types, with huge
declared sizes. Every reader the loaders call either reads the file or raises `ModelLoadError`
naming it: never another exception, and never an allocation the file merely claims.

Each property starts from a small valid file written here and mutates it. Memory is bounded
with `tracemalloc`: the readers are Python and numpy code, whose allocations it traces (numpy
reports its buffers to it), so reading a file of a few KB must peak under 64 MB; an allocation
too big to succeed shows up as the `MemoryError` the property forbids. `safetensors`' own (Rust)
allocations are not traced; it checks every size against the file before it allocates.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ladle.engine.embedding_loader import is_embedding_model
from ladle.engine.loading.config import GGUF_ARCHITECTURES, ModelConfig
from ladle.engine.loading.encoder_config import EncoderConfig
from ladle.engine.loading.gguf import read_gguf
from ladle.engine.loading.tokenizer import Tokenizer
from ladle.engine.loading.weights import gguf_encoder_weights, gguf_weights, safetensors_weights
from ladle.engine.quant.ggml import GGMLTensor
from ladle.engine.quant.hf_gguf import _checkpoint_names
from ladle.errors import ModelLoadError

_MEMORY_BOUND = 64 << 20
_FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
V = GGUFValueType
Q = GGMLQuantizationType
Edits = dict[str, tuple[Any, GGUFValueType] | None]  # metadata keys to set, or delete (None)


def _expect_clean(read: Callable[[], object], named: str) -> ModelLoadError | None:
    """`read()` succeeds or raises `ModelLoadError` naming `named` (returned), and allocates
    under the bound. Only `read` is traced: tracing hypothesis' work too took 4 times as long."""
    started = not tracemalloc.is_tracing()  # else someone traces the whole run
    if started:
        tracemalloc.start(1)
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        error = _named(read, named)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if started:
            tracemalloc.stop()
    assert peak < _MEMORY_BOUND, f"reading a small file allocated {peak / 2**20:.0f} MB"
    return error


def _named(read: Callable[[], object], named: str) -> ModelLoadError | None:
    try:
        read()
    except ModelLoadError as e:
        assert named in str(e), f"{e!r} does not name {named}"
        return e
    return None


# ---------------------------------------------------------------------------------------------
# GGUF: a one-block llama with a byte-level BPE vocabulary, metadata of every value type and
# tensors of several ggml types.


def _kvs(arch: str) -> dict[str, tuple[Any, GGUFValueType]]:
    return {
        f"{arch}.block_count": (1, V.UINT32),
        f"{arch}.context_length": (64, V.UINT32),
        f"{arch}.embedding_length": (32, V.UINT32),
        f"{arch}.feed_forward_length": (32, V.UINT32),
        f"{arch}.attention.head_count": (2, V.UINT32),
        f"{arch}.attention.head_count_kv": (1, V.UINT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32),
        f"{arch}.rope.freq_base": (10000.0, V.FLOAT32),
        f"{arch}.rope.dimension_count": (16, V.UINT32),
        "tokenizer.ggml.model": ("gpt2", V.STRING),
        "tokenizer.ggml.pre": ("qwen2", V.STRING),
        "tokenizer.ggml.tokens": (["a", "b", "ab", "Ġ", "Ġab", "c", "<|im_end|>", "1"], V.ARRAY),
        "tokenizer.ggml.token_type": ([1, 1, 1, 1, 1, 1, 3, 1], V.ARRAY),
        "tokenizer.ggml.merges": (["a b", "Ġ ab"], V.ARRAY),
        "tokenizer.ggml.eos_token_id": (6, V.UINT32),
        "tokenizer.chat_template": ("{{ messages }}", V.STRING),
        "test.u8": (200, V.UINT8),
        "test.i8": (-3, V.INT8),
        "test.u16": (65000, V.UINT16),
        "test.i16": (-300, V.INT16),
        "test.i32": (-70000, V.INT32),
        "test.u64": (2**40, V.UINT64),
        "test.i64": (-(2**40), V.INT64),
        "test.f64": (0.125, V.FLOAT64),
        "test.flag": (True, V.BOOL),
        "test.floats": ([0.5, -1.0], V.ARRAY),
        "test.nested": ([[1, 2], [3]], V.ARRAY),
    }


def _tensors() -> dict[str, tuple[np.ndarray, GGMLQuantizationType]]:
    rng = np.random.default_rng(0)

    def matrix(rows: int, cols: int, qtype: GGMLQuantizationType) -> tuple[np.ndarray, Q]:
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        if qtype == Q.F16:
            return values.astype(np.float16), qtype
        return (values, qtype) if qtype == Q.F32 else (quantize(values, qtype), qtype)

    norm = (np.ones(32, dtype=np.float32), Q.F32)
    return {
        "token_embd.weight": matrix(8, 32, Q.F16),
        "blk.0.attn_norm.weight": norm,
        "blk.0.attn_q.weight": matrix(32, 32, Q.Q8_0),
        "blk.0.attn_k.weight": matrix(16, 32, Q.Q4_0),
        "blk.0.attn_v.weight": matrix(16, 32, Q.Q4_1),
        "blk.0.attn_output.weight": matrix(32, 32, Q.Q5_0),
        "blk.0.ffn_norm.weight": norm,
        "blk.0.ffn_gate.weight": matrix(32, 32, Q.Q5_1),
        "blk.0.ffn_up.weight": matrix(32, 32, Q.Q8_0),
        "blk.0.ffn_down.weight": matrix(32, 32, Q.F32),
        "output_norm.weight": norm,
        "rope_freqs.weight": (np.ones(8, dtype=np.float32), Q.F32),
    }


def _write_gguf(
    path: Path, arch: str = "llama", edits: Edits | None = None, rope_freqs: bool = True
) -> None:
    """The seed model under `arch`, its metadata changed by `edits` (None deletes a key);
    without `rope_freqs`, the `rope.scaling.*` keys apply."""
    writer = GGUFWriter(path, arch)
    for key, kv in {**_kvs(arch), **(edits or {})}.items():
        if kv is not None:
            writer.add_key_value(key, *kv)
    for name, (data, qtype) in _tensors().items():
        if name == "rope_freqs.weight" and not rope_freqs:
            continue
        raw = None if qtype in (Q.F32, Q.F16) else qtype
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _read_like_the_loaders(path: Path) -> None:
    """What `load_model` and `load_embedder` read from a GGUF before building a model."""
    gguf = read_gguf(path)
    decoded = [*gguf.tensors.values()]  # a layer decodes a type it cannot run as it is
    _named(lambda: Tokenizer.from_gguf(gguf.metadata, path), str(path))
    if gguf.architecture == "bert":
        EncoderConfig.from_gguf(gguf)
        weights = gguf_encoder_weights(gguf)
    else:
        weights = gguf_weights(gguf, ModelConfig.from_gguf(gguf))
    decoded += [w for _, w in weights if isinstance(w, GGMLTensor)]
    with np.errstate(all="ignore"):  # edited scales decode to inf and nan, as they may
        for tensor in decoded:
            tensor.dequantize()


_SCALAR_WIDTHS = {
    V.UINT8: 1,
    V.INT8: 1,
    V.BOOL: 1,
    V.UINT16: 2,
    V.INT16: 2,
    V.UINT32: 4,
    V.INT32: 4,
    V.FLOAT32: 4,
    V.UINT64: 8,
    V.INT64: 8,
    V.FLOAT64: 8,
}


def _header_fields(data: bytes) -> tuple[list[tuple[int, int]], int]:
    """(offset, width) of every number in a valid GGUF header (counts, lengths, value types,
    values, dimensions, tensor types and offsets), and where the header ends."""
    fields: list[tuple[int, int]] = [(4, 4), (8, 8), (16, 8)]
    pos = 24

    def number(width: int) -> int:
        nonlocal pos
        fields.append((pos, width))
        pos += width
        return int.from_bytes(data[pos - width : pos], "little")

    def string() -> None:
        nonlocal pos
        length = number(8)  # read first: `pos += number(8)` would add to the old `pos`
        pos += length

    def value(vtype: int) -> None:
        if vtype == V.STRING:
            string()
        elif vtype == V.ARRAY:
            item, count = number(4), number(8)
            for _ in range(count):
                value(item)
        else:
            number(_SCALAR_WIDTHS[V(vtype)])

    num_tensors, num_kv = struct.unpack_from("<QQ", data, 8)
    for _ in range(num_kv):
        string()
        value(number(4))
    for _ in range(num_tensors):
        string()
        for _ in range(number(4)):
            number(8)
        number(4)
        number(8)
    return fields, pos


@functools.cache
def _gguf_seed() -> tuple[bytes, list[tuple[int, int]], int]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "seed.gguf"
        _write_gguf(path)
        data = path.read_bytes()
    return (data, *_header_fields(data))


def _hostile_number(width: int, original: int, file_size: int) -> st.SearchStrategy[int]:
    top = 2 ** (8 * width)
    special = [0, 1, 2, 3, 4, 31, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**63, top - 1]
    special += [original + 1, original - 1, original * 2, file_size, file_size + 1, 2**40]
    in_range = sorted({n % top for n in special})
    return st.sampled_from(in_range) | st.integers(0, top - 1)


Edit = tuple[str, int, int]  # ("number" | "byte", offset, value), ("cut" | "drop", offset, n)


@st.composite
def _gguf_edits(draw: st.DrawFn) -> list[Edit]:
    """One to three edits of the seed: a header number overwritten (counts, lengths, types,
    dimensions, offsets), the file cut short, or a header byte changed."""
    seed, fields, header_end = _gguf_seed()
    widths = dict(fields)
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["number", "number", "cut", "byte"]))
        if kind == "number":
            pos = draw(st.sampled_from(sorted(widths)))
            original = int.from_bytes(seed[pos : pos + widths[pos]], "little")
            edits.append((kind, pos, draw(_hostile_number(widths[pos], original, len(seed)))))
        elif kind == "cut":
            cut = st.sampled_from(sorted(widths)) | st.integers(0, header_end)
            edits.append((kind, draw(cut | st.just(len(seed) - 1)), 0))
        else:
            edits.append((kind, draw(st.integers(0, header_end - 1)), draw(st.integers(0, 255))))
    return edits


def _edited_gguf(edits: list[Edit]) -> bytes:
    seed, fields, _ = _gguf_seed()
    widths = dict(fields)
    data = bytearray(seed)
    for kind, pos, value in edits:
        if kind == "number":
            data[pos : pos + widths[pos]] = value.to_bytes(widths[pos], "little")
        elif kind == "cut":
            del data[pos:]
        elif kind == "drop":  # regressions only, and last: later offsets move
            del data[pos : pos + value]
        elif pos < len(data):
            data[pos] = value
    return bytes(data)


def _place(folder: Path, name: str, data: bytes) -> Path:
    """Write through a new inode: a mapping of the previous example's file stays valid."""
    path = folder / name
    staging = folder / f".{name}.tmp"
    staging.write_bytes(data)
    os.replace(staging, path)
    return path


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_the_gguf_seed_reads_whole(fuzz_dir: Path) -> None:
    path = _place(fuzz_dir, "seed.gguf", _gguf_seed()[0])
    gguf = read_gguf(path)
    config = ModelConfig.from_gguf(gguf)
    assert len(list(gguf_weights(gguf, config))) == 11
    assert Tokenizer.from_gguf(gguf.metadata, path).encode("ab") == [2]
    assert gguf.metadata["test.nested"] == [[1, 2], [3]]


@_FUZZ
@given(edits=_gguf_edits())
def test_mutated_gguf_is_read_or_named(fuzz_dir: Path, edits: list[Edit]) -> None:
    path = _place(fuzz_dir, "fuzzed.gguf", _edited_gguf(edits))
    _expect_clean(lambda: _read_like_the_loaders(path), str(path))


_INTS = [0, 1, 2, 3, 8, 16, 32, 2**31 - 1, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1]
_STRINGS = ["gpt2", "llama", "bert", "yarn", "linear", "llama3", "none", "", "a b", "ab c", "Ġ"]


def _typed_int(value: int) -> tuple[int, GGUFValueType]:
    if value < 0:
        return value, V.INT32 if value >= -(2**31) else V.INT64
    return value, V.UINT32 if value < 2**32 else V.UINT64


_GGUF_INTS = (st.sampled_from(_INTS) | st.sampled_from([-1, -(2**31), -(2**63)])).map(_typed_int)
_GGUF_STRINGS = st.sampled_from(_STRINGS) | st.text(max_size=6)
_GGUF_FLOATS = st.sampled_from([0.0, -1.0, 1e-6, 0.5, 2.0, 1e30, math.inf, -math.inf, math.nan])
_GGUF_VALUES = st.one_of(
    _GGUF_INTS,
    _GGUF_FLOATS.map(lambda x: (x, V.FLOAT32)),
    st.booleans().map(lambda b: (b, V.BOOL)),
    _GGUF_STRINGS.map(lambda s: (s, V.STRING)),
    st.lists(st.sampled_from([0, 1, 3, 4, 7, 2**31 - 1]), min_size=1, max_size=9).map(
        lambda xs: (xs, V.ARRAY)
    ),
    st.lists(_GGUF_FLOATS, min_size=1, max_size=9).map(lambda xs: (xs, V.ARRAY)),
    st.lists(_GGUF_STRINGS, min_size=1, max_size=9).map(lambda xs: (xs, V.ARRAY)),
)
# Keys the readers look at, besides the seed's own.
_READ_KEYS = [
    "general.architecture",
    "general.alignment",
    "{arch}.vocab_size",
    "{arch}.attention.key_length",
    "{arch}.attention.sliding_window",
    "{arch}.attention.layer_norm_epsilon",
    "{arch}.rope.scaling.type",
    "{arch}.rope.scaling.factor",
    "{arch}.rope.scaling.attn_factor",
    "{arch}.rope.scaling.original_context_length",
    "{arch}.final_logit_softcapping",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.ggml.padding_token_id",
]


@st.composite
def _metadata_edits(draw: st.DrawFn) -> tuple[str, Edits, bool]:
    """A well-formed file whose metadata values have the wrong types, sizes or are missing."""
    arch = draw(st.sampled_from([*GGUF_ARCHITECTURES, "bert"]))
    keys = [*_kvs(arch), *(k.format(arch=arch) for k in _READ_KEYS)]
    chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True))
    return arch, {key: draw(st.none() | _GGUF_VALUES) for key in chosen}, draw(st.booleans())


@_FUZZ
@given(edit=_metadata_edits())
def test_gguf_with_hostile_metadata_is_read_or_named(
    fuzz_dir: Path, edit: tuple[str, Edits, bool]
) -> None:
    staging = fuzz_dir / ".meta.gguf.tmp"
    _write_gguf(staging, *edit)
    path = fuzz_dir / "meta.gguf"
    os.replace(staging, path)
    _expect_clean(lambda: _read_like_the_loaders(path), str(path))


# ---------------------------------------------------------------------------------------------
# safetensors: a folder with one file of four dtypes, or sharded with an index.


@functools.cache
def _st_seed() -> tuple[str, bytes]:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(4, 8, generator=generator),
        "model.norm.weight": torch.ones(8, dtype=torch.float16),
        "lm_head.weight": torch.ones(2, 2, dtype=torch.bfloat16),
        "positions": torch.arange(3),
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "seed.safetensors"
        save_file(tensors, path)
        data = path.read_bytes()
    (length,) = struct.unpack_from("<Q", data)
    return data[8 : 8 + length].decode(), data[8 + length :]


_HUGE = [2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 2**64]
_JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, 1, 2, 3, 4, 8, 16, 24, 32, 64, 96, -1, *_HUGE]),
    st.floats(allow_nan=False, width=32),
    st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F6_E2M3", "F99", "", "F8_E8M0", "F4"]),
    st.text(max_size=4),
)
_JSON = st.recursive(
    _JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["dtype", "shape", "data_offsets", "x"]), inner, max_size=3
        )
    ),
    max_leaves=8,
)


@st.composite
def _mutated_safetensors(draw: st.DrawFn) -> bytes:
    """The seed with its header's fields, its header length or its bytes changed."""
    text, body = _st_seed()
    header = json.loads(text)
    names = sorted(header)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        value = draw(_JSON)
        if field is None:
            header[name] = value
        elif isinstance(header.get(name), dict):
            header[name][field] = value
    raw = json.dumps(header).encode()
    data = bytearray(struct.pack("<Q", len(raw)) + raw + body)
    kind = draw(st.sampled_from(["header", "header", "length", "cut", "byte", "text"]))
    if kind == "length":
        data[:8] = draw(_hostile_number(8, len(raw), len(data))).to_bytes(8, "little")
    elif kind == "cut":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif kind == "byte":
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif kind == "text":  # a header that is not JSON, or not UTF-8
        text = draw(st.binary(max_size=16))
        data = bytearray(struct.pack("<Q", len(text)) + text + body)
    return bytes(data)


@_FUZZ
@given(data=_mutated_safetensors())
def test_mutated_safetensors_is_read_or_named(fuzz_dir: Path, data: bytes) -> None:
    folder = fuzz_dir / "st"
    folder.mkdir(exist_ok=True)
    _place(folder, "model.safetensors", data)
    _expect_clean(lambda: list(safetensors_weights(folder)), str(folder))


@pytest.fixture(scope="module")
def sharded(fuzz_dir: Path) -> Path:
    folder = fuzz_dir / "sharded"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, folder / "model-1.safetensors")
    save_file({"outside": torch.ones(2)}, fuzz_dir / "outside.safetensors")
    return folder


_SHARD_NAMES = st.sampled_from(
    ["model-1.safetensors", "../outside.safetensors", "", ".", "..", "/etc/hostname"]
)


@_FUZZ
@given(
    index=st.one_of(
        st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=3), _SHARD_NAMES)}),
        st.fixed_dictionaries({"weight_map": _JSON}),
        _JSON,
    )
)
def test_hostile_safetensors_index_is_read_or_named(sharded: Path, index: Any) -> None:
    _place(sharded, "model.safetensors.index.json", json.dumps(index).encode())
    _expect_clean(lambda: _names_inside(sharded), str(sharded))


def _names_inside(folder: Path) -> None:
    assert "outside" not in dict(safetensors_weights(folder)), "read a shard outside the folder"


# ---------------------------------------------------------------------------------------------
# config.json: valid configs with fields of the wrong type or size.

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
_DECODER_CONFIG = {
    "model_type": "llama",
    "vocab_size": 16,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 128,
    "rope_scaling": _LLAMA3_ROPE,
}
_ENCODER_CONFIG = {
    "model_type": "bert",
    "vocab_size": 16,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
}
_CONFIG_KEYS = [
    *_DECODER_CONFIG,
    "head_dim",
    "hidden_act",
    "hidden_activation",
    "partial_rotary_factor",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "sliding_window_pattern",
    "layer_types",
    "rope_parameters",
    "text_config",
    "tie_word_embeddings",
    "attention_bias",
    "attn_logit_softcapping",
    "query_pre_attn_scalar",
    "original_max_position_embeddings",
    "pad_token_id",
    "type_vocab_size",
    "layer_norm_eps",
    "position_embedding_type",
]
_CONFIG_VALUES = st.one_of(
    _JSON,
    st.sampled_from(["llama", "gemma2", "gemma3", "phi3", "qwen2", "longrope", "yarn", "su"]),
    st.sampled_from([[1.0] * 4, ["sliding_attention"] * 2, {"rope_type": "yarn"}]),
    st.sampled_from([10**12, 2**62]),
)


@st.composite
def _hostile_configs(draw: st.DrawFn) -> tuple[bool, Any]:
    encoder = draw(st.booleans())
    config = dict(_ENCODER_CONFIG if encoder else _DECODER_CONFIG)
    for key in draw(st.lists(st.sampled_from(_CONFIG_KEYS), min_size=1, max_size=4, unique=True)):
        if draw(st.booleans()):
            config.pop(key, None)
        else:
            config[key] = draw(_CONFIG_VALUES)
    return encoder, config if draw(st.integers(0, 19)) else draw(_JSON)


@_FUZZ
@given(case=_hostile_configs())
def test_hostile_config_is_read_or_named(case: tuple[bool, Any]) -> None:
    encoder, raw = case
    reader = EncoderConfig.from_hf if encoder else ModelConfig.from_hf
    _expect_clean(lambda: _check_types(reader(raw, "/m/config.json")), "/m/config.json")


def _check_types(config: ModelConfig | EncoderConfig) -> None:
    """A config that constructs holds what its annotations say: the model built from it
    does arithmetic on these fields."""
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"):
        assert type(getattr(config, name)) is int
    if isinstance(config, EncoderConfig):
        assert type(config.pad_token_id) is int and type(config.type_vocab_size) is int
        assert type(config.layer_norm_eps) in (int, float)
        return
    assert type(config.head_dim) is int and type(config.num_key_value_heads) is int
    for name in ("rms_norm_eps", "rope_theta", "partial_rotary_factor"):
        assert type(getattr(config, name)) in (int, float), name
    for name in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
        assert getattr(config, name) is None or type(getattr(config, name)) in (int, float)
    assert config.sliding_window is None or type(config.sliding_window) is int
    assert config.rope_scaling is None or isinstance(config.rope_scaling, dict)


# ---------------------------------------------------------------------------------------------
# What the fuzzers found, kept as plain examples. Each raised another exception, allocated what
# the file declared, or named no file before its fix.


def _number_after(text: str, n: int) -> int:
    """Offset of the `n`th header number after the string `text` (a key or a tensor name):
    for a tensor 0 is n_dims, 1 and 2 its dimensions, 3 its type; for a key 0 is the value
    type, and for an array 1 the item type, 2 the count, 3 the first item."""
    seed, fields, _ = _gguf_seed()
    after = seed.index(text.encode()) + len(text)
    return sorted(pos for pos, _ in fields if pos >= after)[n]


def _length_of(text: str) -> int:
    return _gguf_seed()[0].index(text.encode()) - 8


@pytest.mark.parametrize(
    ("edits", "reason"),
    [
        pytest.param(lambda: [("number", _length_of("blk.0.attn_q.weight"), 2**64 - 1)],
                     "declared", id="name-length-2**64-OverflowError"),
        pytest.param(lambda: [("number", _length_of("general.architecture"), 2**40)],
                     "declared", id="key-length-2**40-MemoryError"),
        pytest.param(lambda: [("number", _number_after("tokenizer.ggml.tokens", 3), 2**32)],
                     "past the end", id="token-length-2**32-allocated-4GB"),
        pytest.param(lambda: [("number", _number_after("test.floats", 2), 2**61)],
                     "declared", id="float-array-count-2**61"),
        pytest.param(lambda: [("number", _number_after("blk.0.attn_k.weight", 1), 1)],
                     "blk.0.attn_k.weight", id="row-not-whole-blocks-named-tensor-only"),
        pytest.param(lambda: [("number", _number_after("blk.0.attn_k.weight", 2), 0)],
                     "shape", id="zero-dimension-ValueError-on-decode"),
        pytest.param(lambda: [("number", _number_after("blk.0.attn_k.weight", 0), 0),
                              ("drop", _number_after("blk.0.attn_k.weight", 1), 16)],
                     "shape", id="no-dimensions-IndexError"),
        pytest.param(lambda: [("number", _number_after("blk.0.attn_k.weight", 2), 1)],
                     "heads", id="k-rows-not-heads-ValueError"),
    ],
)  # fmt: skip
def test_gguf_regressions(fuzz_dir: Path, edits: Callable[[], list[Edit]], reason: str) -> None:
    path = _place(fuzz_dir, "regression.gguf", _edited_gguf(edits()))
    error = _expect_clean(lambda: _read_like_the_loaders(path), str(path))
    assert error is not None and reason in str(error)


@pytest.mark.parametrize(
    ("arch", "edits", "reason"),
    [
        ("llama", {"general.alignment": (0, V.UINT32)}, "alignment"),  # ZeroDivisionError
        ("llama", {"general.alignment": ([32], V.ARRAY)}, "alignment"),  # TypeError
        ("llama", {"llama.attention.head_count": (0, V.UINT32)}, "head_count"),
        ("llama", {"llama.embedding_length": (1, V.UINT32)}, "embedding_length"),
        ("llama", {"llama.block_count": (2**40, V.UINT64)}, "num_hidden_layers"),  # a 2**40 list
        ("llama", {"llama.attention.head_count_kv": (True, V.BOOL)}, "num_key_value_heads"),
        ("llama", {"llama.attention.layer_norm_rms_epsilon": ("x", V.STRING)}, "rms_norm_eps"),
        ("bert", {"bert.attention.layer_norm_epsilon": ("x", V.STRING)}, "layer_norm_eps"),
        (
            "bert",
            {
                "bert.attention.layer_norm_epsilon": (1e-12, V.FLOAT32),
                "tokenizer.ggml.padding_token_id": ("0", V.STRING),
            },
            "pad_token_id",
        ),
    ],
)
def test_gguf_metadata_regressions(fuzz_dir: Path, arch: str, edits: Edits, reason: str) -> None:
    path = fuzz_dir / "metadata.gguf"
    _write_gguf(path, arch, edits)
    reader = EncoderConfig if arch == "bert" else ModelConfig
    error = _expect_clean(lambda: reader.from_gguf(read_gguf(path)), str(path))
    assert error is not None and reason in str(error)


@pytest.mark.parametrize(
    ("edits", "reason"),
    [
        ({"tokenizer.ggml.pre": (["qwen2"], V.ARRAY)}, "tokenizer.ggml.pre"),  # unhashable
        ({"tokenizer.ggml.merges": ([1, 2], V.ARRAY)}, "tokenizer.ggml.merges"),  # not iterable
        ({"tokenizer.ggml.token_type": (1, V.UINT32)}, "tokenizer.ggml.token_type"),  # no len()
        ({"tokenizer.ggml.merges": (["a zz"], V.ARRAY)}, "out of vocabulary"),  # bare Exception
    ],
)  # fmt: skip
def test_gguf_vocabulary_regressions(fuzz_dir: Path, edits: Edits, reason: str) -> None:
    path = fuzz_dir / "vocabulary.gguf"
    _write_gguf(path, "llama", edits)
    metadata = read_gguf(path).metadata
    error = _expect_clean(lambda: Tokenizer.from_gguf(metadata, path), str(path))
    assert error is not None and reason in str(error)


def test_arrays_nested_past_the_stack_are_refused(fuzz_dir: Path) -> None:
    """Was a RecursionError: each level of nesting costs the file 12 bytes."""
    depth = 20_000
    level = struct.pack("<IQ", V.ARRAY, 1)
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 4) + b"deep"
    data += struct.pack("<I", V.ARRAY) + level * depth + struct.pack("<IQ", V.UINT8, 0)
    path = _place(fuzz_dir, "deep.gguf", data)
    error = _expect_clean(lambda: read_gguf(path), str(path))
    assert error is not None and "nested" in str(error)


def test_a_long_token_does_not_split_at_every_point() -> None:
    """Was 380 MB for one 20 kB token: merges from scores sliced it at every position."""
    tokens = ["<unk>", "a", "b", "ab", "x" * 20_000]
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens}
    _expect_clean(lambda: Tokenizer.from_gguf(metadata, "long.gguf"), "long.gguf")
    assert Tokenizer.from_gguf(metadata, "long.gguf").encode("ab", add_special_tokens=False) == [3]


def test_a_zero_size_tensor_with_a_dimension_past_int64(fuzz_dir: Path) -> None:
    """safetensors accepts it; torch raised a TypeError reshaping to it."""
    header = json.dumps({"t": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}})
    folder = fuzz_dir / "zero"
    folder.mkdir()
    _place(folder, "model.safetensors", struct.pack("<Q", len(header)) + header.encode())
    error = _expect_clean(lambda: list(safetensors_weights(folder)), str(folder))
    assert error is not None


@pytest.mark.parametrize(
    "index",
    [
        b'{"weight_map": null}',  # AttributeError
        b'{"weight_map": {"a": 5}}',  # TypeError
        b"\xff\xfe",  # UnicodeDecodeError
        b'{"weight_map": {"outside": "../outside.safetensors"}}',  # read outside the folder
        b'{"weight_map": {"outside": "/etc/hostname"}}',
    ],
)
def test_safetensors_index_regressions(sharded: Path, index: bytes) -> None:
    _place(sharded, "model.safetensors.index.json", index)
    error = _expect_clean(lambda: _names_inside(sharded), str(sharded))
    assert error is not None
    # the folder-to-GGUF writer reads the same index through the same checks
    error = _expect_clean(lambda: _checkpoint_names(sharded), str(sharded))
    assert error is not None


@pytest.mark.parametrize(
    ("encoder", "raw", "reason"),
    [
        (False, None, "JSON object"),  # AttributeError
        (True, [1], "JSON object"),
        (False, {**_DECODER_CONFIG, "text_config": [1]}, "malformed"),
        (False, {**_DECODER_CONFIG, "rope_scaling": {"rope_type": ["yarn"]}}, "rope"),  # unhashable
        (False, {**_DECODER_CONFIG, "num_key_value_heads": "2"}, "num_key_value_heads"),
        (False, {**_DECODER_CONFIG, "num_key_value_heads": True}, "num_key_value_heads"),
        (False, {**_DECODER_CONFIG, "rms_norm_eps": "llama"}, "rms_norm_eps"),  # accepted
        (False, {**_DECODER_CONFIG, "rope_scaling": {**_LLAMA3_ROPE, "factor": "8"}},
         "factor"),  # accepted
        (False, {**_DECODER_CONFIG, "model_type": "gemma3", "sliding_window": 4,
                 "sliding_window_pattern": 0}, "malformed"),  # ZeroDivisionError
        (False, {**_DECODER_CONFIG, "model_type": "gemma2", "sliding_window": 4,
                 "num_hidden_layers": 2**40}, "num_hidden_layers"),  # a 2**40 list
        (True, {**_ENCODER_CONFIG, "model_type": ["bert"]}, "architecture"),  # unhashable
        (True, {**_ENCODER_CONFIG, "layer_norm_eps": "llama"}, "layer_norm_eps"),  # accepted
        (True, {**_ENCODER_CONFIG, "model_type": "roberta", "pad_token_id": "1"},
         "pad_token_id"),  # TypeError
    ],
)  # fmt: skip
def test_config_regressions(encoder: bool, raw: Any, reason: str) -> None:
    reader = EncoderConfig.from_hf if encoder else ModelConfig.from_hf
    error = _expect_clean(lambda: reader(raw, "/m/config.json"), "/m/config.json")
    assert error is not None and reason in str(error)


@pytest.mark.parametrize(
    ("config", "encoder"),
    [
        (b"null", None),  # AttributeError before
        (b"[1]", None),
        (b"\xff", None),  # UnicodeDecodeError
        (b'{"model_type": ["bert"]}', False),  # unhashable: TypeError before
        (b'{"model_type": "bert"}', True),
    ],
)
def test_embedding_model_detection_reads_any_config(
    tmp_path: Path, config: bytes, encoder: bool | None
) -> None:
    (tmp_path / "config.json").write_bytes(config)
    if encoder is None:
        with pytest.raises(ModelLoadError, match=r"config\.json"):
            is_embedding_model(tmp_path)
    else:
        assert is_embedding_model(tmp_path) is encoder
