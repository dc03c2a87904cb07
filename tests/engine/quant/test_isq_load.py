"""ISQ as weights load: type names, which layers, safetensors sources, importance files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from transformers import LlamaConfig, LlamaForCausalLM

from ladle.engine.layers.linear import Linear
from ladle.engine.loader import assign_isq, isq_spec, load_checkpoint
from ladle.engine.loading.config import ModelConfig
from ladle.engine.loading.weights import safetensors_weights
from ladle.engine.models import ARCHITECTURES, CausalLM
from ladle.engine.quant.calibration import ActivationStats
from ladle.engine.quant.imatrix import read_imatrix, save_cimatrix
from ladle.engine.quant.isq import IsqSpec, parse_isq_type
from ladle.errors import ModelLoadError

HIDDEN = 256  # a K-quant super-block wide, so every ISQ type applies without fallback


def test_type_names_are_mistral_rs_spellings_case_insensitive() -> None:
    assert parse_isq_type("q4k") == "Q4K"
    assert parse_isq_type("Q4_K") == "Q4K"
    assert parse_isq_type("hqq4") == "HQQ4"
    assert parse_isq_type("q8_0") == "Q8_0"
    assert parse_isq_type("bf16") == "BF16"
    assert parse_isq_type(4) == "Q4K"
    assert parse_isq_type("8") == "Q8_0"
    with pytest.raises(ValueError, match=r"unknown ISQ type 'Q3K' \(valid: Q4_0, Q4_1, Q4K"):
        parse_isq_type("Q3K")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = LlamaConfig(
        vocab_size=128, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def load(folder: Path, spec: IsqSpec | None) -> CausalLM:
    config = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()), folder)
    model = ARCHITECTURES[config.architecture](config)
    load_checkpoint(model, safetensors_weights(folder), torch.float32, folder, spec)
    return model.eval()


def logits(model: CausalLM) -> torch.Tensor:
    ids = torch.arange(3, 40)
    with torch.inference_mode():
        return model(ids, torch.arange(len(ids)), model.new_cache(torch.float32))


# relative logit error against the unquantized model (random weights, so every layer counts)
# (measured: Q4_0 0.19, Q4_1 0.17, Q4K 0.16, HQQ4 0.21, Q6K 0.041; layout mistakes give ~1)
TOLERANCE = {"Q4_0": 0.3, "Q4_1": 0.3, "Q4K": 0.3, "Q5K": 0.1, "Q6K": 0.06,
             "Q8_0": 0.03, "HQQ4": 0.3, "HQQ8": 0.02, "F16": 0.01, "BF16": 0.02}  # fmt: skip
KIND = {"Q4_0": "int4 group 32", "Q4_1": "int4 group 32", "Q4K": "int4 group 32",
        "Q5K": "int8", "Q6K": "int8", "Q8_0": "int8",
        "HQQ4": "int4 group 64", "HQQ8": "dense torch.float32", "F16": "dense torch.float16",
        "BF16": "dense torch.bfloat16"}  # fmt: skip


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> torch.Tensor:
    return logits(load(tiny_llama, None))


@pytest.mark.parametrize("isq_type", list(TOLERANCE))
def test_every_type_from_safetensors_keeps_head_and_embeddings(
    tiny_llama: Path, reference: torch.Tensor, isq_type: str
) -> None:
    model = load(tiny_llama, IsqSpec(isq_type))
    layer = model.model.layers[0]
    for linear in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert KIND[isq_type] in repr(linear)
    assert model.lm_head.weight is not None and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    got = logits(model)
    assert ((got - reference).norm() / reference.norm()).item() < TOLERANCE[isq_type]


def test_cimatrix_round_trip_and_fused_lookup(tmp_path: Path, tiny_llama: Path) -> None:
    stats = {"model.layers.0.self_attn.qkv_proj": ActivationStats(HIDDEN)}
    stats["model.layers.0.self_attn.qkv_proj"].observe(torch.randn(10, HIDDEN))
    path = tmp_path / "m.cimatrix"
    save_cimatrix(path, stats)
    found = read_imatrix(path)
    assert not found.gguf_names
    vector = found.vectors["model.layers.0.self_attn.qkv_proj"]
    torch.testing.assert_close(vector, stats["model.layers.0.self_attn.qkv_proj"].mean())
    model = load(tiny_llama, None)
    assign_isq(model, IsqSpec("Q4K", found.vectors))
    assert model.model.layers[0].self_attn.qkv_proj.isq.imatrix is vector
    assert model.model.layers[1].self_attn.qkv_proj.isq.imatrix is None
    assert model.lm_head.isq is None


def write_legacy_imatrix(path: Path, entries: dict[str, np.ndarray], ncall: int) -> None:
    out = struct.pack("<i", len(entries))
    for name, values in entries.items():
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, len(values))
        out += values.astype("<f4").tobytes()
    out += struct.pack("<i", 10) + struct.pack("<i", 4) + b"wiki"  # last call, dataset name
    path.write_bytes(out)


def test_llama_cpp_legacy_and_gguf_imatrix_map_to_module_names(tmp_path: Path) -> None:
    values = np.arange(1, HIDDEN + 1, dtype=np.float32)
    legacy = tmp_path / "imatrix.dat"
    write_legacy_imatrix(
        legacy, {"blk.0.attn_q.weight": values, "blk.1.ffn_down.weight": values}, 4
    )
    spec = isq_spec(("Q4K", legacy), "llama")
    assert spec is not None and spec.imatrix is not None
    assert set(spec.imatrix) == {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    torch.testing.assert_close(
        spec.imatrix["model.layers.0.self_attn.q_proj"], torch.from_numpy(values / 4)
    )

    gguf_path = tmp_path / "imatrix.gguf"
    writer = GGUFWriter(gguf_path, "imatrix")
    writer.add_tensor("blk.0.ffn_up.weight.in_sum2", values[None, :])
    writer.add_tensor("blk.0.ffn_up.weight.counts", np.array([[2.0]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    spec = isq_spec(("Q4K", gguf_path), "llama")
    assert spec is not None and spec.imatrix is not None
    torch.testing.assert_close(
        spec.imatrix["model.layers.0.mlp.up_proj"], torch.from_numpy(values / 2)
    )


def test_imatrix_errors_name_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x01\x00\x00\x00\xff\xff")
    with pytest.raises(ModelLoadError, match=r"junk\.dat: not an importance matrix"):
        read_imatrix(junk)
    other = tmp_path / "other.dat"
    write_legacy_imatrix(other, {"enc.blk.0.attn_q.weight": np.ones(4, np.float32)}, 1)
    with pytest.raises(ModelLoadError, match="no tensor name matches a llama layer"):
        isq_spec(("Q4K", other), "llama")


def test_layers_narrower_than_a_block_fall_back() -> None:
    layer = Linear(96, 32)
    layer.isq = IsqSpec("Q4K").for_layer(["x"])
    layer.load_weight(torch.randn(32, 96), torch.float32)  # 96: not 256, but 32 -> Q4_1
    assert layer.int4 is not None
    layer = Linear(48, 32)
    layer.isq = IsqSpec("Q8_0").for_layer(["x"])
    layer.load_weight(torch.randn(32, 48), torch.float32)  # fits no block: left dense
    assert layer.weight is not None and layer.weight.dtype == torch.float32
